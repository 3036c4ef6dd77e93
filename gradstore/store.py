"""The store's API: `create`, `open`, and `Store`, one LMDB environment per directory.

The bytes are `gradstore.format`'s, the environment `gradstore.env`'s. Every ``write`` is one
write transaction, so a killed writer leaves whole batches only. Writers keep an id -> row
map in memory (built once from the rows, extended as rows are appended) for duplicate checks
and resume.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
from typing import Iterator, Sequence

import lmdb
import numpy as np

from . import quant
from .encodings import DEFAULT_ENCODINGS, Encoding, parse_encoding
from .env import DEFAULT_MAP_SIZE, Environment, create_environment, resolve
from .errors import (
    DuplicateIdError,
    InvalidVectorError,
    SchemaMismatchError,
    StoreExistsError,
    UnknownNameError,
)
from .format import (
    DATA_FILE,
    DEFAULT_BLOCK_BYTES,
    ROW_CHUNK,
    Block,
    block_layout,
    block_key,
    block_prefix,
    centroid_key,
    chunk_key,
    decode_centroid,
    decode_rows,
    dumps,
    encode_block,
    encode_centroid,
    encode_rows,
    encoding_key,
    loads,
    new_meta,
    read_block,
    row_record,
    rows_in_every,
    u32,
)
from .query import run


def create(path, dim: int, projection: dict | None = None, model: dict | None = None,
           lora: dict | None = None, map_size: int = DEFAULT_MAP_SIZE,
           block_bytes: int = DEFAULT_BLOCK_BYTES) -> "Store":
    """Create an empty store at `path` (a new or empty directory) and open it for writing."""
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise SchemaMismatchError(f"dim must be a positive integer, got {dim!r}")
    real = resolve(path)
    if os.path.exists(os.path.join(real, DATA_FILE)):
        raise StoreExistsError(f"{path}: a store already exists here")
    if os.path.exists(real) and (not os.path.isdir(real) or os.listdir(real)):
        raise StoreExistsError(f"{path}: exists and is not an empty directory")
    # Built in a directory beside `path` and renamed at the end: a create killed before its
    # first commit would leave a data file with no records, which open() refuses and create()
    # would not overwrite, so the path could not be used until someone deleted it.
    parent, base = os.path.split(real)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.{os.getpid()}.{threading.get_ident()}.creating")
    shutil.rmtree(tmp, ignore_errors=True)  # ours, left by a killed create of the same pid
    os.mkdir(tmp)
    try:
        create_environment(tmp, new_meta(dim, projection, model, lora, block_bytes), map_size)
        if os.path.isdir(real):
            os.rmdir(real)  # empty, checked above
        os.rename(tmp, real)  # the store appears whole, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Store(real, readonly=False, map_size=map_size)


def open(path, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE) -> "Store":  # noqa: A001
    """Open an existing store; read-only by default."""
    return Store(resolve(path), readonly=readonly, map_size=map_size)


class Store:
    """A gradient store. Use `gradstore.create` / `gradstore.open` rather than this class."""

    def __init__(self, path: str, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE):
        self._environment = Environment(path, readonly, map_size)
        self.path = path
        self.readonly = readonly
        self._ids: dict[int, tuple[list[str], dict[str, int]]] = {}  # set id -> (ids, id -> row)

    # ---- environment lifecycle -------------------------------------------------------
    @property
    def env(self) -> lmdb.Environment:
        return self._environment.lmdb

    @property
    def meta(self) -> dict:
        return self._environment.meta

    @property
    def _dbs(self) -> dict:
        return self._environment.dbs

    def close(self) -> None:
        self._environment.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # Pickling a handle means "reopen the same path" (spawned workers).
        return (open, (self.path, self.readonly))

    def __repr__(self) -> str:
        return f"<gradstore.Store {self.path!r} {'read-only' if self.readonly else 'writable'}>"

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    # ---- checkpoints ----------------------------------------------------------------
    def checkpoints(self) -> list[dict]:
        """Checkpoint records in creation order."""
        with self.env.begin() as txn:
            return [loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]

    def checkpoint_names(self) -> list[str]:
        return [c["name"] for c in self.checkpoints()]

    def add_checkpoint(self, name: str, lr: float, step: int | None = None, epoch: int | None = None,
                       optimizer: str | None = None, source: str | None = None) -> dict:
        """Register a checkpoint; re-adding an identical one is a no-op, a different one an error."""
        if not isinstance(name, str) or not name:
            raise SchemaMismatchError(f"checkpoint name must be a non-empty string, got {name!r}")
        lr = float(lr)
        if not np.isfinite(lr) or lr < 0:
            raise SchemaMismatchError(f"checkpoint {name!r}: lr must be finite and >= 0, got {lr}")
        record = {"name": name, "lr": lr, "step": step, "epoch": epoch,
                  "optimizer": optimizer, "source": source}

        def add(txn):
            existing = [loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]
            for old in existing:
                if old["name"] == name:
                    if old["lr"] != lr:
                        raise SchemaMismatchError(
                            f"checkpoint {name!r} already exists with lr {old['lr']}, not {lr}")
                    return old
            txn.put(u32(len(existing)), dumps(record), db=self._dbs["checkpoints"])
            return record

        return self._environment.write(add)

    def _checkpoint_index(self, txn, name: str) -> int:
        names = [loads(v)["name"] for _, v in txn.cursor(db=self._dbs["checkpoints"])]
        if name not in names:
            raise UnknownNameError(f"unknown checkpoint {name!r}; the store has: {_listing(names)}")
        return names.index(name)

    # ---- sets and rows --------------------------------------------------------------
    def sets(self) -> list[str]:
        """Set names, in creation order."""
        with self.env.begin() as txn:
            records = [(loads(v)["id"], k.decode()) for k, v in txn.cursor(db=self._dbs["sets"])]
        return [name for _, name in sorted(records)]

    def set_info(self, set_name: str) -> dict:
        with self.env.begin() as txn:
            return self._set_record(txn, set_name)

    def _set_record(self, txn, set_name: str) -> dict:
        raw = txn.get(set_name.encode(), db=self._dbs["sets"])
        if raw is None:
            names = [bytes(k).decode() for k, _ in txn.cursor(db=self._dbs["sets"])]
            raise UnknownNameError(f"unknown set {set_name!r}; the store has: {_listing(names)}")
        return loads(raw)

    def rows(self, set_name: str) -> list[dict]:
        """Row metadata of a set in row order (each has at least id and subtask)."""
        with self.env.begin() as txn:
            return list(self._iter_rows(txn, self._set_record(txn, set_name)["id"]))

    def iter_rows(self, set_name: str) -> Iterator[dict]:
        """Row metadata of a set in row order, streamed (memory does not grow with the set)."""
        with self.env.begin() as txn:
            yield from self._iter_rows(txn, self._set_record(txn, set_name)["id"])

    def n_passing(self, set_name: str, where, limit: int) -> int:
        """How many of the set's first `limit` rows pass `where` (a parsed WHERE condition)."""
        return sum(where.evaluate(row) for row in itertools.islice(self.iter_rows(set_name), limit))

    def rows_at(self, set_name: str, rows) -> list[dict]:
        """Row metadata for the given row numbers, in the order given."""
        with self.env.begin() as txn:
            set_id = self._set_record(txn, set_name)["id"]
            chunks: dict[int, list[dict]] = {}
            out = []
            for row in rows:
                chunk, at = divmod(int(row), ROW_CHUNK)
                if chunk not in chunks:
                    chunks[chunk] = self._chunk(txn, set_id, chunk)
                if at >= len(chunks[chunk]):
                    raise UnknownNameError(f"set {set_name!r} has no row {int(row)}")
                out.append(chunks[chunk][at])
            return out

    def _iter_rows(self, txn, set_id: int, start: int = 0) -> Iterator[dict]:
        prefix = u32(set_id)
        chunk, skip = divmod(start, ROW_CHUNK)
        cur = txn.cursor(db=self._dbs["rows"])
        if cur.set_range(chunk_key(set_id, chunk)):
            for k, v in cur:
                if not bytes(k).startswith(prefix):
                    break
                yield from decode_rows(v)[skip:]
                skip = 0

    def _id_index(self, txn, set_id: int, n_rows: int) -> tuple[list[str], dict[str, int]]:
        """(ids in row order, id -> row) of a set, cached and extended as rows are appended."""
        ids, index = self._ids.get(set_id, ([], {}))
        last = n_rows and len(ids) and len(ids) <= n_rows and self._row_at(txn, set_id, len(ids) - 1)
        if len(ids) > n_rows or (ids and (not last or last["id"] != ids[-1])):
            ids, index = [], {}  # the set changed under us (e.g. check --fix): rebuild
        for row, record in enumerate(self._iter_rows(txn, set_id, len(ids)), start=len(ids)):
            if row >= n_rows:
                break
            ids.append(record["id"])
            index.setdefault(record["id"], row)
        self._ids[set_id] = (ids, index)
        return ids, index

    def _chunk(self, txn, set_id: int, chunk: int) -> list[dict]:
        """The row records of one metadata chunk ([] past the end)."""
        raw = txn.get(chunk_key(set_id, chunk), db=self._dbs["rows"])
        return decode_rows(raw) if raw is not None else []

    def _row_at(self, txn, set_id: int, row: int) -> dict | None:
        records = self._chunk(txn, set_id, row // ROW_CHUNK)
        return records[row % ROW_CHUNK] if row % ROW_CHUNK < len(records) else None

    def ids(self, set_name: str) -> list[str]:
        return [r["id"] for r in self.rows(set_name)]

    def written_ids(self, set_name: str, checkpoint: str) -> set[str]:
        """Ids whose vectors are stored for this checkpoint (what a resumed ingest skips)."""
        try:
            rec = self.set_info(set_name)
        except UnknownNameError:
            return set()
        n = rec["written"].get(checkpoint, 0)
        return set(self.ids(set_name)[:n])

    # ---- writing --------------------------------------------------------------------
    def write(self, set_name: str, checkpoint: str, vectors, ids: Sequence[str], kind: str = "train",
              encodings: Sequence[str] = DEFAULT_ENCODINGS, metadata: Sequence[dict] | None = None,
              subtasks: Sequence[str] | None = None, centroid=None) -> int:
        """Append one batch of rows of `set_name` for `checkpoint` in one transaction.

        Rows of a (set, checkpoint) arrive in the set's row order: ids new to the set are
        appended to it; ids the set already has must come in its order. Returns rows written.
        Centered encodings subtract the (set, checkpoint)'s centroid, frozen at their first
        write: `centroid` (e.g. the mean of a calibration sample), else this batch's mean.
        """
        self._environment.require_writable()
        if kind not in ("train", "task"):
            raise SchemaMismatchError(f"set {set_name!r}: kind must be 'train' or 'task', got {kind!r}")
        if not isinstance(set_name, str) or not set_name or "\0" in set_name:
            raise SchemaMismatchError(f"set name must be a non-empty string, got {set_name!r}")
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise SchemaMismatchError(
                f"set {set_name!r}: vectors must have shape (n, {self.dim}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise SchemaMismatchError(f"set {set_name!r}: vectors must be floats, got {x.dtype}")
        x = np.ascontiguousarray(x, np.float32)
        n = x.shape[0]
        ids = [str(i) for i in ids]
        if len(ids) != n:
            raise SchemaMismatchError(f"set {set_name!r}: {len(ids)} ids for {n} vectors")
        check_unique_ids(ids, set_name)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(metadata) != n:
            raise SchemaMismatchError(f"set {set_name!r}: {len(metadata)} metadata records for {n} vectors")
        subtasks = [str(s) for s in subtasks] if subtasks is not None else [None] * n
        if len(subtasks) != n:
            raise SchemaMismatchError(f"set {set_name!r}: {len(subtasks)} subtasks for {n} vectors")
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise InvalidVectorError(
                f"set {set_name!r}: row {int(bad[0])} (id {ids[bad[0]]!r}) holds NaN or inf; nothing written")
        encs = [parse_encoding(e) for e in encodings]
        if not encs:
            raise SchemaMismatchError(f"set {set_name!r}: at least one encoding is needed")
        refuse_global(encs)
        center = None
        if n and any(e.centered for e in encs):
            center = self.centroid(set_name, checkpoint)
            if center is None:
                center = np.asarray(x.mean(axis=0) if centroid is None else centroid, np.float32)
        # Quantize outside the write transaction: the writer lock is held only for I/O.
        encoded = {enc.name: quant.quantize_centered(x, center, enc) if enc.centered else quant.quantize(x, enc)
                   for enc in encs} if n else {}
        rows_meta = [row_record(i, s, m, set_name) for i, s, m in zip(ids, subtasks, metadata)]
        return self._append_rows(set_name, checkpoint, kind, encs, ids, rows_meta, encoded, center)

    def _append_rows(self, set_name: str, checkpoint: str, kind: str, encs: list[Encoding],
                     ids: list[str], rows_meta: list[dict], encoded: dict, center=None) -> int:
        n = len(ids)

        def write(txn):
            ckpt = self._checkpoint_index(txn, checkpoint)
            rec = self._get_or_create_set(txn, set_name, kind, encs)
            if center is not None:
                self._freeze_centroid(txn, rec["id"], ckpt, set_name, checkpoint, center)
            start, first_row = rec["written"].get(checkpoint, 0), rec["n_rows"]
            new_ids = self._place_rows(txn, rec, set_name, checkpoint, start, ids, rows_meta)
            for enc in encs:
                self._append_blocks(txn, rec, set_name, checkpoint, ckpt, enc, start, encoded.get(enc.name))
            rec["written"][checkpoint] = start + n
            txn.put(set_name.encode(), dumps(rec), db=self._dbs["sets"])
            return rec["id"], first_row, new_ids

        if not n:
            return 0
        set_id, first_row, new_ids = self._environment.write(write)
        self._remember_ids(set_id, first_row, new_ids)
        return n

    def _get_or_create_set(self, txn, set_name: str, kind: str, encs: list[Encoding]) -> dict:
        raw = txn.get(set_name.encode(), db=self._dbs["sets"])
        names = [e.name for e in encs]
        if raw is None:
            next_id = 1 + max((loads(v)["id"] for _, v in txn.cursor(db=self._dbs["sets"])), default=-1)
            return {"id": next_id, "kind": kind, "n_rows": 0, "subtasks": [], "written": {},
                    "encodings": {e.name: self._layout(e) for e in encs}}
        rec = loads(raw)
        if rec["kind"] != kind:
            raise SchemaMismatchError(f"set {set_name!r} is a {rec['kind']} set, not {kind}")
        stored = [e for e in rec["encodings"] if not parse_encoding(e).global_scale]
        if sorted(stored) != sorted(names):
            raise SchemaMismatchError(
                f"set {set_name!r} holds encodings {', '.join(sorted(stored))}; this write has"
                f" {', '.join(sorted(names))} (use requantize to add encodings)")
        return rec

    def _freeze_centroid(self, txn, set_id: int, ckpt: int, set_name: str, checkpoint: str, center) -> None:
        key = centroid_key(set_id, ckpt)
        stored = txn.get(key, db=self._dbs["centroids"])
        if stored is None:
            txn.put(key, encode_centroid(center), db=self._dbs["centroids"])
        elif bytes(stored) != encode_centroid(center):
            # Another writer froze a different centroid between our read and this transaction.
            raise SchemaMismatchError(
                f"set {set_name!r} checkpoint {checkpoint!r}: its centroid changed during this write; retry")

    def centroid(self, set_name: str, checkpoint: str) -> np.ndarray | None:
        """The centroid centered encodings of (set, checkpoint) subtract, or None before any."""
        with self.env.begin() as txn:
            raw = txn.get(set_name.encode(), db=self._dbs["sets"])
            if raw is None:
                return None
            key = centroid_key(loads(raw)["id"], self._checkpoint_index(txn, checkpoint))
            stored = txn.get(key, db=self._dbs["centroids"])
        return None if stored is None else decode_centroid(stored).copy()

    def _layout(self, enc: Encoding) -> dict:
        return block_layout(enc, self.dim, self.meta["block_bytes"])

    def _place_rows(self, txn, rec: dict, set_name: str, checkpoint: str, start: int,
                    ids: list[str], rows_meta: list[dict]) -> list[str]:
        """Check that ids continue this checkpoint's rows in the set's order; append new rows.

        Returns the ids appended (the caller adds them to the id cache once the write commits).
        """
        set_id = rec["id"]
        known, index = self._id_index(txn, set_id, rec["n_rows"])
        first_new = rec["n_rows"]
        appended = []
        for j, row_id in enumerate(ids):
            row = start + j
            found_row = index.get(row_id)
            if found_row is not None and found_row < start:
                # (ids within this batch are unique, so a known id here was written before)
                raise DuplicateIdError(
                    f"id {row_id!r} is already written to {set_name}/{checkpoint} (row {found_row})")
            if row < first_new:
                if found_row != row:
                    raise SchemaMismatchError(
                        f"rows out of order for checkpoint {checkpoint!r}: row {row} of the set is"
                        f" {known[row]!r}, but {row_id!r} was given; write every checkpoint's rows in"
                        " the set's order")
                continue
            appended.append(rows_meta[j])
            subtask = rows_meta[j]["subtask"]
            if subtask is not None and subtask not in rec["subtasks"]:
                rec["subtasks"].append(subtask)
        if appended:
            chunk, at = divmod(first_new, ROW_CHUNK)
            records = []
            if at:
                records = self._chunk(txn, set_id, chunk)[:at]
            records += appended
            for lo in range(0, len(records), ROW_CHUNK):
                txn.put(chunk_key(set_id, chunk + lo // ROW_CHUNK), encode_rows(records[lo:lo + ROW_CHUNK]),
                        db=self._dbs["rows"])
            rec["n_rows"] = first_new + len(appended)
        return [r["id"] for r in appended]

    def _remember_ids(self, set_id: int, first_row: int, new_ids: list[str]) -> None:
        ids, index = self._ids.get(set_id, ([], {}))
        if len(ids) == first_row:  # else the cache is stale; _id_index rebuilds it when needed
            for row, row_id in enumerate(new_ids, start=first_row):
                ids.append(row_id)
                index.setdefault(row_id, row)

    def _append_blocks(self, txn, rec: dict, set_name: str, checkpoint: str, ckpt: int, enc: Encoding,
                       start: int, rows: quant.QuantizedRows) -> None:
        """Append rows after row `start`: refill the last partial block, then add new ones."""
        layout = rec["encodings"][enc.name]
        block_rows = layout["block_rows"]
        block = start // block_rows
        if start % block_rows:
            old = self._read_block(txn, rec, layout, set_name, enc, checkpoint, ckpt, block)
            rows = quant.QuantizedRows.concat([old.rows(), rows])
        for lo in range(0, len(rows.scale), block_rows):
            key = block_key(rec["id"], ckpt, encoding_key(layout, enc.name), block + lo // block_rows)
            txn.put(key, encode_block(rows.take(slice(lo, lo + block_rows))), db=self._dbs["blocks"])

    # ---- reading --------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[object]:
        """One read transaction to pass to several scans as `snapshot=`: they all see the same
        committed state, and the views they yield stay valid until this block exits."""
        with self._environment.reading() as txn:
            yield txn

    def _reading(self, snapshot):
        return contextlib.nullcontext(snapshot) if snapshot is not None else self.snapshot()

    def scan(self, set_name: str, checkpoints: Sequence[str], encoding: str, verify: bool = False,
             with_rows: bool = False, limit: int | None = None, snapshot=None
             ) -> Iterator[tuple[int, list[Block], list[dict] | None]]:
        """Yield (start row, [Block per checkpoint], row metadata or None) block by block.

        Covers the rows every checkpoint holds (at most `limit`). One read transaction spans
        the scan, so it sees one consistent snapshot even while an ingest writes. The arrays
        are zero-copy views into the map, valid until the scan ends, or until `snapshot` (from
        `Store.snapshot()`) exits when one is given: copy what must outlive that.
        """
        enc = parse_encoding(encoding)
        with self._reading(snapshot) as txn:
            rec = self._set_record(txn, set_name)
            layout = self._encoding_layout(rec, set_name, enc)
            idx = [self._checkpoint_index(txn, c) for c in checkpoints]
            n = rows_in_every(rec["written"], checkpoints)
            n = n if limit is None else min(n, limit)
            block_rows = layout["block_rows"]
            meta_iter = self._iter_rows(txn, rec["id"]) if with_rows else None
            for b in range((n + block_rows - 1) // block_rows):
                start = b * block_rows
                take = min(block_rows, n - start)
                blocks = []
                for c, ci in zip(checkpoints, idx):
                    blk = self._read_block(txn, rec, layout, set_name, enc, c, ci, b, verify)
                    blocks.append(Block(start, blk.payload[:take], blk.scale[:take], blk.norm[:take],
                                        None if blk.extra is None else blk.extra[:take]))
                metas = [next(meta_iter) for _ in range(take)] if with_rows else None
                yield start, blocks, metas

    def scan_rows(self, set_name: str, checkpoints: Sequence[str], encoding: str,
                  rows, snapshot=None) -> Iterator[tuple[np.ndarray, np.ndarray, list[Block]]]:
        """Yield (row numbers, their positions in the block, [Block per checkpoint]) for the
        stored blocks that hold any of the given rows, in row order.

        `rows` must be increasing and held by every checkpoint. Each Block is a whole stored
        block, zero-copy as in `scan`: its rows `positions` are the ones asked for, and only
        their pages are read when a kernel reads just those (kernels take them as `at`). One
        read transaction spans the scan (or `snapshot`'s).
        """
        enc = parse_encoding(encoding)
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or (len(rows) > 1 and (np.diff(rows) <= 0).any()):
            raise ValueError("scan_rows: rows must be a 1-D array of increasing row numbers")
        with self._reading(snapshot) as txn:
            rec = self._set_record(txn, set_name)
            layout = self._encoding_layout(rec, set_name, enc)
            idx = [self._checkpoint_index(txn, c) for c in checkpoints]
            n = rows_in_every(rec["written"], checkpoints)
            if len(rows) and not 0 <= rows[0] <= rows[-1] < n:
                raise ValueError(f"scan_rows: rows {rows[0]}..{rows[-1]} are outside the {n} rows"
                                 f" every checkpoint of {set_name!r} holds")
            br = layout["block_rows"]
            blocks_of = rows // br
            cuts = np.flatnonzero(np.diff(blocks_of)) + 1
            for picked in np.split(rows, cuts) if len(rows) else []:
                b = int(picked[0] // br)
                blocks = [self._read_block(txn, rec, layout, set_name, enc, c, ci, b)
                          for c, ci in zip(checkpoints, idx)]
                yield picked, picked - b * br, blocks

    def _read_block(self, txn, rec: dict, layout: dict, set_name: str, enc: Encoding,
                    checkpoint: str, ci: int, b: int, verify: bool = False) -> Block:
        """Block b of one (set, checkpoint, encoding): views into the map; missing is corrupt."""
        where = f"{self.path}: set {set_name!r} checkpoint {checkpoint!r} encoding {enc.name} block {b}"
        return read_block(txn, self._dbs["blocks"], rec["id"], ci, enc.name, layout, b, where, verify)

    def _encoding_layout(self, rec: dict, set_name: str, enc: Encoding) -> dict:
        if enc.name not in rec["encodings"]:
            raise UnknownNameError(
                f"set {set_name!r} has no encoding {enc.name!r}; it holds: {_listing(rec['encodings'])}")
        return rec["encodings"][enc.name]

    def n_rows(self, set_name: str, checkpoints: Sequence[str] | None = None) -> int:
        """Rows stored for every one of `checkpoints` (all checkpoints written when None)."""
        written = self.set_info(set_name)["written"]
        return rows_in_every(written, checkpoints if checkpoints is not None else list(written))

    def read(self, set_name: str, checkpoint: str, encoding: str) -> quant.QuantizedRows:
        """The stored rows of one (set, checkpoint, encoding), copied out of the store."""
        parts = [b.rows() for _, (b,), _ in self.scan(set_name, [checkpoint], encoding)]
        return quant.QuantizedRows.concat(parts) if parts else self._no_rows(parse_encoding(encoding))

    def info(self) -> dict:
        """A JSON-safe summary: dim, projection, model, checkpoints, sets with bytes per encoding."""
        with self.env.begin(buffers=True) as txn:
            ckpts = [loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]
            sets = []
            for k, v in txn.cursor(db=self._dbs["sets"]):
                rec = loads(v)
                sizes = {}
                for enc in rec["encodings"]:
                    total = 0
                    for ci in range(len(ckpts)):
                        prefix = block_prefix(rec["id"], ci, encoding_key(rec["encodings"][enc], enc))
                        cur = txn.cursor(db=self._dbs["blocks"])
                        if cur.set_range(prefix):
                            for bk, bv in cur:
                                if not bytes(bk).startswith(prefix):
                                    break
                                total += len(bv)
                    sizes[enc] = total
                centroids = {}
                for ci, c in enumerate(ckpts):
                    raw = txn.get(centroid_key(rec["id"], ci), db=self._dbs["centroids"])
                    if raw is not None:
                        centroids[c["name"]] = float(np.linalg.norm(decode_centroid(raw)))
                sets.append((rec["id"], bytes(k).decode(), {
                    "kind": rec["kind"], "rows": rec["n_rows"], "subtasks": len(rec["subtasks"]),
                    "written": rec["written"], "encodings": sizes,
                    "scales": rec.get("scales", {}),
                    "centroid_norms": centroids,  # |c| per checkpoint, for centered encodings
                }))
        return {
            "path": self.path,
            "format_version": self.meta["format_version"],
            "dim": self.dim,
            "projection": self.meta["projection"],
            "model": self.meta["model"],
            "lora": self.meta["lora"],
            "checkpoints": ckpts,
            "sets": {name: summary for _, name, summary in sorted(sets)},
            "file_bytes": os.path.getsize(os.path.join(self.path, DATA_FILE)),
        }

    def query(self, text: str):
        """Run a query (see docs/query.md): a Result with .ids, .scores, .rows, .plan.

        ``EXPLAIN ...`` returns the Plan without scanning.
        """
        return run(self, text)

    def vectors(self, set_name: str, checkpoint: str, encoding: str = "f16") -> np.ndarray:
        """Dequantized float32 vectors (n, dim) of one set at one checkpoint, in row order."""
        rows = self.read(set_name, checkpoint, encoding)
        vectors = quant.dequantize(rows.payload, rows.scale, encoding, self.dim)
        if parse_encoding(encoding).centered and len(vectors):
            vectors += self.centroid(set_name, checkpoint)  # rows hold the residuals x - c
        return vectors


def refuse_global(encs: list[Encoding]) -> None:
    for enc in encs:
        if enc.global_scale:
            raise SchemaMismatchError(
                f"encoding {enc.name!r} needs the whole set's scale; write per-row encodings"
                " and derive it with requantize")


def check_unique_ids(ids: list[str], set_name: str) -> None:
    seen: dict[str, int] = {}
    for i, row_id in enumerate(ids):
        if row_id in seen:
            raise DuplicateIdError(
                f"set {set_name!r}: id {row_id!r} appears twice in one batch (positions {seen[row_id]} and {i})")
        seen[row_id] = i


def _listing(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "(none)"
