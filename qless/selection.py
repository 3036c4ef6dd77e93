"""Write selected records back out as JSONL, byte-identical to the input lines.

Each selected row names its record by ``source_file`` + byte ``offset`` (as `qless.data.Example`
carries and the store keeps in row metadata). Before a line is copied it is checked to still be
that record: the offset must start a line, and the line must parse to the row's ``id`` (the
record's ``id`` field or its content hash) and, when the row has one, match its ``line_sha1``
(the sha1 `qless.data` records in each example's metadata). A row needs at least one of the two.
A file changed since it was read is refused rather than silently writing other records.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from qless.data import Example, line_sha1, load_line, record_id


class SourceChangedError(ValueError):
    "A selected row's source file no longer holds that record at that offset."


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Example):
        return getattr(row, name) if name != "line_sha1" else row.metadata.get(name)
    if not isinstance(row, Mapping):
        raise TypeError(f"a selected row must be a dict or an Example, not {type(row).__name__}")
    if name in row:
        return row[name]
    meta = row.get("metadata")
    if isinstance(meta, Mapping):
        return meta.get(name)
    return None


def read_record_line(f, path: str, offset: int, rid: str | None, sha: str | None) -> bytes:
    """The raw line (with its line ending) that starts at ``offset`` of the open binary file ``f``,
    verified against the row's id and line hash."""
    where = f"{path}: byte offset {offset}"
    who = "the selected record" if rid is None else f"record {rid!r}"
    if not isinstance(offset, int) or offset < 0:
        raise SourceChangedError(f"{where}: not a JSONL line offset for {who}")
    if offset >= os.fstat(f.fileno()).st_size:
        raise SourceChangedError(
            f"{where} is past the end of the file; the file changed since {who} was read"
        )
    if offset > 0:
        f.seek(offset - 1)
        if f.read(1) != b"\n":
            raise SourceChangedError(
                f"{where} no longer starts a line; {who} moved (the file changed since it was read)"
            )
    f.seek(offset)
    raw = f.readline()
    if rid is None and sha is None:
        raise SourceChangedError(f"{where}: the row has neither an id nor a line_sha1 to check")
    try:
        found = record_id(load_line(raw, first=offset == 0))
    except ValueError as e:
        raise SourceChangedError(f"{where}: no longer {who} ({e})") from None
    if rid is not None and found != rid:
        raise SourceChangedError(
            f"{where} now holds record {found!r}, not {who} (the file changed since it was read)"
        )
    if sha is not None and line_sha1(raw) != sha:
        raise SourceChangedError(
            f"{where}: the line differs from {who} as read (the file changed since it was read)"
        )
    return raw


def write_selected(rows: Iterable[Mapping | Example], out_path: str | os.PathLike) -> int:
    """Copy each row's original line, in the given order, to ``out_path``; return the count.

    Lines are copied byte for byte (their LF or CRLF included); a last line that had no newline
    gets ``\\n`` so the output stays one record per line. The output is written to a temporary
    file and renamed into place, so a refused selection leaves no partial file.

    Example:
        result = store.query("TOP 5% FROM train BY mmlu")
        rows = {r["id"]: r for r in store.rows("train")}
        write_selected([rows[i] for i in result.ids], "selected.jsonl")
    """
    out_path = Path(out_path)
    n = 0
    with ExitStack() as stack:
        files: dict[str, Any] = {}
        tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below; renamed or removed)
            "wb",
            dir=out_path.parent or ".",
            prefix=out_path.name + ".",
            suffix=".tmp",
            delete=False,
        )
        try:
            with tmp:
                for row in rows:
                    src = _field(row, "source_file")
                    if not src:
                        raise ValueError(f"selected row {n + 1} has no source_file")
                    rid = _field(row, "id")
                    if src not in files:
                        try:
                            files[src] = stack.enter_context(open(src, "rb"))
                        except FileNotFoundError:
                            raise SourceChangedError(
                                f"{src}: no such file (source of record {rid!r})"
                            ) from None
                    raw = read_record_line(
                        files[src],
                        src,
                        _field(row, "offset"),
                        None if rid is None else str(rid),
                        _field(row, "line_sha1"),
                    )
                    tmp.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    n += 1
            os.chmod(tmp.name, 0o644)  # mkstemp's 0600 would outlive the rename
            os.replace(tmp.name, out_path)
        except BaseException:
            os.unlink(tmp.name)
            raise
    return n
