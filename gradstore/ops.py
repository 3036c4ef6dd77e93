"""Store operations beyond ingest and query: merge, requantize, compare, check.

- ``merge(sources, out)``: combine stores computed separately (shards of one pool, or
  checkpoints) into a new store after checking that they are compatible. The new store is
  built in a temporary directory next to `out`, compacted, and renamed at the end, so a killed
  merge leaves nothing at `out` (the next merge to `out` removes its temporary directory);
  sources are opened read-only. Rows are copied in stored form, so
  quantized encodings make no lossy round trip.
- ``requantize(store, ...)``: derive lower encodings (per-row or ``-global``) from the float
  master without the model. Blocks are staged under a key nothing points at, then one
  transaction makes the encodings appear: readers never see half an encoding.
- ``compare(store, a, b, ...)``: how well two encodings or two queries agree: Spearman
  correlation of their scores over every row and the overlap of their top k.
- ``check(store, fix=False)``: verify every block (framing, crc32), that blocks cover exactly
  the rows `written` says, that every row metadata chunk is whole and no id repeats; ``fix``
  keeps what verifies and drops the rest, saying what it dropped.

Long operations take `progress`: a callable (total=, desc=) -> an object with update(n) and
close(), which tqdm fits; the default shows nothing. The library never prints.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import quant
from .encodings import parse_encoding
from .errors import (
    CorruptStoreError,
    DuplicateIdError,
    ReadOnlyError,
    SchemaMismatchError,
    StoreExistsError,
    UnknownNameError,
)
from .query.planner import selection_size
from .store import (
    ROW_CHUNK,
    _block_key,
    _chunk_key,
    _dumps,
    _enc_key,
    alternate_key,
    compact,
    create,
    decode_block,
    decode_rows,
    encode_block,
    encode_rows,
    in_use,
    parse_block_key,
)
from .store import open as open_store

# Most precise first: the default source of requantize when no float master exists.
PRECISION_ORDER = ("f32", "f16", "absmax8", "absmean8", "absmax4", "absmean4", "absmax2",
                   "absmean2", "sign1")
MERGE_FIELDS = ("dim", "projection", "model", "lora")


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Callable | None, total: int, desc: str):
    return progress(total=total, desc=desc) if progress else _NoProgress()


# ---- merge ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeReport:
    """What merge built: the output path and, per set, its rows and rows per checkpoint."""

    out: str
    sources: tuple[str, ...]
    checkpoints: tuple[str, ...]
    sets: dict  # name -> {"kind", "rows", "written": {checkpoint: rows}, "encodings": [...]}
    notes: tuple[str, ...] = ()

    def to_dicts(self) -> list[dict]:
        return [{"set": name, **info} for name, info in self.sets.items()]


def merge(sources: Sequence, out, batch_rows: int = 4096, progress: Callable | None = None) -> MergeReport:
    """Combine stores into a new store at `out` after checking that they are compatible.

    Same dim, projection, model and LoRA config; a checkpoint in several sources has one lr;
    a set has one kind and the same per-row encodings everywhere. A set's rows are
    concatenated in source order; every checkpoint's rows must then continue the set's order,
    and an id twice in one (set, checkpoint) is refused naming both sources. ``-global``
    encodings survive only where one source supplies a whole (set, checkpoint) (their scale is
    set-wide); otherwise they are dropped with a note: run requantize on the result.
    """
    if not sources:
        raise ValueError("merge needs at least one source store")
    out_real = os.path.realpath(os.fspath(out))
    if os.path.exists(out_real) and (not os.path.isdir(out_real) or os.listdir(out_real)):
        raise StoreExistsError(f"{out}: already exists; merge writes a new store")
    stores = []
    try:
        for path in sources:
            st = open_store(path)  # read-only: sources are never written
            if any(st.path == s.path for s in stores):
                st.close()
                raise ValueError(f"{path}: given twice")
            stores.append(st)
        plan = _merge_plan(stores)
        parent = os.path.dirname(out_real)
        os.makedirs(parent, exist_ok=True)
        prefix = f".{os.path.basename(out_real)}."
        for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*.merging")):
            if not in_use(stale):  # a killed merge's; a running merge keeps its store open
                shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".merging", dir=parent)
        try:
            _merge_build(stores, plan, tmp, batch_rows, progress)
            compacted = compact(tmp)
            if compacted:
                plan["notes"].append(f"compacted: {compacted[0]:,} -> {compacted[1]:,} bytes")
            if os.path.isdir(out_real) and not os.listdir(out_real):
                os.rmdir(out_real)
            os.rename(tmp, out_real)  # the store appears whole, or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for st in stores:
            st.close()
    return MergeReport(out_real, tuple(s.path for s in stores), tuple(plan["checkpoints"]),
                       {name: {"kind": p["kind"], "rows": len(p["ids"]),
                               "written": {c: sum(w for _, w in parts) for c, parts in p["parts"].items()},
                               "encodings": sorted(p["encodings"] + p["global"])}
                        for name, p in plan["sets"].items()},
                       tuple(plan["notes"]))


def _merge_plan(stores) -> dict:
    first = stores[0]
    for st in stores[1:]:
        for name in MERGE_FIELDS:
            if st.meta.get(name) != first.meta.get(name):
                raise SchemaMismatchError(
                    f"cannot merge: {name} differs: {first.path} has {first.meta.get(name)!r},"
                    f" {st.path} has {st.meta.get(name)!r}")
    ckpts: dict[str, tuple[dict, str]] = {}
    for st in stores:
        for c in st.checkpoints():
            if c["name"] in ckpts and ckpts[c["name"]][0]["lr"] != c["lr"]:
                old, where = ckpts[c["name"]]
                raise SchemaMismatchError(
                    f"cannot merge: checkpoint {c['name']!r} has lr {old['lr']} in {where},"
                    f" {c['lr']} in {st.path}")
            ckpts.setdefault(c["name"], (c, st.path))
    sets: dict[str, dict] = {}
    notes = []
    for st in stores:
        for name, rec in st.set_records().items():
            per_row = sorted(e for e in rec["encodings"] if not parse_encoding(e).global_scale)
            p = sets.setdefault(name, {"kind": rec["kind"], "encodings": per_row, "from": st.path,
                                       "ids": {}, "parts": {}, "global": {}})
            if p["kind"] != rec["kind"]:
                raise SchemaMismatchError(f"cannot merge: set {name!r} is a {p['kind']} set in"
                                          f" {p['from']}, a {rec['kind']} set in {st.path}")
            if p["encodings"] != per_row:
                raise SchemaMismatchError(
                    f"cannot merge: set {name!r} holds {', '.join(p['encodings'])} in {p['from']},"
                    f" {', '.join(per_row)} in {st.path}")
            n_src = max(rec["written"].values(), default=0)
            src_ids = []
            for row in st.iter_rows(name):
                if len(src_ids) == n_src:
                    break
                src_ids.append(row["id"])
                p["ids"].setdefault(row["id"], row)
            for c, w in rec["written"].items():
                if w:
                    p["parts"].setdefault(c, []).append((st, w))
                    p.setdefault("src_ids", {})[st.path] = src_ids
            for e in rec["encodings"]:
                if parse_encoding(e).global_scale:
                    p["global"].setdefault(e, []).append(st.path)
    for name, p in sets.items():
        order = list(p["ids"])
        for c, parts in p["parts"].items():
            seen: dict[str, str] = {}
            given = []
            for st, w in parts:
                for row_id in p["src_ids"][st.path][:w]:
                    if row_id in seen:
                        raise DuplicateIdError(
                            f"cannot merge: id {row_id!r} of set {name!r} checkpoint {c!r} is in"
                            f" both {seen[row_id]} and {st.path}")
                    seen[row_id] = st.path
                    given.append(row_id)
            for i, (got, expected) in enumerate(zip(given, order)):
                if got != expected:
                    raise SchemaMismatchError(
                        f"cannot merge: set {name!r} checkpoint {c!r}: row {i} would be {got!r}, but"
                        f" the merged set's row {i} is {expected!r}; give the sources in the same"
                        " shard order for every checkpoint")
        kept = []
        for e, holders in p["global"].items():
            if all(len(parts) == 1 and parts[0][0].path in holders for parts in p["parts"].values()):
                kept.append(e)
            else:
                notes.append(f"set {name!r}: dropped {e}: its scale is set-wide and the sources"
                             " split the set; run requantize on the merged store")
        p["global"] = kept
    return {"checkpoints": list(ckpts), "ckpt_records": [c for c, _ in ckpts.values()],
            "sets": sets, "notes": notes}


def _merge_build(stores, plan, tmp: str, batch_rows: int, progress) -> None:
    first = stores[0]
    meta = first.meta
    with create(tmp, dim=meta["dim"], projection=meta["projection"], model=meta["model"],
                lora=meta["lora"], block_bytes=meta["block_bytes"]) as out:
        for c in plan["ckpt_records"]:
            out.add_checkpoint(c["name"], lr=c["lr"], step=c.get("step"), epoch=c.get("epoch"),
                               optimizer=c.get("optimizer"), source=c.get("source"))
        total = sum(w for p in plan["sets"].values() for parts in p["parts"].values() for _, w in parts)
        bar = _bar(progress, total, "merge")
        try:
            for name, p in plan["sets"].items():
                for c in plan["checkpoints"]:
                    for st, w in p["parts"].get(c, []):
                        ids = p["src_ids"][st.path]
                        for lo in range(0, w, batch_rows):
                            hi = min(w, lo + batch_rows)
                            rows = {e: st.read_range(name, c, e, lo, hi) for e in p["encodings"]}
                            out.write_quantized(name, c, rows, ids[lo:hi], kind=p["kind"],
                                                metadata=[p["ids"][i] for i in ids[lo:hi]])
                            bar.update(hi - lo)
                if p["global"]:
                    layouts, scales = {}, {}
                    for e in p["global"]:
                        layouts[e] = out.block_layout(e)
                        step = layouts[e]["block_rows"] * max(1, batch_rows // layouts[e]["block_rows"])
                        scales[e] = {}
                        for c, ((st, w),) in p["parts"].items():
                            scales[e][c] = st.set_info(name).get("scales", {}).get(e, {}).get(c)
                            for lo in range(0, w, step):
                                out.stage_blocks(name, c, e, e, lo, st.read_range(name, c, e, lo, min(w, lo + step)))
                    out.commit_encodings(name, layouts, scales, out.set_info(name)["written"])
        finally:
            bar.close()


# ---- requantize -------------------------------------------------------------------------

def requantize(store, set_name: str | None = None, to: Sequence[str] = (), source: str | None = None,
               recenter: bool = False, allow_lossy: bool = False, replace: bool = False,
               batch_rows: int = 8192, progress: Callable | None = None) -> list[dict]:
    """Derive encodings `to` of a set (every set when None) from its master copy.

    `source` defaults to the best float the set holds (f32, else f16); a quantized source is
    refused unless `allow_lossy`. ``-global`` targets take one scale for the set over all its
    checkpoints, as QLESS (`quant.SetScale`, a first pass over the rows), kept in the set
    record under each checkpoint. ``-centered`` targets subtract the (set, checkpoint)'s centroid; where it has none,
    or with `recenter`, the centroid becomes the master's mean over the whole set (a first
    pass), and `recenter` re-derives every centered encoding the set holds with it. Blocks are staged, then one transaction per set shows the new encodings, so a
    killed run leaves the store as it was (a re-run overwrites its staged blocks). An
    encoding the set holds is rebuilt only with `replace`. Returns one dict per (set, encoding).
    """
    if store.readonly:
        raise ReadOnlyError(f"{store.path}: store is open read-only; open it with readonly=False")
    targets = [parse_encoding(t) for t in to]
    if not targets:
        raise ValueError("requantize needs at least one target encoding")
    for t in targets:
        if t.centered and t.global_scale:
            raise SchemaMismatchError(f"{t.name}: centered encodings take per-row scales only")
    names = [set_name] if set_name is not None else store.sets()
    jobs = [_requantize_job(store, s, targets, source, allow_lossy, replace, recenter) for s in names]
    report = []
    for job in jobs:
        report.extend(_requantize_set(store, job, batch_rows, progress, recenter))
    return report


def _requantize_job(store, set_name, targets, source, allow_lossy, replace, recenter=False) -> dict:
    rec = store.set_info(set_name)
    held = list(rec["encodings"])
    if recenter:
        missing = [e for e in held if parse_encoding(e).centered and e not in {t.name for t in targets}]
        if missing or not any(t.centered for t in targets):
            raise SchemaMismatchError(
                f"set {set_name!r}: recentering re-derives every centered encoding; derive"
                f" {', '.join(missing) or 'at least one centered encoding'} too")
        replace = True
    if source is not None:
        src = parse_encoding(source).name
        if src not in held:
            raise UnknownNameError(f"set {set_name!r} has no encoding {src!r}; it holds: {', '.join(held)}")
    else:
        floats = [e for e in ("f32", "f16") if e in held]
        if floats:
            src = floats[0]
        elif allow_lossy:
            src = min(held, key=lambda e: (PRECISION_ORDER.index(parse_encoding(e).name.split("-")[0]), e))
        else:
            raise SchemaMismatchError(
                f"set {set_name!r} holds no float master (it holds {', '.join(held)}); to derive from"
                " a quantized one, name it as the source and allow lossy")
    src_enc = parse_encoding(src)
    if not src_enc.is_float and not allow_lossy:
        raise SchemaMismatchError(
            f"set {set_name!r}: {src} is quantized; deriving from it compounds the error"
            " (allow lossy to do it anyway)")
    for t in targets:
        if t.name == src:
            raise SchemaMismatchError(f"set {set_name!r}: cannot derive {t.name} from itself")
        if t.bits > src_enc.bits:
            raise SchemaMismatchError(f"set {set_name!r}: {t.name} is more precise than its source {src}")
        if t.name in held and not replace:
            raise SchemaMismatchError(f"set {set_name!r} already holds {t.name}; replace it to rebuild it")
    return {"set": set_name, "rec": rec, "source": src, "targets": targets}


def _requantize_set(store, job, batch_rows, progress, recenter=False) -> list[dict]:
    name, rec, src, targets = job["set"], job["rec"], job["source"], job["targets"]
    written = rec["written"]
    ckpt_index = {c: i for i, c in enumerate(store.checkpoint_names())}
    layouts, keys = {}, {}
    for t in targets:
        layout = store.block_layout(t.name)
        current = rec["encodings"].get(t.name)
        # A replacement is staged under the other key, so the current blocks serve readers
        # until the record points at the new ones.
        key = alternate_key(t.name) if current is not None and _enc_key(current, t.name) == t.name else t.name
        if key != t.name:
            layout["key"] = key
        layouts[t.name], keys[t.name] = layout, key
    for c in written:
        for t in targets:  # leftovers of a killed run under the staging key
            store.clear_blocks(rec["id"], ckpt_index[c], keys[t.name])
    globals_ = [t for t in targets if t.global_scale]
    centered = any(t.centered for t in targets)
    new_centroids = {c: None for c in written
                     if centered and (recenter or store.centroid(name, c) is None)}
    total = sum(written.values()) * (2 if globals_ or new_centroids else 1)
    bar = _bar(progress, total, f"requantize {name}")
    scales: dict[str, dict] = {t.name: {} for t in globals_}
    try:
        # One first pass over the master for the set-wide statistics: a -global scale pools
        # every checkpoint of the set (as QLESS), a new centroid is per checkpoint.
        pooled = {t.name: quant.SetScale(t) for t in globals_}
        for c, n in written.items():
            if not (globals_ or c in new_centroids):
                continue
            total_sum = np.zeros(store.dim, np.float64)
            for x in _master_batches(store, name, c, src, n, batch_rows):
                if c in new_centroids:
                    total_sum += x.sum(axis=0, dtype=np.float64)
                for acc in pooled.values():
                    acc.add(x)
                bar.update(len(x))
            if c in new_centroids:
                new_centroids[c] = (total_sum / max(n, 1)).astype(np.float32)
        for t_name, acc in pooled.items():
            scales[t_name] = {c: acc.value for c in written}
        for c, n in written.items():
            center = new_centroids.get(c)
            if centered and center is None:
                center = store.centroid(name, c)
            pending = {t.name: [] for t in targets}
            done = {t.name: 0 for t in targets}
            for x in _master_batches(store, name, c, src, n, batch_rows):
                for t in targets:
                    if t.centered:
                        rows = quant.quantize_centered(x, center, t)
                    else:
                        rows = quant.quantize(x, t, global_scale=scales[t.name][c] if t.global_scale else None)
                    pending[t.name].append(rows)
                    done[t.name] = _flush(store, name, c, t.name, keys[t.name], layouts[t.name],
                                          pending[t.name], done[t.name], last=False)
                bar.update(len(x))
            for t in targets:
                _flush(store, name, c, t.name, keys[t.name], layouts[t.name], pending[t.name],
                       done[t.name], last=True)
    finally:
        bar.close()
    replaced = store.commit_encodings(name, layouts, {k: v for k, v in scales.items()}, written,
                                      centroids={c: v for c, v in new_centroids.items() if v is not None})
    for t_name, old_key in replaced.items():
        if old_key != keys[t_name]:
            for c in written:
                store.clear_blocks(rec["id"], ckpt_index[c], old_key)
    return [{"set": name, "encoding": t.name, "from": src, "rows": dict(written),
             "scales": scales.get(t.name), "replaced": t.name in replaced} for t in targets]


def _master_batches(store, set_name, checkpoint, src, n, batch_rows):
    for lo in range(0, n, batch_rows):
        rows = store.read_range(set_name, checkpoint, src, lo, min(n, lo + batch_rows))
        yield quant.dequantize(rows.payload, rows.scale, src, store.dim)


def _flush(store, set_name, checkpoint, enc, key, layout, pending: list, done: int, last: bool) -> int:
    """Stage the whole blocks in `pending` (all of it when `last`); keep the rest buffered."""
    if not pending:
        return done
    rows = quant.QuantizedRows.concat(pending)
    br = layout["block_rows"]
    take = len(rows.scale) if last else len(rows.scale) // br * br
    pending.clear()
    if take < len(rows.scale):
        pending.append(rows.take(slice(take, None)))
    if take:
        store.stage_blocks(set_name, checkpoint, enc, key, done, rows.take(slice(0, take)))
    return done + take


# ---- compare ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """Agreement of two scorings of the same rows."""

    a: str  # the SCORE query run for each side
    b: str
    rows: int
    spearman: float
    k: int
    overlap: float  # |top_k(A) & top_k(B)| / k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties sharing the average of their ranks (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    new = np.r_[True, sx[1:] != sx[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    ranks[order] = ((starts + ends - 1) / 2 + 1)[np.cumsum(new) - 1]
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when a side is constant."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def parse_k(k, n: int) -> int:
    """A count ("100") or a percentage ("5%") of n rows, sized as `TOP` sizes it."""
    text = str(k).strip()
    try:
        if text.endswith("%"):
            p = float(text[:-1])
            if not 0 < p <= 100:
                raise ValueError
            return selection_size(n, percent=p)
        count = int(text)
        if count < 1:
            raise ValueError
        return selection_size(n, count=count)
    except ValueError:
        raise ValueError(f"k must be a count or a percentage such as 5%, got {k!r}") from None


def compare(store, a: str, b: str, tasks: Sequence[str] = (), k="5%", set_name: str | None = None) -> Comparison:
    """Compare two encodings (`a`, `b` name encodings; `tasks` say what to score) or two queries.

    Each side runs as a SCORE query over the same train set; rows a WHERE drops on one side
    are left out of both.
    """
    from .query import default_train_set
    from .query.executor import execute
    from .query.planner import plan

    qa, qb = (_score_query(store, x, tasks, set_name, default_train_set) for x in (a, b))
    if qa.set_name != qb.set_name:
        raise SchemaMismatchError(f"cannot compare: A scores set {qa.set_name!r}, B set {qb.set_name!r}")
    ra, rb = (execute(store, plan(store, q)) for q in (qa, qb))
    rows, ia, ib = np.intersect1d(ra.rows, rb.rows, return_indices=True)
    sa, sb = ra.scores[ia], rb.scores[ib]
    kk = parse_k(k, len(rows))
    top_a = rows[np.lexsort((rows, -sa.astype(np.float64)))[:kk]]
    top_b = rows[np.lexsort((rows, -sb.astype(np.float64)))[:kk]]
    overlap = len(np.intersect1d(top_a, top_b)) / kk if kk else float("nan")
    return Comparison(qa.to_text(), qb.to_text(), len(rows),
                      spearman(sa, sb) if len(rows) >= 2 else float("nan"), kk, overlap)


def _score_query(store, text: str, tasks, set_name, default_train_set):
    from .query.ast import quote_name
    from .query.parser import parse

    text = text.strip()
    if text and " " not in text:  # an encoding name
        enc = parse_encoding(text).name
        if not tasks:
            raise ValueError(f"comparing encodings ({enc}) needs a task to score")
        text = (f"SCORE FROM {quote_name(set_name or default_train_set(store))} BY "
                + ", ".join(quote_name(t) for t in tasks) + f" ENCODING {enc}")
    query = parse(text)
    if query.explain:
        raise ValueError("compare runs queries; drop EXPLAIN")
    return dataclasses.replace(query, top_k=None, top_percent=None)


# ---- check ------------------------------------------------------------------------------

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
    if fix and store.readonly:
        raise ReadOnlyError(f"{store.path}: store is open read-only; open it with readonly=False")
    report = CheckReport()
    env = store.env
    data = os.path.join(store.path, "data.mdb")
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data)
    if size < need:
        # Reading past the end of the mapped file would kill the process (SIGBUS).
        report.findings.append(Finding(data, f"truncated to {size} bytes, the database needs {need};"
                                       " restore it from a copy"))
        return report
    dbs = store._dbs
    ckpt_names = store.checkpoint_names()
    recs = store.set_records()
    plans = {}
    with env.begin(buffers=True) as txn:
        total = sum(-(-w // layout["block_rows"]) for rec in recs.values()
                    for w in rec["written"].values() for layout in rec["encodings"].values())
        bar = _bar(progress, total, "check")
        try:
            for name, rec in recs.items():
                plans[name] = _check_set(txn, dbs, name, rec, ckpt_names, report, bar)
        finally:
            bar.close()
        orphans = _check_orphans(txn, dbs, recs, plans, ckpt_names, report)
    if fix and (report.findings or orphans):
        store._write_txn(lambda t: _fix(t, dbs, recs, plans, orphans, ckpt_names, report))
    return report


def _check_set(txn, dbs, name, rec, ckpt_names, report, bar) -> dict:
    set_id, n_rows = rec["id"], rec["n_rows"]
    ids: list[str] = []
    for chunk in range(-(-n_rows // ROW_CHUNK)):
        raw = txn.get(_chunk_key(set_id, chunk), db=dbs["rows"])
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
                raw = txn.get(_block_key(set_id, ci, _enc_key(layout, enc), b), db=dbs["blocks"])
                bar.update(1)
                report.blocks += 1
                problem = None
                if raw is None:
                    problem = "missing"
                else:
                    try:
                        blk = decode_block(raw, layout, b * br, where, verify=True)
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
            if any(_enc_key(lay, e) == key and b < -(-w // lay["block_rows"])
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
             if struct.unpack(">I", bytes(k)[:4])[0] not in by_id]
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
                txn.delete(_chunk_key(set_id, c), db=dbs["rows"])
            if at:  # the chunk at the new end keeps its first rows (verified good)
                kept = decode_rows(txn.get(_chunk_key(set_id, chunk), db=dbs["rows"]))[:at]
                txn.put(_chunk_key(set_id, chunk), encode_rows(kept), db=dbs["rows"])
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
                key = _enc_key(layout, enc)
                for b in range(-(-new // br), -(-w // br)):
                    txn.delete(_block_key(set_id, ci, key, b), db=dbs["blocks"])
                if new % br:  # the block at the new end keeps its first rows (verified good)
                    b = new // br
                    raw = txn.get(_block_key(set_id, ci, key, b), db=dbs["blocks"])
                    blk = decode_block(raw, layout, b * br, f"block {b}")
                    txn.put(_block_key(set_id, ci, key, b), encode_block(blk.rows(0, new - b * br)),
                            db=dbs["blocks"])
            rec["written"][c] = new
            if new < w:
                report.dropped.append(f"set {name!r} checkpoint {c!r}: rows {new}..{w - 1} dropped"
                                      f" ({w - new} rows; a resumed ingest recomputes them)")
        txn.put(name.encode(), _dumps(rec), db=dbs["sets"])
