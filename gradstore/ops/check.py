"""check and fix: verify a store against its format, and keep what verifies.

`check` verifies every block (framing, crc32), that blocks cover exactly the rows `written`
says, that every row metadata chunk is whole and no id repeats; with `fix` it keeps what
verifies and drops the rest, saying what it dropped.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..env import used_bytes
from ..errors import CorruptStoreError
from ..format import (
    DATA_FILE,
    ROW_CHUNK,
    block_key,
    chunk_key,
    chunk_set_id,
    decode_rows,
    dumps,
    encode_block,
    encode_rows,
    encoding_key,
    parse_block_key,
    read_block,
)
from ..staging import Staging
from .progress import progress_bar


@dataclass(frozen=True)
class Finding:
    """One problem: where (set/checkpoint/encoding/block) and what."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # what fix removed, one line each
    blocks: int = 0  # blocks verified

    @property
    def ok(self) -> bool:
        return not self.findings


def check(store, fix: bool = False, progress: Callable | None = None) -> CheckReport:
    """Verify the store; with `fix`, keep what verifies and drop the rest (listed in `dropped`).

    A bad block (missing, wrong framing or checksum, wrong row count) makes its rows and every
    later row of that (set, checkpoint) untrustworthy: fix cuts `written` back to the first
    bad row, for every encoding, so the store stays one consistent prefix per checkpoint and a
    resumed ingest recomputes exactly what was dropped. Orphan blocks (a killed requantize
    leaves some) and orphan rows are deleted. Do not run fix while another process writes the
    store.
    """
    staging = Staging(store, write=fix)
    report = CheckReport()
    data = os.path.join(store.path, DATA_FILE)
    need = used_bytes(store.env)
    size = os.path.getsize(data)
    if size < need:
        # Reading past the end of the mapped file would kill the process (SIGBUS).
        report.findings.append(Finding(data, f"truncated to {size} bytes, the database needs {need};"
                                       " restore it from a copy"))
        return report
    dbs = staging.dbs
    ckpt_names = store.checkpoint_names()
    recs = staging.set_records()
    plans = {}
    with store.env.begin(buffers=True) as txn:
        total = sum(-(-w // layout["block_rows"]) for rec in recs.values()
                    for w in rec["written"].values() for layout in rec["encodings"].values())
        bar = progress_bar(progress, total, "check")
        try:
            for name, rec in recs.items():
                plans[name] = _check_set(txn, dbs, name, rec, ckpt_names, report, bar)
        finally:
            bar.close()
        orphans = _check_orphans(txn, dbs, recs, plans, ckpt_names, report)
    if fix and (report.findings or orphans):
        staging.write(lambda t: _fix(t, dbs, recs, plans, orphans, ckpt_names, report))
    return report


def _check_set(txn, dbs, name, rec, ckpt_names, report, bar) -> dict:
    set_id, n_rows = rec["id"], rec["n_rows"]
    ids: list[str] = []
    for chunk in range(-(-n_rows // ROW_CHUNK)):
        raw = txn.get(chunk_key(set_id, chunk), db=dbs["rows"])
        try:
            records = decode_rows(raw) if raw is not None else []
            chunk_ids = [r["id"] for r in records]
        except (ValueError, KeyError, TypeError, zlib.error):
            chunk_ids = []
        expected = min(ROW_CHUNK, n_rows - chunk * ROW_CHUNK)
        if len(chunk_ids) != expected:
            break
        ids.extend(chunk_ids)
    valid_rows = len(ids)
    if valid_rows < n_rows:
        report.findings.append(Finding(f"set {name!r} rows {valid_rows}..{n_rows - 1}",
                                       f"metadata chunk {valid_rows // ROW_CHUNK} is missing or bad;"
                                       f" the set has {n_rows} rows"))
    first_seen: dict[str, int] = {}
    for row, row_id in enumerate(ids):
        if row_id in first_seen:  # the id holds only at its first row: the rest are not trusted
            report.findings.append(Finding(f"set {name!r} row {row}",
                                           f"id {row_id!r} repeats row {first_seen[row_id]}"))
            valid_rows = row
            break
        first_seen[row_id] = row
    good: dict[str, int] = {}
    trims: list[tuple[str, str, int]] = []  # (checkpoint, encoding, block) holding too many rows
    for c, w in rec["written"].items():
        where_c = f"set {name!r} checkpoint {c!r}"
        if c not in ckpt_names:
            report.findings.append(Finding(where_c, "written counts a checkpoint the store does not have"))
            good[c] = 0
            continue
        ci = ckpt_names.index(c)
        limit = min(w, valid_rows)
        if w > valid_rows:
            report.findings.append(Finding(where_c, f"written says {w} rows, the set holds {valid_rows}"))
        for enc, layout in rec["encodings"].items():
            br = layout["block_rows"]
            for b in range(-(-w // br)):
                where = f"{where_c} encoding {enc} block {b}"
                expected = min(br, w - b * br)
                bar.update(1)
                report.blocks += 1
                problem = None
                try:
                    blk = read_block(txn, dbs["blocks"], set_id, ci, enc, layout, b, where, verify=True)
                    if len(blk.scale) < expected:
                        problem = f"holds {len(blk.scale)} rows, expected {expected}"
                    elif len(blk.scale) > expected:
                        trims.append((c, enc, b))
                        report.findings.append(Finding(where, f"holds {len(blk.scale)} rows,"
                                                       f" written says {expected}"))
                except CorruptStoreError as exc:
                    problem = str(exc).split(": ")[-1]
                if problem:
                    report.findings.append(Finding(where, problem))
                    limit = min(limit, b * br)
                    break
        good[c] = limit
    return {"valid_rows": valid_rows, "good": good, "trims": trims}


def _check_orphans(txn, dbs, recs, plans, ckpt_names, report) -> list:
    """Blocks and rows nothing points at; grouped into one finding per (set, checkpoint, key)."""
    by_id = {rec["id"]: (name, rec) for name, rec in recs.items()}
    groups: dict[tuple, list[bytes]] = {}
    for k in txn.cursor(db=dbs["blocks"]).iternext(values=False):
        k = bytes(k)
        set_id, ci, key, b = parse_block_key(k)
        if set_id in by_id and ci < len(ckpt_names):
            name, rec = by_id[set_id]
            c = ckpt_names[ci]
            w = rec["written"].get(c, 0)
            if any(encoding_key(lay, e) == key and b < -(-w // lay["block_rows"])
                   for e, lay in rec["encodings"].items()):
                continue
        groups.setdefault((set_id, ci, key), []).append(k)
    orphans = []
    for (set_id, ci, key), keys in groups.items():
        name = repr(by_id[set_id][0]) if set_id in by_id else f"id {set_id}"
        ckpt = repr(ckpt_names[ci]) if ci < len(ckpt_names) else f"#{ci}"
        blocks = [parse_block_key(k)[3] for k in keys]
        report.findings.append(Finding(
            f"set {name} checkpoint {ckpt} encoding {key} blocks {min(blocks)}..{max(blocks)}",
            f"{len(keys)} orphan blocks that no record points at"))
        orphans.extend(keys)
    stray = [bytes(k) for k in txn.cursor(db=dbs["rows"]).iternext(values=False)
             if chunk_set_id(k) not in by_id]
    if stray:
        report.findings.append(Finding("rows", f"{len(stray)} metadata chunks of no set"))
        orphans.extend(("rows", k) for k in stray)
    return orphans


def _fix(txn, dbs, recs, plans, orphans, ckpt_names, report) -> None:
    report.dropped.clear()  # a retry after map growth starts over
    for key in orphans:
        db, key = key if isinstance(key, tuple) else ("blocks", key)
        txn.delete(key, db=dbs[db])
    if orphans:
        report.dropped.append(f"deleted {len(orphans)} orphan entries")
    for name, rec in recs.items():
        p = plans[name]
        set_id, valid = rec["id"], p["valid_rows"]
        rec = json.loads(json.dumps(rec))  # a retry must start from the original record
        if valid < rec["n_rows"]:
            chunk, at = divmod(valid, ROW_CHUNK)
            for c in range(chunk + (1 if at else 0), -(-rec["n_rows"] // ROW_CHUNK)):
                txn.delete(chunk_key(set_id, c), db=dbs["rows"])
            if at:  # the chunk at the new end keeps its first rows (verified good)
                kept = decode_rows(txn.get(chunk_key(set_id, chunk), db=dbs["rows"]))[:at]
                txn.put(chunk_key(set_id, chunk), encode_rows(kept), db=dbs["rows"])
            report.dropped.append(f"set {name!r}: rows {valid}..{rec['n_rows'] - 1} dropped (metadata lost)")
            rec["n_rows"] = valid
        trims = {(c, e) for c, e, _ in p["trims"]}
        for c, w in list(rec["written"].items()):
            new = p["good"][c]
            if c not in ckpt_names:
                del rec["written"][c]
                report.dropped.append(f"set {name!r}: dropped written count of unknown checkpoint {c!r}")
                continue
            if new == w and not any(tc == c for tc, _ in trims):
                continue
            ci = ckpt_names.index(c)
            for enc, layout in rec["encodings"].items():
                br = layout["block_rows"]
                key = encoding_key(layout, enc)
                for b in range(-(-new // br), -(-w // br)):
                    txn.delete(block_key(set_id, ci, key, b), db=dbs["blocks"])
                if new % br:  # the block at the new end keeps its first rows (verified good)
                    b = new // br
                    blk = read_block(txn, dbs["blocks"], set_id, ci, enc, layout, b, f"block {b}")
                    txn.put(block_key(set_id, ci, key, b), encode_block(blk.rows(0, new - b * br)),
                            db=dbs["blocks"])
            rec["written"][c] = new
            if new < w:
                report.dropped.append(f"set {name!r} checkpoint {c!r}: rows {new}..{w - 1} dropped"
                                      f" ({w - new} rows; a resumed ingest recomputes them)")
        txn.put(name.encode(), dumps(rec), db=dbs["sets"])
