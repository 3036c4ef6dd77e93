"""Training pools: JSONL records -> tokenized `Example`s with response-only labels.

Formats (one JSON object per line, detected per record):
- LESS / open-instruct ``messages``: ``[{"role": "system"|"user"|"assistant", "content": ...}]``
- LESS ``prompt`` / ``completion``: raw text, tokenized exactly as LESS's
  ``encode_with_prompt_completion_format`` (a space between them when neither side has one,
  EOS appended, prompt tokens masked); no chat formatting is applied to this format.
- Alpaca ``instruction`` / ``input`` / ``output``: read as one user turn
  (``instruction`` + ``"\\n\\n" + input`` when input is non-empty) and one assistant turn.

Chat formatting of messages (``chat_format``):
- ``"template"``: the tokenizer's own chat template;
- ``"tulu"`` (the default, `ReadConfig.chat_format`, as LESS): ``concat_messages``
  (``<|user|>\\n...\\n<|assistant|>\\n...EOS\\n``);
- ``"auto"``: the template when the tokenizer has one, else tulu.
Either way labels are masked as LESS's ``encode_with_messages_format`` does: every token of a
non-assistant message, including the next assistant header, is -100; what is left is each
assistant reply plus its end-of-turn marker (EOS + newline for tulu, ``<|im_end|>\\n`` for ChatML).
Message contents are stripped in both formats, as LESS's ``concat_messages`` does.

Ids are the record's ``id`` field, else the sha1 of the record's canonical JSON, so an example
keeps its id wherever its line moves. Bad lines raise `DataError` (``file.jsonl:17: reason``),
or with ``skip_invalid=True`` are skipped and listed in a `ReadReport`. A pool record whose
prompt fills ``max_length`` is valid but leaves no response token: it is always skipped and
listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qless.config import ReadConfig

IGNORE_INDEX = -100
CHAT_FORMATS = ("auto", "template", "tulu")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    "A record of a data file is not a usable example (the message names file:line)."

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


class ResponseTruncatedError(ValueError):
    "Truncation to max_length left a valid record no response token to learn from."


@dataclass(frozen=True)
class Example:
    """One tokenized example: what the readers yield and ingest turns into one store row.

    For records read from JSONL, ``offset``/``line`` locate the record's line. Task examples built
    from a JSON file (bbh, tydiqa) have ``offset = -1`` and ``line = 0``; mmlu rows carry the byte
    offset and first physical line of their CSV record.
    """

    id: str  # the record's "id", else its content hash: never a line index
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on every non-response token
    source_file: str  # absolute path
    offset: int  # byte offset of the record's line in source_file
    line: int  # 1-based line number
    subtask: str | None = None  # task rows: the mmlu subject, bbh task or tydiqa language
    metadata: dict = field(default_factory=dict)  # JSON-safe: source, category, tokens, ...

    def to_row(self) -> dict:
        """The row metadata the store keeps: everything but the token lists (JSON-safe)."""
        row = {
            "id": self.id,
            "source_file": self.source_file,
            "offset": self.offset,
            "line": self.line,
        }
        if self.subtask is not None:
            row["subtask"] = self.subtask
        row.update(self.metadata)
        return row


@dataclass(frozen=True)
class Skipped:
    "One line left out: malformed (under ``skip_invalid``) or truncated to no response."

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ReadReport:
    "What a read kept and what it skipped; print `summary()` at the end of a run."

    n_records: int = 0  # non-blank lines seen
    n_examples: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 20) -> str:
        head = f"read {self.n_examples} examples from {self.n_records} records"
        if not self.skipped:
            return head + ", none skipped"
        lines = [f"{head}, skipped {self.n_skipped}:"]
        lines += [f"  {s}" for s in self.skipped[:limit]]
        if self.n_skipped > limit:
            lines.append(f"  ... and {self.n_skipped - limit} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# records


def content_hash(record: dict) -> str:
    "sha1 of the record's canonical JSON (sorted keys, no spaces, UTF-8)."
    canon = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canon.encode("utf-8")).hexdigest()


def record_id(record: dict) -> str:
    "The record's ``id`` field (str or int), else its content hash. Raises ValueError if bad."
    if "id" not in record:
        return content_hash(record)
    rid = record["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise ValueError("'id' must be a non-empty string or an integer")
    return str(rid)


@dataclass(frozen=True)
class _Parsed:
    kind: str  # "messages" | "prompt_completion"
    fmt: str  # the record's format: "messages" | "prompt_completion" | "alpaca"
    messages: tuple[dict, ...] = ()
    prompt: str = ""
    completion: str = ""


def _parse(record: Any) -> _Parsed:
    """Validate a record and normalize it; raises ValueError(reason)."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 (a data error, reported as DataError)
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs, 1):
            if not isinstance(m, dict):
                raise ValueError(f"message {i} is not an object")  # noqa: TRY004
            if m.get("role") not in ROLES:
                raise ValueError(f"message {i}: unknown role {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: 'content' must be a string")  # noqa: TRY004
        answers = [i for i, m in enumerate(msgs, 1) if m["role"] == "assistant"]
        if not answers:
            raise ValueError("no response (no assistant message)")
        for i in answers:
            if not msgs[i - 1]["content"].strip():
                raise ValueError(f"empty response (message {i})")
        return _Parsed(
            "messages",
            "messages",
            tuple({"role": m["role"], "content": m["content"]} for m in msgs),
        )
    if "prompt" in record or "completion" in record:
        if "completion" not in record:
            raise ValueError("no response ('prompt' without 'completion')")
        prompt, completion = record.get("prompt"), record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must be strings")
        if not completion.strip():
            raise ValueError("empty response ('completion')")
        return _Parsed(
            "prompt_completion", "prompt_completion", prompt=prompt, completion=completion
        )
    if "instruction" in record or "output" in record:
        if "output" not in record:
            raise ValueError("no response ('instruction' without 'output')")
        instr, inp, out = record.get("instruction"), record.get("input") or "", record["output"]
        if not isinstance(instr, str) or not isinstance(inp, str) or not isinstance(out, str):
            raise ValueError("'instruction', 'input' and 'output' must be strings")
        if not out.strip():
            raise ValueError("empty response ('output')")
        user = instr + "\n\n" + inp if inp else instr  # open-instruct's Alpaca conversion
        return _Parsed(
            "messages",
            "alpaca",
            ({"role": "user", "content": user}, {"role": "assistant", "content": out}),
        )
    raise ValueError(
        "unknown format: expected 'messages', 'prompt'/'completion' or 'instruction'/'output'"
    )


