"""Target tasks: validation examples built exactly as LESS's ``get_validation_dataset.py``.

Built-in tasks (`TASKS`) read LESS's ``data_dir`` layout:
- ``mmlu``: ``eval/mmlu/dev/<subject>_dev.csv``; the 5 dev questions of each of the 57 subjects
  (285 rows), subject order sorted, subtask = subject, id ``mmlu/<subject>/<i>``.
- ``bbh``: ``eval/bbh/bbh-three-shot.json``; for each of the 27 tasks (file order) each of its
  3 shots is a target with the other two as demonstrations (81 rows), subtask = task.
- ``tydiqa``: ``eval/tydiqa/tydiqa-one-shot.json`` (LESS's path) or
  ``eval/tydiqa/dev/tydiqa-one-shot.json``; one row per language (9), subtask = language.

Prompt formats (``chat_format``): ``"tulu"`` (LESS's default, used by its scripts):
``<|user|>\\n{prompt}\\n<|assistant|>\\n{answer prefix}``; ``"plain"`` (LESS's
``use_chat_format=False``); ``"template"``: the tokenizer's chat template around the same user
text, followed by the answer prefix. Tokenized as LESS's ``tokenize``: ``encode(query)`` and
``encode(query + answer)`` with the tokenizer's special tokens, truncated to ``max_length``;
the first ``len(encode(query))`` labels are -100. No EOS is appended (LESS appends none).

A task may also come from a JSONL file (``path=``): records in any pool format (see
`qless.data`) with a ``subtask`` field; when records carry a ``task`` field, only those whose
``task`` equals the requested name are read. The demo tasks ship with the package
(`DEMO_TASKS`, read from `DEMO_TASKS_FILE` when no path is given).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from qless.config import ReadConfig
from qless.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    ReadReport,
    _iter_examples,
)

TASKS = ("mmlu", "bbh", "tydiqa")
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_POOL_FILE = DEMO_DIR / "pool.jsonl"
DEMO_TASKS_FILE = DEMO_DIR / "tasks.jsonl"
DEMO_TASKS = ("demo-mmlu", "demo-bbh", "demo-tydiqa")
TASK_CHAT_FORMATS = ("tulu", "plain", "template")

# LESS's copy of open-instruct's TyDiQA templates: (instruction, passage, question, answer).
TYDIQA_TEMPLATES = {
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "arabic": (
        "أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
        "المقطع:",
        "السؤال:",
        "الإجابة:",
    ),
    "bengali": (
        "প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
        "অধ্যায়:",
        "প্রশ্ন:",
        "উত্তর:",
    ),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": (
        "Ответьте на следующий вопрос на основе информации в данном отрывке.",
        "Отрывок:",
        "Вопрос:",
        "Ответ:",
    ),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


class TaskDataError(DataError, FileNotFoundError):
    "A built-in task's files are missing from the data directory."

    def __init__(self, path: Path, what: str):
        super().__init__(str(path), what)


# ---------------------------------------------------------------------------------------------
# one validation item before tokenization


class _Item:
    """A LESS validation example: ``user`` text, ``prefix`` that opens the answer, ``answer``.

    ``plain`` is LESS's query for ``use_chat_format=False`` (task-specific).
    """

    __slots__ = (
        "answer",
        "file",
        "index",
        "line",
        "offset",
        "plain",
        "prefix",
        "subtask",
        "task",
        "user",
        "where",
    )

    def __init__(
        self, task, subtask, index, user, prefix, answer, plain, file, offset, line, where
    ):
        self.task, self.subtask, self.index = task, subtask, index
        self.user, self.prefix, self.answer, self.plain = user, prefix, answer, plain
        self.file, self.offset, self.line, self.where = file, offset, line, where

    def query(self, tokenizer, chat_format: str) -> str:
        if chat_format == "tulu":
            return "<|user|>\n" + self.user + "\n<|assistant|>\n" + self.prefix
        if chat_format == "plain":
            return self.plain
        messages = [{"role": "user", "content": self.user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self.prefix


def _mmlu_items(data_dir: Path) -> list[_Item]:
    dev = data_dir / "eval" / "mmlu" / "dev"
    # LESS lists subjects from eval/mmlu/test/*_test.csv and reads their dev files; we list the
    # dev files themselves (the same 57 subjects in LESS's data) so test/ is not required.
    subjects = mmlu_subjects(dev, "dev")
    items = []
    for subject in subjects:
        path = dev / f"{subject}_dev.csv"
        for i, (row, offset, line) in enumerate(_csv_records(path)[:5]):
            if len(row) < 3:
                raise DataError(
                    f"{path}:{line}", f"expected question, choices, answer; got {len(row)} fields"
                )
            prompt = mmlu_header(subject) + mmlu_question(row)
            items.append(
                _Item(
                    "mmlu",
                    subject,
                    i,
                    prompt,
                    "The answer is:",
                    " " + row[-1],
                    prompt,
                    str(path),
                    offset,
                    line,
                    f"{path}:{line}",
                )
            )
    return items


def mmlu_subjects(folder: Path, split: str) -> list[str]:
    "The subjects of an MMLU split's folder (its ``<subject>_<split>.csv`` files), sorted."
    if not folder.is_dir():
        raise TaskDataError(folder, f"no such directory (mmlu needs eval/mmlu/{split}/<subject>_{split}.csv)")
    subjects = sorted(f[: -len(f"_{split}.csv")] for f in os.listdir(folder) if f.endswith(f"_{split}.csv"))
    if not subjects:
        raise TaskDataError(folder, f"no <subject>_{split}.csv files")
    return subjects


def mmlu_header(subject: str) -> str:
    "The first line of an MMLU prompt (LESS's ``format_subject``: hence the double space)."
    return "The following are multiple choice questions (with answers) about {}.\n\n".format(
        "".join(" " + w for w in subject.split("_"))
    )


def mmlu_question(row: list[str]) -> str:
    "A CSV row (question, choices..., answer) as open-instruct's ``format_example``, no answer."
    return row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row[1:-1])) + "\nAnswer:"


def _csv_records(path: Path) -> list[tuple[list[str], int, int]]:
    """(fields, byte offset, first physical line) of each CSV record (quoted fields may hold
    newlines). Fields stay strings: pandas would turn an all-numeric column into numbers, which
    no column of MMLU's dev files is (checked by a slow test)."""
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    starts = [0]
    for raw in lines:
        starts.append(starts[-1] + len(raw))
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    out, prev = [], 0
    for row in reader:
        first = prev + 1
        prev = reader.line_num
        if row:
            out.append((row, starts[first - 1], first))
    return out


