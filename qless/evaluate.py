"""Evaluate a model (the base, or with a LoRA adapter) on a target task's held-out examples.

Tasks, built as open-instruct's evaluation scripts (what LESS evaluates with) build them:
- ``mmlu``: ``eval/mmlu/test/<subject>_test.csv`` (14,042 questions). The dev split is what a
  selection targets (`qless.tasks`), so it is never evaluated on: it only gives the k-shot
  demonstrations, the first ``k`` dev questions of the subject (open-instruct's
  ``eval/mmlu/run_eval.py --ntrain 5``; ``k`` drops while the prompt does not fit
  ``max_length``). The prompt ends ``\\nAnswer:``, then the chat format's ``The answer is:``.
  Metrics: ``correct`` (the argmax of the next-token logits over the letters " A".." D" is the
  answer) and ``nll`` (-log p of the correct letter's token over the whole vocabulary).
- ``bbh``: ``eval/bbh/bbh/<task>.json`` with the task's 3-shot chain-of-thought prompt
  (``eval/bbh/bbh-three-shot.json``) + ``\\n\\nQ: {input}``, answer prefix ``A:``
  (open-instruct's ``eval/bbh/run_eval.py``). An example whose question is one of the prompt's
  shots is left out. Metrics: ``exact_match`` of the final answer of a greedy generation (it
  stops at a blank line; "the answer is X." gives X, as open-instruct extracts it; compared
  ignoring case, punctuation and spacing), and ``nll``: the mean per-token NLL of `` {target}``
  right after ``A:`` (the answer given directly, without a chain of thought: a continuous
  metric that moves where accuracy cannot).
- a JSONL file: one ``{"prompt": ..., "answer": ..., "subtask"?: ..., "id"?: ...}`` per line;
  ``nll`` of the answer after the prompt, ``exact_match`` of a greedy generation.

Prompts take the stage's chat format (`ReadConfig.chat_format`: ``tulu``,
``<|user|>\\n{prompt}\\n<|assistant|>\\n`` then the answer prefix, or ``template``) and are
tokenized as LESS's validation rows. An example that does not fit ``max_length`` is left out and
listed (never truncated). ``limit`` keeps the first ``limit`` examples of a round robin over the
sorted subtasks (each in file order), so a small limit still covers every subtask.

`evaluate` yields one record per example (id, subtask, nll, and ``correct`` or ``exact_match``
with the ``prediction``); `summarize` gives one row per subtask and an ``overall`` row (means
over examples, with their count ``n``).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qless.config import EvalConfig, ReadConfig
from qless.data import (
    IGNORE_INDEX,
    DataError,
    _lines,
    load_line,
    record_id,
)
from qless.tasks import (
    TaskDataError,
    _csv_records,
    _encode_less,
    _Item,
    _split_shot,
    mmlu_header,
    mmlu_question,
    mmlu_subjects,
)

if TYPE_CHECKING:
    from qless.model import ModelSource

EVAL_TASKS = ("mmlu", "bbh")
LETTERS = "ABCD"
_ANSWER = re.compile(r"[tT]he answer is (.*?)\.")  # open-instruct's bbh extraction
_STOP = "\n\n"  # open-instruct stops bbh generations at a blank line


class EvalError(ValueError):
    "A task cannot be evaluated: an unknown task or subtask, or unusable options."


@dataclass(frozen=True)
class EvalExample:
    """One tokenized evaluation example: ``input_ids[:n_prompt]`` is the prompt, the rest the answer.

    ``choices`` (multiple choice): the candidate answers' token ids; the answer's first token is
    the correct one. ``target``: what a generated answer must match ("" for no generation metric).
    """

    id: str
    subtask: str
    input_ids: list[int]
    n_prompt: int
    target: str = ""
    choices: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    "An example before tokenization: prompts to try in order (MMLU: k shots, then fewer)."

    id: str
    subtask: str
    where: str
    items: tuple[_Item, ...]
    target: str
    multiple_choice: bool = False


# ---------------------------------------------------------------------------------------------
# answers


def extract_answer(text: str) -> str:
    """The final answer of a generation: X of the first "the answer is X." (open-instruct's bbh
    rule), else the whole text; stripped."""
    m = _ANSWER.search(text)
    return (m.group(1) if m else text).strip()


def normalize(text: str) -> str:
    """Lower case, no punctuation, single spaces: what exact match compares (open-instruct's
    ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``)."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def exact_match(generated: str, target: str) -> bool:
    return normalize(extract_answer(generated)) == normalize(target)


# ---------------------------------------------------------------------------------------------
# the tasks' examples