# ---------------------------------------------------------------------------------------------
# tokenization (LESS's encode functions)


def resolve_chat_format(tokenizer, chat_format: str = "auto") -> str:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, not {chat_format!r}")
    if chat_format == "auto":
        return "template" if getattr(tokenizer, "chat_template", None) else "tulu"
    if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_format='template' but the tokenizer has no chat template")
    return chat_format


def concat_messages_tulu(messages: Iterable[dict], eos_token: str) -> str:
    "LESS's ``concat_messages``."
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += "<|system|>\n" + m["content"].strip() + "\n"
        elif m["role"] == "user":
            text += "<|user|>\n" + m["content"].strip() + "\n"
        else:
            text += "<|assistant|>\n" + m["content"].strip() + eos_token + "\n"
    return text


def _ids(tokenizer, text: str, max_length: int, special: bool) -> list[int]:
    return list(
        tokenizer(text, max_length=max_length, truncation=True, add_special_tokens=special)[
            "input_ids"
        ]
    )


def encode_messages(
    messages: list[dict] | tuple[dict, ...], tokenizer, max_length: int, chat_format: str
) -> tuple[list[int], list[int]]:
    """LESS's ``encode_with_messages_format``; with a chat template, its turns replace tulu's."""
    fmt = resolve_chat_format(tokenizer, chat_format)
    messages = list(messages)
    if fmt == "tulu":
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token (needed by the tulu chat format)")

        def render(msgs: list[dict], assistant_next: bool) -> str:
            return concat_messages_tulu(msgs, eos) + ("<|assistant|>\n" if assistant_next else "")

        special = True  # LESS tokenizes with the tokenizer's default special tokens (BOS)
    else:
        # Contents are stripped as LESS's concat_messages strips them; this also keeps a reply's
        # leading whitespace from merging into the masked header token ("\n" + "  x" -> "\n ").
        messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]

        def render(msgs: list[dict], assistant_next: bool) -> str:
            if not msgs:
                return ""
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=assistant_next
            )

        special = False  # the template writes its own BOS if the model wants one

    input_ids = _ids(tokenizer, render(messages, False), max_length, special)
    labels = list(input_ids)
    for idx, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = (
            0
            if idx == 0
            else len(_ids(tokenizer, render(messages[:idx], False), max_length, special))
        )
        assistant_next = idx + 1 < len(messages) and messages[idx + 1]["role"] == "assistant"
        end = len(_ids(tokenizer, render(messages[: idx + 1], assistant_next), max_length, special))
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= max_length:
            break
    return input_ids, labels


