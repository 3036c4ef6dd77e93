"""merge: combine stores computed separately (shards of one pool, or checkpoints) into a new store.

The new store is built in a temporary directory next to `out`, compacted, and renamed at the
end, so a killed merge leaves nothing at `out` (the next merge to `out` removes its temporary
directory); sources are opened read-only. Rows are copied in stored form, so quantized
encodings make no lossy round trip.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from ..encodings import parse_encoding
from ..env import compact, in_use
from ..errors import DuplicateIdError, SchemaMismatchError, StoreExistsError
from ..staging import Staging
from ..store import create
from ..store import open as open_store
from .progress import progress_bar

MERGE_FIELDS = ("dim", "projection", "model", "lora")


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


@dataclass(frozen=True)
class StoreDescription:
    """What merge's checks read of a source store, small enough to send from the machine that
    holds it (a sharded store's Ray actors do): no vectors, no row metadata but ids."""

    path: str
    meta: dict
    checkpoints: list[dict]  # records, in creation order
    sets: dict[str, dict]  # name -> its set record, plus "ids": of the rows any checkpoint holds


def describe(store) -> StoreDescription:
    """A store's description for merge's checks (and a sharded store's planner)."""
    sets = {}
    for name, rec in Staging(store).set_records().items():
        held = max(rec["written"].values(), default=0)
        sets[name] = {**rec, "ids": [row["id"] for row in islice(store.iter_rows(name), held)]}
    return StoreDescription(store.path, store.meta, store.checkpoints(), sets)


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
        plan = _merge_plan([describe(st) for st in stores])
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


def _merge_plan(sources: list[StoreDescription]) -> dict:
    """Check the sources as merge does and lay out the merged store: per set its ids in merged
    order (each with the first source holding it and its row there), and per checkpoint the
    (source path, rows) parts that fill it, in source order."""
    first = sources[0]
    for src in sources[1:]:
        for name in MERGE_FIELDS:
            if src.meta.get(name) != first.meta.get(name):
                raise SchemaMismatchError(
                    f"cannot merge: {name} differs: {first.path} has {first.meta.get(name)!r},"
                    f" {src.path} has {src.meta.get(name)!r}")
    ckpts: dict[str, tuple[dict, str]] = {}
    for src in sources:
        for c in src.checkpoints:
            if c["name"] in ckpts and ckpts[c["name"]][0]["lr"] != c["lr"]:
                old, where = ckpts[c["name"]]
                raise SchemaMismatchError(
                    f"cannot merge: checkpoint {c['name']!r} has lr {old['lr']} in {where},"
                    f" {c['lr']} in {src.path}")
            ckpts.setdefault(c["name"], (c, src.path))
    sets: dict[str, dict] = {}
    notes = []
    for src in sources:
        for name, rec in src.sets.items():
            per_row = sorted(e for e in rec["encodings"] if not parse_encoding(e).global_scale)
            p = sets.setdefault(name, {"kind": rec["kind"], "encodings": per_row, "from": src.path,
                                       "ids": {}, "parts": {}, "global": {}})
            if p["kind"] != rec["kind"]:
                raise SchemaMismatchError(f"cannot merge: set {name!r} is a {p['kind']} set in"
                                          f" {p['from']}, a {rec['kind']} set in {src.path}")
            if p["encodings"] != per_row:
                raise SchemaMismatchError(
                    f"cannot merge: set {name!r} holds {', '.join(p['encodings'])} in {p['from']},"
                    f" {', '.join(per_row)} in {src.path}")
            for row, row_id in enumerate(rec["ids"]):
                p["ids"].setdefault(row_id, (src.path, row))
            for c, w in rec["written"].items():
                if w:
                    p["parts"].setdefault(c, []).append((src.path, w))
                    p.setdefault("src_ids", {})[src.path] = rec["ids"]
            for e in rec["encodings"]:
                if parse_encoding(e).global_scale:
                    p["global"].setdefault(e, []).append(src.path)
    for name, p in sets.items():
        order = list(p["ids"])
        for c, parts in p["parts"].items():
            seen: dict[str, str] = {}
            given = []
            for path, w in parts:
                for row_id in p["src_ids"][path][:w]:
                    if row_id in seen:
                        raise DuplicateIdError(
                            f"cannot merge: id {row_id!r} of set {name!r} checkpoint {c!r} is in"
                            f" both {seen[row_id]} and {path}")
                    seen[row_id] = path
                    given.append(row_id)
            for i, (got, expected) in enumerate(zip(given, order)):
                if got != expected:
                    raise SchemaMismatchError(
                        f"cannot merge: set {name!r} checkpoint {c!r}: row {i} would be {got!r}, but"
                        f" the merged set's row {i} is {expected!r}; give the sources in the same"
                        " shard order for every checkpoint")
        kept = []
        for e, holders in p["global"].items():
            if all(len(parts) == 1 and parts[0][0] in holders for parts in p["parts"].values()):
                kept.append(e)
            else:
                notes.append(f"set {name!r}: dropped {e}: its scale is set-wide and the sources"
                             " split the set; run requantize on the merged store")
        p["global"] = kept
    return {"checkpoints": list(ckpts), "ckpt_records": [c for c, _ in ckpts.values()],
            "sets": sets, "notes": notes}


def _first_rows(stores: dict, name: str, places: list[tuple[str, int]]) -> list[dict]:
    """The metadata of set `name`'s rows at (source path, row) places, read from those sources."""
    out: list[dict] = [{}] * len(places)
    for path in dict.fromkeys(path for path, _ in places):
        at = [j for j, (p, _) in enumerate(places) if p == path]
        for j, rec in zip(at, stores[path].rows_at(name, [places[j][1] for j in at])):
            out[j] = rec
    return out


def _merge_build(stores, plan, tmp: str, batch_rows: int, progress) -> None:
    meta = stores[0].meta
    by_path = {st.path: st for st in stores}
    with create(tmp, dim=meta["dim"], projection=meta["projection"], model=meta["model"],
                lora=meta["lora"], block_bytes=meta["block_bytes"]) as out:
        for c in plan["ckpt_records"]:
            out.add_checkpoint(c["name"], lr=c["lr"], step=c.get("step"), epoch=c.get("epoch"),
                               optimizer=c.get("optimizer"), source=c.get("source"))
        total = sum(w for p in plan["sets"].values() for parts in p["parts"].values() for _, w in parts)
        bar = progress_bar(progress, total, "merge")
        staging = Staging(out)
        try:
            for name, p in plan["sets"].items():
                for c in plan["checkpoints"]:
                    for path, w in p["parts"].get(c, []):
                        source = Staging(by_path[path])
                        ids = p["src_ids"][path]
                        for lo in range(0, w, batch_rows):
                            hi = min(w, lo + batch_rows)
                            rows = {e: source.read_range(name, c, e, lo, hi) for e in p["encodings"]}
                            # each id's metadata as the first source holding it has it
                            metadata = _first_rows(by_path, name, [p["ids"][i] for i in ids[lo:hi]])
                            staging.write_quantized(name, c, rows, ids[lo:hi], kind=p["kind"],
                                                    metadata=metadata)
                            bar.update(hi - lo)
                if p["global"]:
                    layouts, scales = {}, {}
                    for e in p["global"]:
                        layouts[e] = staging.block_layout(e)
                        step = layouts[e]["block_rows"] * max(1, batch_rows // layouts[e]["block_rows"])
                        scales[e] = {}
                        for c, ((path, w),) in p["parts"].items():
                            st = by_path[path]
                            scales[e][c] = st.set_info(name).get("scales", {}).get(e, {}).get(c)
                            for lo in range(0, w, step):
                                rows = Staging(st).read_range(name, c, e, lo, min(w, lo + step))
                                staging.stage_blocks(name, c, e, e, lo, rows)
                    staging.commit_encodings(name, layouts, scales, out.set_info(name)["written"])
        finally:
            bar.close()