def _mmlu(data_dir: Path, k_shot: int) -> list[_Spec]:
    test, dev = data_dir / "eval" / "mmlu" / "test", data_dir / "eval" / "mmlu" / "dev"
    specs = []
    for subject in mmlu_subjects(test, "test"):
        dev_file = dev / f"{subject}_dev.csv"
        shots = [row for row, _, _ in _csv_records(dev_file)] if dev_file.is_file() else []
        test_file = test / f"{subject}_test.csv"
        for i, (row, offset, line) in enumerate(_csv_records(test_file)):
            where = f"{test_file}:{line}"
            if len(row) != 6 or row[-1] not in LETTERS:
                raise DataError(where, f"expected a question, 4 choices and a letter A-D; got {row[-1:]!r}"
                                f" in {len(row)} fields")
            items = []
            for k in range(min(k_shot, len(shots)), -1, -1):  # open-instruct: fewer shots until it fits
                demos = "".join(mmlu_question(s) + " " + s[-1] + "\n\n" for s in shots[:k])
                user = mmlu_header(subject) + demos + mmlu_question(row)
                items.append(_Item("mmlu", subject, i, user, "The answer is:", " " + row[-1], user,
                                   str(test_file), offset, line, where))
            specs.append(_Spec(f"mmlu/{subject}/{i}", subject, where, tuple(items), row[-1], True))
    return specs


def _bbh(data_dir: Path) -> list[_Spec]:
    root = data_dir / "eval" / "bbh"
    prompts_file = root / "bbh-three-shot.json"
    if not prompts_file.is_file():
        raise TaskDataError(prompts_file, "no such file (bbh eval needs the 3-shot prompts)")
    prompts = json.loads(prompts_file.read_text(encoding="utf-8"))
    specs = []
    for task in sorted(prompts):
        file = root / "bbh" / f"{task}.json"
        if not file.is_file():
            raise TaskDataError(file, f"no such file (the examples of bbh task {task})")
        prompt = prompts[task].strip()
        shots = {_split_shot(s, f"{prompts_file} ({task})")[0].strip() for s in prompt.split("\n\n")[-3:]}
        for i, ex in enumerate(json.loads(file.read_text(encoding="utf-8"))["examples"]):
            where = f"{file} (example {i})"
            if not (isinstance(ex.get("input"), str) and isinstance(ex.get("target"), str)):
                raise DataError(where, "expected string 'input' and 'target'")
            if ("Q: " + ex["input"]).strip() in shots:
                continue  # one of the prompt's demonstrations
            user = prompt + "\n\nQ: " + ex["input"]
            item = _Item("bbh", task, i, user, "A:", " " + ex["target"], user + "\nA:", str(file), -1, 0, where)
            specs.append(_Spec(f"bbh/{task}/{i}", task, where, (item,), ex["target"]))
    return specs


def _jsonl(path: Path, skip_invalid: bool, skipped: list[str]) -> list[_Spec]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    specs, seen = [], {}
    for line, offset, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        try:
            record = load_line(raw, first=line == 1)
            prompt, answer = record.get("prompt"), record.get("answer")
            if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
                raise ValueError("expected a string 'prompt' and a non-empty string 'answer'")
            subtask = record.get("subtask", path.stem)
            if not isinstance(subtask, str) or not subtask:
                raise ValueError("'subtask' must be a non-empty string")
            rid = record_id(record)
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r} (first at line {seen[rid]})")
        except ValueError as e:
            if not skip_invalid:
                raise DataError(where, str(e)) from None
            skipped.append(f"{where}: {e}")
            continue
        seen[rid] = line
        item = _Item(path.stem, subtask, line, prompt, "", answer, prompt, str(path), offset, line, where)
        specs.append(_Spec(rid, subtask, where, (item,), answer.strip()))
    if not specs:
        raise DataError(str(path), "no examples")
    return specs


def _round_robin(specs: Sequence[_Spec], limit: int) -> list[_Spec]:
    by: dict[str, list[_Spec]] = {}
    for s in specs:
        by.setdefault(s.subtask, []).append(s)
    queues = [by[name] for name in sorted(by)]
    out = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return out[:limit]


def _tokenize(spec: _Spec, tokenizer, chat_format: str, max_length: int, choices) -> EvalExample | None:
    for item in spec.items:
        ids, labels = _encode_less(tokenizer, item.query(tokenizer, chat_format), item.answer, sys.maxsize,
                                   special=chat_format != "template")
        if len(ids) <= max_length:
            n_prompt = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
            meta = {"k_shot": len(spec.items) - 1 - spec.items.index(item)} if spec.multiple_choice else {}
            return EvalExample(spec.id, spec.subtask, ids, n_prompt, spec.target,
                               choices if spec.multiple_choice else (), meta)
    return None