def encode_prompt_completion(
    prompt: str, completion: str, tokenizer, max_length: int
) -> tuple[list[int], list[int]]:
    "LESS's ``encode_with_prompt_completion_format``."
    if not prompt.endswith((" ", "\n", "\t")) and not completion.startswith((" ", "\n", "\t")):
        text = prompt + " " + completion
    else:
        text = prompt + completion
    text += tokenizer.eos_token or ""
    input_ids = _ids(tokenizer, text, max_length, True)
    n_prompt = len(_ids(tokenizer, prompt, max_length, True))
    labels = [IGNORE_INDEX] * min(n_prompt, len(input_ids)) + input_ids[n_prompt:]
    return input_ids, labels


def encode_record(
    record: dict, tokenizer, max_length: int = ReadConfig.max_length,
    chat_format: str = ReadConfig.chat_format,
) -> tuple[list[int], list[int]]:
    """Tokenize one record; raises ValueError(reason) for a bad record or no response left."""
    return _encode(_parse(record), tokenizer, max_length, chat_format)


def _encode(
    parsed: _Parsed, tokenizer, max_length: int, chat_format: str
) -> tuple[list[int], list[int]]:
    if parsed.kind == "messages":
        input_ids, labels = encode_messages(parsed.messages, tokenizer, max_length, chat_format)
    else:
        input_ids, labels = encode_prompt_completion(
            parsed.prompt, parsed.completion, tokenizer, max_length
        )
    if all(label == IGNORE_INDEX for label in labels):
        raise ResponseTruncatedError(f"no response tokens left after truncation to {max_length} tokens")
    return input_ids, labels


# ---------------------------------------------------------------------------------------------
# files


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    "(1-based line, byte offset, raw bytes with newline) for each line of a file."
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, offset, raw
            offset += len(raw)