def _bbh_items(data_dir: Path) -> list[_Item]:
    path = data_dir / "eval" / "bbh" / "bbh-three-shot.json"
    if not path.is_file():
        raise TaskDataError(path, "no such file (bbh needs LESS's bbh-three-shot.json)")
    prompts = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for task, few_shot in prompts.items():
        parts = few_shot.split("\n\n")
        shots, task_prompt = parts[-3:], "\n\n".join(parts[:-3])
        for i, target in enumerate(shots):
            where = f"{path} ({task} shot {i})"
            others = shots[:i] + shots[i + 1 :]
            icl = ""
            for ex in others:
                q, a = _split_shot(ex, where)
                icl += q + "\nA:" + a + "\n\n"
            question, answer = _split_shot(target, where)
            user = task_prompt.strip() + "\n\n" + icl + question
            plain = task_prompt.strip() + "\n\n" + question + "\nA:"  # LESS drops the ICL here
            items.append(_Item("bbh", task, i, user, "A:", answer, plain, str(path), -1, 0, where))
    return items


def _split_shot(shot: str, where: str) -> tuple[str, str]:
    parts = shot.split("\nA:")
    if len(parts) != 2:
        raise DataError(where, "a shot must hold exactly one '\\nA:'")
    return parts[0], parts[1]