def load_eval_task(
    task: str,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    config: EvalConfig = EvalConfig(),
    read: ReadConfig = ReadConfig(),
) -> tuple[list[EvalExample], list[str]]:
    """A task's evaluation examples (in round-robin subtask order) and what was left out, as lines.

    `task`: "mmlu" or "bbh" (need `data_dir`, LESS's layout), or the path of a JSONL file.
    `config` picks the shots, subtasks and limit; `read` the prompt format and `max_length`
    (examples longer than it are left out), and whether malformed JSONL lines are skipped.

    Example:
        examples, skipped = load_eval_task("mmlu", tokenizer, "../shared/data", EvalConfig(limit=200))
    """
    skipped: list[str] = []
    if task in EVAL_TASKS:
        if data_dir is None:
            raise EvalError(f"task {task!r} needs data_dir (LESS's layout, with eval/{task}/)")
        specs = _mmlu(Path(data_dir), config.k_shot) if task == "mmlu" else _bbh(Path(data_dir))
    elif task == "tydiqa":
        raise EvalError("tydiqa has no held-out split in LESS's data (only the 9 one-shot examples a selection"
                        " targets); give a JSONL file of prompt/answer records instead")
    elif task.endswith(".jsonl") or Path(task).is_file():
        specs = _jsonl(Path(task), read.skip_invalid, skipped)
    else:
        raise EvalError(f"unknown task {task!r}: give {' or '.join(EVAL_TASKS)}, or a JSONL file of"
                        " prompt/answer records")
    if config.subtasks:
        wanted, have = set(config.subtasks), {s.subtask for s in specs}
        if wanted - have:
            raise EvalError(f"{task}: no subtask {', '.join(sorted(wanted - have))}; it has "
                            f"{', '.join(sorted(have))}")
        specs = [s for s in specs if s.subtask in wanted]
    specs = _round_robin(specs, config.limit or len(specs))
    choices = tuple(tokenizer.encode(" " + c, add_special_tokens=False)[-1] for c in LETTERS)
    examples = []
    for spec in specs:
        ex = _tokenize(spec, tokenizer, read.chat_format, read.max_length, choices)
        if ex is None:
            skipped.append(f"{spec.where}: longer than max_length {read.max_length} tokens")
        else:
            examples.append(ex)
    return examples, skipped


# ---------------------------------------------------------------------------------------------
# scoring


def score(model, example: EvalExample) -> dict:
    """One forward pass: the answer's mean per-token NLL and, for multiple choice, `correct`."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, example.n_prompt - 1:-1].float()
    answer = ids[0, example.n_prompt:]
    logp = torch.log_softmax(logits, dim=-1)
    out = {"nll": float(-logp.gather(1, answer[:, None]).mean()), "n_answer_tokens": len(answer)}
    if example.choices:
        pick = int(logits[0, list(example.choices)].argmax())
        out["correct"] = example.choices[pick] == int(answer[0])
    return out


def generate(model, tokenizer, example: EvalExample, max_new_tokens: int) -> str:
    """A greedy continuation of the prompt, cut at the first blank line."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids[:example.n_prompt]], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, stop_strings=[_STOP], tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split(_STOP, 1)[0]


def evaluate(model, examples: Sequence[EvalExample], tokenizer=None, max_new_tokens: int = EvalConfig.max_new_tokens,
             progress: bool = True) -> Iterator[dict]:
    """One record per example: id, subtask, nll, n_answer_tokens, and `correct` (multiple choice)
    or `exact_match` and `prediction` (a target, a tokenizer and max_new_tokens > 0)."""
    from tqdm.auto import tqdm

    model.eval()
    for ex in tqdm(examples, desc="eval", unit="ex", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        record = {"id": ex.id, "subtask": ex.subtask, **score(model, ex), **ex.meta}
        if ex.target and not ex.choices and tokenizer is not None and max_new_tokens > 0:
            record["prediction"] = generate(model, tokenizer, ex, max_new_tokens)
            record["exact_match"] = exact_match(record["prediction"], ex.target)
        yield record


def summarize(records: Iterable[dict], task: str) -> list[dict]:
    """Per subtask (sorted) then overall: n, and the means of nll, accuracy, exact_match."""
    records = list(records)
    groups = {name: [r for r in records if r["subtask"] == name] for name in sorted({r["subtask"] for r in records})}
    rows = []
    for name, rs in [*groups.items(), ("overall", records)]:
        row = {"task": task, "subtask": name, "n": len(rs), "nll": math.fsum(r["nll"] for r in rs) / max(1, len(rs))}
        for metric, key in (("accuracy", "correct"), ("exact_match", "exact_match")):
            if rs and key in rs[0]:
                row[metric] = sum(bool(r[key]) for r in rs) / len(rs)
        rows.append(row)
    return rows


def evaluate_files(task: str, source: ModelSource, adapter: str | os.PathLike | None = None,
                   config: EvalConfig = EvalConfig(), read: ReadConfig = ReadConfig(), *,
                   data_dir: str | os.PathLike | None = None, progress: bool = True):
    """Load the model (+ `adapter`: a LoRA folder or a `train` run), read the task, evaluate.

    `source` is a `qless.model.ModelSource`; `config` and `read` are `load_eval_task`'s.
    Returns (per-example records, skipped lines).
    """
    from qless.model import load_adapter, load_tokenizer
    from qless.train import final_adapter

    tokenizer = load_tokenizer(source.name_or_path)
    examples, skipped = load_eval_task(task, tokenizer, data_dir, config, read)
    folder = final_adapter(adapter) if adapter is not None else None
    model = source.load()
    if folder is not None:
        model = load_adapter(model, folder)
    return list(evaluate(model, examples, tokenizer, config.max_new_tokens, progress)), skipped