def _decode_line(raw: bytes, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    if first and text.startswith("\ufeff"):
        text = text[1:]
    return text


def load_line(raw: bytes, first: bool = False) -> dict:
    "Decode and parse one JSONL line; raises ValueError(reason)."
    text = _decode_line(raw, first)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004
    return record


def line_sha1(raw: bytes) -> str:
    "sha1 of a line's bytes without its line ending (so LF/CRLF do not matter)."
    return hashlib.sha1(raw.rstrip(b"\r\n")).hexdigest()


def _iter_examples(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    max_length: int,
    skip_invalid: bool,
    chat_format: str,
    report: ReadReport,
    task: str | None = None,
) -> Iterator[Example]:
    """The reader behind `iter_pool` and JSONL tasks.

    With ``task`` set, records whose ``task`` field names another task are passed over and each
    kept record must carry a string ``subtask``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolve_chat_format(tokenizer, chat_format)  # fail before reading anything
    seen: dict[str, tuple[str, int, bool]] = {}
    for path in paths:
        name = str(path)
        source_file = str(Path(path).resolve())
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}: no such file")
        stem = Path(path).stem
        for line, offset, raw in _lines(Path(path)):
            if not raw.strip():
                continue  # blank lines are not records
            report.n_records += 1
            try:
                record = load_line(raw, first=line == 1)
                if task is not None and "task" in record and record["task"] != task:
                    report.n_records -= 1  # another task's record
                    continue
                rid = record_id(record)
                subtask = None
                if task is not None:
                    subtask = record.get("subtask")
                    if not isinstance(subtask, str) or not subtask:
                        raise ValueError("missing 'subtask' (a non-empty string)")
                parsed = _parse(record)
                if rid in seen:
                    fname, fline, hashed = seen[rid]
                    if hashed:
                        raise ValueError(f"duplicate record (same content as {fname}:{fline})")
                    raise ValueError(f"duplicate id {rid!r} (first at {fname}:{fline})")
                input_ids, labels = _encode(parsed, tokenizer, max_length, chat_format)
            except ValueError as e:
                # A prompt that fills max_length is valid data with nothing left to learn (a real
                # Dolly row with a 9,012-character context at 2,048 tokens): a pool skips and
                # lists it unasked; a task keeps every row or stops, so its subtasks stay whole.
                truncated = task is None and isinstance(e, ResponseTruncatedError)
                if not (skip_invalid or truncated):
                    raise DataError(f"{name}:{line}", str(e)) from None
                report.skipped.append(Skipped(name, line, str(e)))
                continue
            seen[rid] = (name, line, "id" not in record)
            meta: dict[str, Any] = {"source": record.get("source", stem)}
            if "category" in record:
                meta["category"] = record["category"]
            meta["format"] = parsed.fmt
            meta["tokens"] = len(input_ids)
            meta["n_response_tokens"] = sum(1 for x in labels if x != IGNORE_INDEX)
            meta["line_sha1"] = line_sha1(raw)
            if task is not None:
                meta["task"] = task
            report.n_examples += 1
            yield Example(rid, input_ids, labels, source_file, offset, line, subtask, meta)


def iter_pool(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    max_length: int = ReadConfig.max_length,
    skip_invalid: bool = False,
    chat_format: str = ReadConfig.chat_format,
    report: ReadReport | None = None,
) -> Iterator[Example]:
    """Stream a pool's examples in file and line order; skipped lines go to ``report``."""
    return _iter_examples(
        paths,
        tokenizer,
        max_length,
        skip_invalid,
        chat_format,
        report if report is not None else ReadReport(),
    )


def read_pool(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    max_length: int = ReadConfig.max_length,
    skip_invalid: bool = False,
    chat_format: str = ReadConfig.chat_format,
) -> tuple[list[Example], ReadReport]:
    """Read one or more JSONL files into examples (file and line order) and a report.

    Example:
        examples, report = read_pool(["dolly_00.jsonl"], tokenizer, skip_invalid=True)
        ...
        print(report.summary(), file=sys.stderr)
    """
    report = ReadReport()
    examples = list(iter_pool(paths, tokenizer, max_length, skip_invalid, chat_format, report))
    return examples, report


def sample_fraction(examples: list, percentage: float, seed: int = 0) -> list:
    """LESS's warmup subset (``load_raw_dataset``): ``int(n * percentage)`` items.

    ``percentage`` is a fraction in (0, 1] as in LESS (0.05 = 5%). Deterministic for a seed and
    identical to LESS's choice: ``np.random.seed(seed); np.random.permutation(n)[:k]``, kept in
    that permuted order; the whole list (unshuffled) when k == n.
    """
    if not 0 < percentage <= 1:
        raise ValueError(f"percentage must be a fraction in (0, 1], not {percentage!r}")
    examples = list(examples)
    k = int(len(examples) * percentage)
    if k == len(examples):
        return examples
    index = np.random.RandomState(seed).permutation(len(examples))[:k]
    return [examples[i] for i in index]