def _tydiqa_items(data_dir: Path, zh: bool = False) -> list[_Item]:
    name = "tydiqa-one-shot-zh.json" if zh else "tydiqa-one-shot.json"
    candidates = [data_dir / "eval" / "tydiqa" / name, data_dir / "eval" / "tydiqa" / "dev" / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise TaskDataError(candidates[0], f"no such file (nor {candidates[1]})")
    examples = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for lang in examples:
        where = f"{path} ({lang})"
        if lang not in TYDIQA_TEMPLATES:
            raise DataError(where, f"unknown language {lang!r}")
        ex = examples[lang][0]
        prompt, p_t, q_t, a_t = TYDIQA_TEMPLATES[lang]
        if zh:
            prompt, p_t, q_t, a_t = (
                "根据所给文章中的信息回答以下问题。",
                "文章:",
                "问题:",
                "答案:",
            )
        prompt += (
            p_t + " " + format(ex["context"]) + "\n" + q_t + " " + format(ex["question"]) + "\n"
        )
        answer = " " + format(ex["answers"][0]["text"])
        # tulu: "<|user|>\n" + prompt + "<|assistant|>\n" + a_t; prompt ends with "\n".
        items.append(
            _Item(
                "tydiqa", lang, 0, prompt[:-1], a_t, answer, prompt + a_t, str(path), -1, 0, where
            )
        )
    return items


_BUILDERS: dict[str, Callable[[Path], list[_Item]]] = {
    "mmlu": _mmlu_items,
    "bbh": _bbh_items,
    "tydiqa": _tydiqa_items,
}


def _encode_less(tokenizer, query: str, answer: str, max_length: int, special: bool):
    "LESS's ``tokenize``: labels = full ids with the query's tokens masked."
    enc = {"max_length": max_length, "truncation": True, "add_special_tokens": special}
    query_ids = tokenizer(query, **enc)["input_ids"]
    input_ids = list(tokenizer(query + answer, **enc)["input_ids"])
    labels = list(input_ids)
    labels[: len(query_ids)] = [IGNORE_INDEX] * len(labels[: len(query_ids)])
    return input_ids, labels


def _tokenize_items(items, tokenizer, max_length, chat_format) -> list[Example]:
    out = []
    for it in items:
        query = it.query(tokenizer, chat_format)
        input_ids, labels = _encode_less(
            tokenizer, query, it.answer, max_length, special=chat_format != "template"
        )
        n_resp = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_resp == 0:
            raise DataError(
                it.where, f"no response tokens left after truncation to {max_length} tokens"
            )
        meta = {
            "source": it.task,
            "task": it.task,
            "tokens": len(input_ids),
            "n_response_tokens": n_resp,
        }
        out.append(
            Example(
                f"{it.task}/{it.subtask}/{it.index}",
                input_ids,
                labels,
                str(Path(it.file).resolve()),
                it.offset,
                it.line,
                it.subtask,
                meta,
            )
        )
    return out


def task_prompts(
    name: str, data_dir: str | os.PathLike, tokenizer=None, chat_format: str = ReadConfig.chat_format
) -> list[tuple[str, str, str]]:
    """(id, query, answer) text of a built-in task, before tokenization (for inspection)."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; built-ins: {', '.join(TASKS)}")
    items = _BUILDERS[name](Path(data_dir))
    return [
        (f"{it.task}/{it.subtask}/{it.index}", it.query(tokenizer, chat_format), it.answer)
        for it in items
    ]


def load_task(
    name: str,
    tokenizer,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    max_length: int = ReadConfig.max_length,
    chat_format: str = ReadConfig.chat_format,
) -> list[Example]:
    """A target task's validation examples, each with ``subtask`` set.

    Built-ins (`TASKS`) need ``data_dir`` (LESS's layout, e.g. ``../shared/data``). With ``path``
    (or a name in `DEMO_TASKS`), the task is read from JSONL like a pool. ``chat_format`` defaults
    to the pools' (`ReadConfig.chat_format`), so a pool and its tasks share one prompt format.

    Example:
        mmlu = load_task("mmlu", tokenizer, data_dir="../shared/data")   # 285 examples
        demo = load_task("demo-bbh", tokenizer)                            # packaged demo task
    """
    if path is None and name in DEMO_TASKS:
        path = DEMO_TASKS_FILE
    if path is not None:
        report = ReadReport()
        examples = list(
            _iter_examples(
                path, tokenizer, max_length, False, chat_format, report, task=name
            )
        )
        if not examples:
            raise DataError(str(path), f"no records for task {name!r}")
        return examples
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}: built-ins are {', '.join(TASKS)} (demo: {', '.join(DEMO_TASKS)}); "
            "pass path= for a JSONL task"
        )
    if data_dir is None:
        raise ValueError(f"task {name!r} needs data_dir (LESS's layout, with eval/{name}/)")
    if chat_format not in TASK_CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {TASK_CHAT_FORMATS}, not {chat_format!r}")
    if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_format='template' but the tokenizer has no chat template")
    return _tokenize_items(_BUILDERS[name](Path(data_dir)), tokenizer, max_length, chat_format)
