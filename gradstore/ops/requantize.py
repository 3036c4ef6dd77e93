"""requantize: derive lower encodings (per-row or ``-global``) from a set's float master,
without the model. Blocks are staged under a key nothing points at, then one transaction makes
the encodings appear: readers never see half an encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .. import quant
from ..encodings import parse_encoding
from ..errors import SchemaMismatchError, UnknownNameError
from ..format import alternate_key, encoding_key
from ..staging import Staging
from .progress import progress_bar

# Most precise first: the default source of requantize when no float master exists.
PRECISION_ORDER = ("f32", "f16", "absmax8", "absmean8", "absmax4", "absmean4", "absmax2",
                   "absmean2", "sign1")


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
    staging = Staging(store, write=True)
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
        report.extend(_requantize_set(store, staging, job, batch_rows, progress, recenter))
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


def _requantize_set(store, staging, job, batch_rows, progress, recenter=False) -> list[dict]:
    name, rec, src, targets = job["set"], job["rec"], job["source"], job["targets"]
    written = rec["written"]
    layouts, keys = {}, {}
    for t in targets:
        layout = staging.block_layout(t.name)
        current = rec["encodings"].get(t.name)
        # A replacement is staged under the other key, so the current blocks serve readers
        # until the record points at the new ones.
        key = alternate_key(t.name) if current is not None and encoding_key(current, t.name) == t.name else t.name
        if key != t.name:
            layout["key"] = key
        layouts[t.name], keys[t.name] = layout, key
    for c in written:
        for t in targets:  # leftovers of a killed run under the staging key
            staging.clear_blocks(name, c, keys[t.name])
    globals_ = [t for t in targets if t.global_scale]
    centered = any(t.centered for t in targets)
    new_centroids = {c: None for c in written
                     if centered and (recenter or store.centroid(name, c) is None)}
    total = sum(written.values()) * (2 if globals_ or new_centroids else 1)
    bar = progress_bar(progress, total, f"requantize {name}")
    scales: dict[str, dict] = {t.name: {} for t in globals_}
    try:
        # One first pass over the master for the set-wide statistics: a -global scale pools
        # every checkpoint of the set (as QLESS), a new centroid is per checkpoint.
        pooled = {t.name: quant.SetScale(t) for t in globals_}
        for c, n in written.items():
            if not (globals_ or c in new_centroids):
                continue
            total_sum = np.zeros(store.dim, np.float64)
            for x in _master_batches(staging, store.dim, name, c, src, n, batch_rows):
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
            for x in _master_batches(staging, store.dim, name, c, src, n, batch_rows):
                for t in targets:
                    if t.centered:
                        rows = quant.quantize_centered(x, center, t)
                    else:
                        rows = quant.quantize(x, t, global_scale=scales[t.name][c] if t.global_scale else None)
                    pending[t.name].append(rows)
                    done[t.name] = _flush(staging, name, c, t.name, keys[t.name], layouts[t.name],
                                          pending[t.name], done[t.name], last=False)
                bar.update(len(x))
            for t in targets:
                _flush(staging, name, c, t.name, keys[t.name], layouts[t.name], pending[t.name],
                       done[t.name], last=True)
    finally:
        bar.close()
    replaced = staging.commit_encodings(name, layouts, scales, written,
                                      centroids={c: v for c, v in new_centroids.items() if v is not None})
    for t_name, old_key in replaced.items():
        if old_key != keys[t_name]:
            for c in written:
                staging.clear_blocks(name, c, old_key)
    return [{"set": name, "encoding": t.name, "from": src, "rows": dict(written),
             "scales": scales.get(t.name), "replaced": t.name in replaced} for t in targets]


def _master_batches(staging, dim, set_name, checkpoint, src, n, batch_rows):
    for lo in range(0, n, batch_rows):
        rows = staging.read_range(set_name, checkpoint, src, lo, min(n, lo + batch_rows))
        yield quant.dequantize(rows.payload, rows.scale, src, dim)


def _flush(staging, set_name, checkpoint, enc, key, layout, pending: list, done: int, last: bool) -> int:
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
        staging.stage_blocks(set_name, checkpoint, enc, key, done, rows.take(slice(0, take)))
    return done + take
