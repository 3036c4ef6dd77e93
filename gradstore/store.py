"""The store: one LMDB environment per directory, packed blocks of quantized rows.

Named databases (keys are fixed-width big-endian so byte order is numeric order):
- ``meta``: b"meta" -> JSON {format_version, dim, projection, model, lora, block_bytes, created}
- ``checkpoints``: u32 index -> JSON {name, lr, step, epoch, optimizer, source}
- ``sets``: name -> JSON {id, kind, n_rows, subtasks, encodings, written}
- ``rows``: set_id u32 | chunk u64 -> zlib(JSON list of up to ROW_CHUNK row records
  {id, subtask, ...user metadata}); chunks because keys and paths repeat from row to row, so
  a chunk compresses ~8x and the metadata of LESS's 270k-row pool stays near 1% of a 1-bit
  store. Writers keep an id -> row map in memory (built once from the rows, extended as
  rows are appended) for duplicate checks and resume.
- ``blocks``: set_id u32 | checkpoint u32 | encoding (24 bytes) | block u32 -> one block:
  header (magic, n rows, crc32) | payload (n x row_bytes) | scale (n x f32) | norm (n x f32)
  [| res_norm, full_norm (n x f32 each) for centered encodings]
- ``centroids``: set_id u32 | checkpoint u32 -> float32 (dim,): the centroid that centered
  encodings of that set and checkpoint subtract, frozen at their first write

Every ``write`` is one write transaction, so a killed writer leaves whole batches only.
Nothing is pickled: metadata is JSON, vectors are raw little-endian arrays.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import lmdb
import numpy as np

from . import quant
from .encodings import DEFAULT_ENCODINGS, Encoding, parse_encoding
from .errors import (
    CorruptStoreError,
    DiskFullError,
    DuplicateIdError,
    FormatVersionError,
    GradstoreError,
    InvalidVectorError,
    ReadOnlyError,
    SchemaMismatchError,
    StoreBusyError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownNameError,
)

FORMAT_VERSION = 2  # 2: row metadata in compressed chunks, no ids db, centroids db
DEFAULT_BLOCK_BYTES = 2 << 20  # ~2 MiB blocks: a few large zero-copy reads per scan
MAX_BLOCK_ROWS = 4096
DEFAULT_MAP_SIZE = 64 << 20  # grows on demand (doubling), so small stores stay small
_DATA_FILE = "data.mdb"
_LOCK_FILE = "lock.mdb"
_COMPACT_PREFIX = ".compacting-"
# A write compacts the store when it leaves more free pages than this share of the file:
# below it, rewriting the whole file buys too little.
COMPACT_MIN_FREE = 0.01
_DBS = ("meta", "checkpoints", "sets", "rows", "blocks", "centroids")
ROW_CHUNK = 256
_BLOCK_HEADER = struct.Struct("<4sII")  # magic, n_rows, crc32 of everything after the header
_BLOCK_MAGIC = b"GSB1"
_ENC_KEY_BYTES = 24


def _u32(i: int) -> bytes:
    return struct.pack(">I", i)


def _chunk_key(set_id: int, chunk: int) -> bytes:
    return struct.pack(">IQ", set_id, chunk)


def encode_rows(records: list[dict]) -> bytes:
    return zlib.compress(_dumps(records), 6)


def decode_rows(raw) -> list[dict]:
    return json.loads(zlib.decompress(bytes(raw)))


def _block_prefix(set_id: int, ckpt: int, enc: str) -> bytes:
    return struct.pack(">II", set_id, ckpt) + enc.encode().ljust(_ENC_KEY_BYTES, b"\0")


def _block_key(set_id: int, ckpt: int, enc: str, block: int) -> bytes:
    return _block_prefix(set_id, ckpt, enc) + _u32(block)


def parse_block_key(key) -> tuple[int, int, str, int]:
    """(set id, checkpoint index, encoding key, block number) of a ``blocks`` key."""
    key = bytes(key)
    set_id, ckpt = struct.unpack_from(">II", key)
    enc = key[8:8 + _ENC_KEY_BYTES].rstrip(b"\0").decode(errors="replace")
    return set_id, ckpt, enc, struct.unpack_from(">I", key, 8 + _ENC_KEY_BYTES)[0]


def _enc_key(layout: dict, name: str) -> str:
    # The name blocks are stored under: the encoding's own name, or the alternate key that
    # requantize(replace=True) wrote the replacement under, so the swap is one record update.
    return layout.get("key", name)


def alternate_key(name: str) -> str:
    """The other block key of an encoding (fits the key width, unlike a suffixed name)."""
    return f"~{zlib.crc32(name.encode()):08x}"


def _loads(raw):
    return json.loads(bytes(raw))  # bytes() also takes the memoryviews of buffers=True reads


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Block:
    """One block of rows as read from the store; arrays are views valid inside the scan."""

    start: int
    payload: np.ndarray  # uint8 (n, row_bytes)
    scale: np.ndarray  # float32 (n,)
    norm: np.ndarray  # float32 (n,)
    extra: np.ndarray | None = None  # float32 (n, 2) for centered encodings

    def rows(self, lo: int = 0, hi: int | None = None) -> quant.QuantizedRows:
        """Rows lo..hi-1 of the block, copied out of the map."""
        return quant.QuantizedRows(self.payload, self.scale, self.norm, self.extra).take(slice(lo, hi))


def encode_block(rows: quant.QuantizedRows) -> bytes:
    parts = [np.ascontiguousarray(rows.payload, np.uint8), np.ascontiguousarray(rows.scale, "<f4"),
             np.ascontiguousarray(rows.norm, "<f4")]
    if rows.extra is not None:  # column-major, like scale and norm
        parts.append(np.ascontiguousarray(np.asarray(rows.extra, "<f4").T))
    body = b"".join(p.tobytes() for p in parts)
    return _BLOCK_HEADER.pack(_BLOCK_MAGIC, len(rows.scale), zlib.crc32(body)) + body


def decode_block(value, layout: dict, start: int, where: str, verify: bool = False) -> Block:
    """Views over one stored block (zero-copy when `value` is a buffer); checks its framing.

    `layout` is the encoding's layout in its set record: row_bytes, and extra columns if any.
    """
    row_bytes, n_extra = layout["row_bytes"], layout.get("extra", 0)
    buf = memoryview(value)
    if len(buf) < _BLOCK_HEADER.size:
        raise CorruptStoreError(f"{where}: block truncated to {len(buf)} bytes")
    magic, n, crc = _BLOCK_HEADER.unpack_from(buf)
    expected = _BLOCK_HEADER.size + n * (row_bytes + 4 * (2 + n_extra))
    if magic != _BLOCK_MAGIC or len(buf) != expected:
        raise CorruptStoreError(f"{where}: block framing is wrong (size {len(buf)}, expected {expected})")
    body = buf[_BLOCK_HEADER.size:]
    if verify and zlib.crc32(body) != crc:
        raise CorruptStoreError(f"{where}: block checksum mismatch")
    payload = np.frombuffer(body, np.uint8, n * row_bytes).reshape(n, row_bytes)
    scale = np.frombuffer(body, "<f4", n, n * row_bytes)
    norm = np.frombuffer(body, "<f4", n, n * row_bytes + 4 * n)
    extra = None
    if n_extra:
        extra = np.frombuffer(body, "<f4", n_extra * n, n * row_bytes + 8 * n).reshape(n_extra, n).T
    return Block(start, payload, scale, norm, extra)


class _EnvRegistry:
    """One lmdb.Environment per real path per process (py-lmdb forbids opening a file twice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[tuple[int, str], list] = {}  # (pid, path) -> [env, refcount]

    def acquire(self, path: str, map_size: int) -> lmdb.Environment:
        key = (os.getpid(), path)
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                # Environments inherited across fork() must never be used: the pid in the
                # key makes a child open its own.
                writable = os.access(path, os.W_OK)
                env = lmdb.open(
                    path, map_size=map_size, max_dbs=len(_DBS), subdir=True, readonly=not writable,
                    lock=writable, readahead=False, metasync=True, sync=True, create=False,
                )
                entry = self._envs[key] = [env, 0, 0]  # env, handles, open snapshots
            entry[1] += 1
            return entry[0]

    @contextlib.contextmanager
    def reading(self, path: str, env: lmdb.Environment) -> Iterator:
        """A read transaction (buffers=True) that can outlive single calls: while one is open,
        no handle of this process remaps the file (that would move the pages under its views)."""
        entry = self._envs[(os.getpid(), path)]
        with self._lock:
            entry[2] += 1
        try:
            with env.begin(buffers=True) as txn:
                yield txn
        finally:
            with self._lock:
                entry[2] -= 1

    def may_remap(self, path: str) -> bool:
        with self._lock:
            entry = self._envs.get((os.getpid(), path))
            return entry is None or entry[2] == 0

    def holds(self, path: str) -> bool:
        with self._lock:
            return (os.getpid(), path) in self._envs

    def release(self, path: str) -> None:
        key = (os.getpid(), path)
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()
                del self._envs[key]


_REGISTRY = _EnvRegistry()


def _adopt_growth(env: lmdb.Environment) -> None:
    """Map what another process's writes grew the store to, before the next transaction.

    Without this a long-lived handle (a reader beside an ingest, a second writer) fails with
    lmdb's MapResizedError once the data outgrow the map it opened with.
    """
    info = env.info()
    if (info["last_pgno"] + 1) * env.stat()["psize"] > info["map_size"]:
        env.set_mapsize(0)  # 0: adopt the size the growing writer recorded


def _resolve(path) -> str:
    return os.path.realpath(os.fspath(path))


def create(path, dim: int, projection: dict | None = None, model: dict | None = None,
           lora: dict | None = None, map_size: int = DEFAULT_MAP_SIZE,
           block_bytes: int = DEFAULT_BLOCK_BYTES) -> "Store":
    """Create an empty store at `path` (a new or empty directory) and open it for writing."""
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise SchemaMismatchError(f"dim must be a positive integer, got {dim!r}")
    real = _resolve(path)
    if os.path.exists(os.path.join(real, _DATA_FILE)):
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
        _create_in(tmp, dim, projection, model, lora, map_size, block_bytes)
        if os.path.isdir(real):
            os.rmdir(real)  # empty, checked above
        os.rename(tmp, real)  # the store appears whole, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Store(real, readonly=False, map_size=map_size)


def _create_in(real: str, dim: int, projection, model, lora, map_size: int, block_bytes: int) -> None:
    env = lmdb.open(real, map_size=map_size, max_dbs=len(_DBS), subdir=True)
    try:
        meta = {
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "projection": projection or {},
            "model": model or {},
            "lora": lora or {},
            "block_bytes": int(block_bytes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in _DBS}
            txn.put(b"meta", _dumps(meta), db=dbs["meta"])
    finally:
        env.close()


def open(path, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE) -> "Store":  # noqa: A001
    """Open an existing store; read-only by default."""
    return Store(_resolve(path), readonly=readonly, map_size=map_size)


def compact(path, min_free: float = COMPACT_MIN_FREE) -> tuple[int, int] | None:
    """Rewrite the store's data file without its free pages; returns (bytes before, after).

    Rewriting a batch's last partial block frees its old pages, and LMDB keeps freed pages in
    the file: a sign1 store of 100,000 x 8192 x 4 checkpoints written in 10,000-row batches is
    1.029x its raw bits, 1.014x compacted (benchmarks/bench_memory.py). LMDB's compacting copy
    is written beside the data file and renamed over it, so a kill leaves the old file or the
    new one, both whole. Returns None, touching nothing, when the free pages are at most
    `min_free` of the file.

    Needs the store closed everywhere: another process's open environment would go on using
    the replaced file. Raises StoreBusyError when this or another process has it open.
    """
    real = _resolve(path)
    data = os.path.join(real, _DATA_FILE)
    if not os.path.isfile(data):
        raise StoreNotFoundError(f"{path}: not a gradstore store (no {_DATA_FILE})")
    if not os.access(real, os.W_OK):
        raise ReadOnlyError(f"{path}: directory is not writable")
    if _REGISTRY.holds(real):
        raise StoreBusyError(f"{path}: this process has the store open; close it before compacting")
    lock_fd = _lock_out_others(real)
    if lock_fd is None:
        raise StoreBusyError(f"{path}: another process has the store open; compact it when that is done")
    try:
        for child in os.listdir(real):  # a killed compaction's copy; our lock says none runs now
            if child.startswith(_COMPACT_PREFIX):
                shutil.rmtree(os.path.join(real, child), ignore_errors=True)
        before = os.path.getsize(data)
        tmp = tempfile.mkdtemp(prefix=_COMPACT_PREFIX, dir=real)
        try:
            # lock=False: our byte-range lock already keeps every other process out
            env = lmdb.open(real, readonly=True, lock=False, max_dbs=len(_DBS), subdir=True)
            try:
                if _free_bytes(env) <= min_free * before:
                    return None
                env.copy(tmp, compact=True)
            finally:
                env.close()
            with builtins.open(os.path.join(tmp, _DATA_FILE), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, _DATA_FILE), data)
            _fsync_dir(real)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # The lock file still holds the old file's last transaction id. LMDB's first opener
        # rewrites it from the data file; opening once while our lock keeps others out makes us
        # that opener, so nobody reads the new file through the old lock state.
        lmdb.open(real, max_dbs=len(_DBS), subdir=True, create=False).close()
    finally:
        os.close(lock_fd)  # after LMDB's first open, so nobody opens in between
    return before, os.path.getsize(data)


def _lock_out_others(real: str) -> int | None:
    """A descriptor of the store's lock file holding LMDB's exclusive-open lock, or None when
    another process has the environment open (LMDB holds a shared lock on that byte while it
    is open; an opener waits for ours to go)."""
    fd = os.open(os.path.join(real, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    if _try_exclusive(fd):
        return fd
    os.close(fd)
    return None


def in_use(path) -> bool:
    """Whether another process has the LMDB environment at `path` open."""
    try:
        fd = os.open(os.path.join(_resolve(path), _LOCK_FILE), os.O_RDWR)
    except FileNotFoundError:
        return False  # never opened with a lock file
    try:
        return not _try_exclusive(fd)
    finally:
        os.close(fd)


def _try_exclusive(fd: int) -> bool:
    # The byte LMDB's mdb_env_excl_lock locks: exclusive for the first opener, shared after.
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _free_bytes(env: lmdb.Environment) -> int:
    """Bytes of the data file that no database uses (freed pages LMDB keeps in the file)."""
    main = env.stat()
    used = 2 + main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]  # 2 meta pages
    with env.begin() as txn:
        for name in _DBS:
            st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    return (env.info()["last_pgno"] + 1 - used) * main["psize"]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A gradient store. Use `gradstore.create` / `gradstore.open` rather than this class."""

    def __init__(self, path: str, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE):
        if not os.path.isfile(os.path.join(path, _DATA_FILE)):
            raise StoreNotFoundError(f"{path}: not a gradstore store (no {_DATA_FILE})")
        if not readonly and not os.access(path, os.W_OK):
            raise ReadOnlyError(f"{path}: directory is not writable")
        self.path = path
        self.readonly = readonly
        self._map_size = max(map_size, os.path.getsize(os.path.join(path, _DATA_FILE)))
        self._pid = -1
        self._ids: dict[int, tuple[list[str], dict[str, int]]] = {}  # set id -> (ids, id -> row)
        self._env: lmdb.Environment | None = None
        self._connect()

    # ---- environment lifecycle -------------------------------------------------------
    def _connect(self) -> None:
        self._env = _REGISTRY.acquire(self.path, self._map_size)
        self._pid = os.getpid()
        try:
            # Without a txn, py-lmdb opens the handles in a transaction it commits, so they
            # outlive it (handles opened in an aborted read txn would be discarded).
            # meta first: a store of another format version may lack the other databases.
            meta_db = self._env.open_db(b"meta", create=False)
            with self._env.begin() as txn:
                raw = txn.get(b"meta", db=meta_db)
            if raw is None:
                raise StoreNotFoundError(f"{self.path}: not a gradstore store (no meta record)")
            self.meta = _loads(raw)
            _check_version(self.path, self.meta.get("format_version", 0))
            self._dbs = {name: self._env.open_db(name.encode(), create=False) for name in _DBS}
        except lmdb.Error as exc:
            _REGISTRY.release(self.path)
            raise StoreNotFoundError(f"{self.path}: not a gradstore store ({exc})") from None
        except GradstoreError:
            _REGISTRY.release(self.path)
            raise

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise GradstoreError(f"{self.path}: store is closed")
        if self._pid != os.getpid():  # after fork: never touch the parent's environment
            self._connect()
        if _REGISTRY.may_remap(self.path):
            _adopt_growth(self._env)
        return self._env

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            _REGISTRY.release(self.path)
        self._env = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # Pickling a handle means "reopen the same path" (spawned workers).
        return (open, (self.path, self.readonly))

    def __repr__(self) -> str:
        return f"<gradstore.Store {self.path!r} {'read-only' if self.readonly else 'writable'}>"

    def _write_txn(self, fn):
        """Run fn(txn) in one write transaction; on a full map, grow it and retry the batch."""
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with readonly=False")
        env = self.env
        while True:
            try:
                with env.begin(write=True) as txn:
                    return fn(txn)
            except (lmdb.MapFullError, lmdb.MapResizedError) as exc:
                if not _REGISTRY.may_remap(self.path):
                    raise GradstoreError(
                        f"{self.path}: the store's map must grow for this write, but a scan or"
                        " snapshot of it is open in this process (growing would move its pages):"
                        " finish that, then write again; nothing was written") from None
                if isinstance(exc, lmdb.MapFullError):
                    self._map_size = env.info()["map_size"] * 2
                    env.set_mapsize(self._map_size)
                else:  # another writer grew the map since we looked
                    env.set_mapsize(0)
            except (lmdb.DiskError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The transaction was aborted, so the store is exactly as after the last batch.
                raise DiskFullError(f"{self.path}: disk full while writing a batch ({exc}): free space"
                                    " and re-run; the store keeps every earlier batch") from exc

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    # ---- checkpoints ----------------------------------------------------------------
    def checkpoints(self) -> list[dict]:
        """Checkpoint records in creation order."""
        with self.env.begin() as txn:
            return [_loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]

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
            existing = [_loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]
            for old in existing:
                if old["name"] == name:
                    if old["lr"] != lr:
                        raise SchemaMismatchError(
                            f"checkpoint {name!r} already exists with lr {old['lr']}, not {lr}")
                    return old
            txn.put(_u32(len(existing)), _dumps(record), db=self._dbs["checkpoints"])
            return record

        return self._write_txn(add)

    def _checkpoint_index(self, txn, name: str) -> int:
        names = [_loads(v)["name"] for _, v in txn.cursor(db=self._dbs["checkpoints"])]
        if name not in names:
            raise UnknownNameError(f"unknown checkpoint {name!r}; the store has: {_listing(names)}")
        return names.index(name)

    # ---- sets and rows --------------------------------------------------------------
    def sets(self) -> list[str]:
        """Set names, in creation order."""
        with self.env.begin() as txn:
            records = [(_loads(v)["id"], k.decode()) for k, v in txn.cursor(db=self._dbs["sets"])]
        return [name for _, name in sorted(records)]

    def set_info(self, set_name: str) -> dict:
        with self.env.begin() as txn:
            return self._set_record(txn, set_name)

    def _set_record(self, txn, set_name: str) -> dict:
        raw = txn.get(set_name.encode(), db=self._dbs["sets"])
        if raw is None:
            names = [bytes(k).decode() for k, _ in txn.cursor(db=self._dbs["sets"])]
            raise UnknownNameError(f"unknown set {set_name!r}; the store has: {_listing(names)}")
        return _loads(raw)

    def rows(self, set_name: str) -> list[dict]:
        """Row metadata of a set in row order (each has at least id and subtask)."""
        with self.env.begin() as txn:
            return list(self._iter_rows(txn, self._set_record(txn, set_name)["id"]))

    def iter_rows(self, set_name: str) -> Iterator[dict]:
        """Row metadata of a set in row order, streamed (memory does not grow with the set)."""
        with self.env.begin() as txn:
            yield from self._iter_rows(txn, self._set_record(txn, set_name)["id"])

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
        prefix = _u32(set_id)
        chunk, skip = divmod(start, ROW_CHUNK)
        cur = txn.cursor(db=self._dbs["rows"])
        if cur.set_range(_chunk_key(set_id, chunk)):
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
        raw = txn.get(_chunk_key(set_id, chunk), db=self._dbs["rows"])
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
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with readonly=False")
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
        _check_unique(ids, set_name)
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
        _refuse_global(encs)
        center = None
        if n and any(e.centered for e in encs):
            center = self.centroid(set_name, checkpoint)
            if center is None:
                center = np.asarray(x.mean(axis=0) if centroid is None else centroid, np.float32)
        # Quantize outside the write transaction: the writer lock is held only for I/O.
        encoded = {enc.name: quant.quantize_centered(x, center, enc) if enc.centered else quant.quantize(x, enc)
                   for enc in encs} if n else {}
        rows_meta = [_row_record(i, s, m, set_name) for i, s, m in zip(ids, subtasks, metadata)]
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
                self._append_blocks(txn, rec, ckpt, enc, start, encoded.get(enc.name))
            rec["written"][checkpoint] = start + n
            txn.put(set_name.encode(), _dumps(rec), db=self._dbs["sets"])
            return rec["id"], first_row, new_ids

        if not n:
            return 0
        set_id, first_row, new_ids = self._write_txn(write)
        self._remember_ids(set_id, first_row, new_ids)
        return n

    def _get_or_create_set(self, txn, set_name: str, kind: str, encs: list[Encoding]) -> dict:
        raw = txn.get(set_name.encode(), db=self._dbs["sets"])
        names = [e.name for e in encs]
        if raw is None:
            next_id = 1 + max((_loads(v)["id"] for _, v in txn.cursor(db=self._dbs["sets"])), default=-1)
            return {"id": next_id, "kind": kind, "n_rows": 0, "subtasks": [], "written": {},
                    "encodings": {e.name: self._layout(e) for e in encs}}
        rec = _loads(raw)
        if rec["kind"] != kind:
            raise SchemaMismatchError(f"set {set_name!r} is a {rec['kind']} set, not {kind}")
        stored = [e for e in rec["encodings"] if not parse_encoding(e).global_scale]
        if sorted(stored) != sorted(names):
            raise SchemaMismatchError(
                f"set {set_name!r} holds encodings {', '.join(sorted(stored))}; this write has"
                f" {', '.join(sorted(names))} (use requantize to add encodings)")
        return rec

    def _freeze_centroid(self, txn, set_id: int, ckpt: int, set_name: str, checkpoint: str, center) -> None:
        key = struct.pack(">II", set_id, ckpt)
        stored = txn.get(key, db=self._dbs["centroids"])
        if stored is None:
            txn.put(key, np.ascontiguousarray(center, "<f4").tobytes(), db=self._dbs["centroids"])
        elif bytes(stored) != np.ascontiguousarray(center, "<f4").tobytes():
            # Another writer froze a different centroid between our read and this transaction.
            raise SchemaMismatchError(
                f"set {set_name!r} checkpoint {checkpoint!r}: its centroid changed during this write; retry")

    def centroid(self, set_name: str, checkpoint: str) -> np.ndarray | None:
        """The centroid centered encodings of (set, checkpoint) subtract, or None before any."""
        with self.env.begin() as txn:
            raw = txn.get(set_name.encode(), db=self._dbs["sets"])
            if raw is None:
                return None
            key = struct.pack(">II", _loads(raw)["id"], self._checkpoint_index(txn, checkpoint))
            stored = txn.get(key, db=self._dbs["centroids"])
        return None if stored is None else np.frombuffer(stored, "<f4").copy()

    def _layout(self, enc: Encoding) -> dict:
        row_bytes = enc.row_bytes(self.dim)
        block_rows = int(min(MAX_BLOCK_ROWS, max(1, self.meta["block_bytes"] // row_bytes)))
        layout = {"row_bytes": row_bytes, "block_rows": block_rows}
        if enc.centered:
            layout["extra"] = len(quant.CENTERED_COLUMNS)
        return layout

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
                txn.put(_chunk_key(set_id, chunk + lo // ROW_CHUNK), encode_rows(records[lo:lo + ROW_CHUNK]),
                        db=self._dbs["rows"])
            rec["n_rows"] = first_new + len(appended)
        return [r["id"] for r in appended]

    def _remember_ids(self, set_id: int, first_row: int, new_ids: list[str]) -> None:
        ids, index = self._ids.get(set_id, ([], {}))
        if len(ids) == first_row:  # else the cache is stale; _id_index rebuilds it when needed
            for row, row_id in enumerate(new_ids, start=first_row):
                ids.append(row_id)
                index.setdefault(row_id, row)

    def _append_blocks(self, txn, rec: dict, ckpt: int, enc: Encoding, start: int,
                       rows: quant.QuantizedRows) -> None:
        """Append rows after row `start`: refill the last partial block, then add new ones."""
        layout = rec["encodings"][enc.name]
        block_rows = layout["block_rows"]
        block = start // block_rows
        if start % block_rows:
            key = _block_key(rec["id"], ckpt, _enc_key(layout, enc.name), block)
            old = decode_block(txn.get(key, db=self._dbs["blocks"]), layout, block * block_rows,
                               f"block {block}")
            rows = quant.QuantizedRows.concat([old.rows(), rows])
        for lo in range(0, len(rows.scale), block_rows):
            key = _block_key(rec["id"], ckpt, _enc_key(layout, enc.name), block + lo // block_rows)
            txn.put(key, encode_block(rows.take(slice(lo, lo + block_rows))), db=self._dbs["blocks"])

    # ---- reading --------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self) -> Iterator[object]:
        """One read transaction to pass to several scans as `snapshot=`: they all see the same
        committed state, and the views they yield stay valid until this block exits."""
        with _REGISTRY.reading(self.path, self.env) as txn:
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
            n = min((rec["written"].get(c, 0) for c in checkpoints), default=0)
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
            n = min((rec["written"].get(c, 0) for c in checkpoints), default=0)
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
        raw = txn.get(_block_key(rec["id"], ci, _enc_key(layout, enc.name), b), db=self._dbs["blocks"])
        if raw is None:
            raise CorruptStoreError(f"{where}: missing")
        return decode_block(raw, layout, b * layout["block_rows"], where, verify)

    def _encoding_layout(self, rec: dict, set_name: str, enc: Encoding) -> dict:
        if enc.name not in rec["encodings"]:
            raise UnknownNameError(
                f"set {set_name!r} has no encoding {enc.name!r}; it holds: {_listing(rec['encodings'])}")
        return rec["encodings"][enc.name]

    def n_rows(self, set_name: str, checkpoints: Sequence[str] | None = None) -> int:
        """Rows stored for every one of `checkpoints` (all checkpoints written when None)."""
        rec = self.set_info(set_name)
        names = checkpoints if checkpoints is not None else list(rec["written"])
        return min((rec["written"].get(c, 0) for c in names), default=0)

    def read(self, set_name: str, checkpoint: str, encoding: str) -> quant.QuantizedRows:
        """The stored rows of one (set, checkpoint, encoding), copied out of the store."""
        parts = [b.rows() for _, (b,), _ in self.scan(set_name, [checkpoint], encoding)]
        return quant.QuantizedRows.concat(parts) if parts else self._no_rows(parse_encoding(encoding))

    def info(self) -> dict:
        """A JSON-safe summary: dim, projection, model, checkpoints, sets with bytes per encoding."""
        with self.env.begin(buffers=True) as txn:
            ckpts = [_loads(v) for _, v in txn.cursor(db=self._dbs["checkpoints"])]
            sets = []
            for k, v in txn.cursor(db=self._dbs["sets"]):
                rec = _loads(v)
                sizes = {}
                for enc in rec["encodings"]:
                    total = 0
                    for ci in range(len(ckpts)):
                        prefix = _block_prefix(rec["id"], ci, _enc_key(rec["encodings"][enc], enc))
                        cur = txn.cursor(db=self._dbs["blocks"])
                        if cur.set_range(prefix):
                            for bk, bv in cur:
                                if not bytes(bk).startswith(prefix):
                                    break
                                total += len(bv)
                    sizes[enc] = total
                centroids = {}
                for ci, c in enumerate(ckpts):
                    raw = txn.get(struct.pack(">II", rec["id"], ci), db=self._dbs["centroids"])
                    if raw is not None:
                        centroids[c["name"]] = float(np.linalg.norm(np.frombuffer(raw, "<f4")))
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
            "file_bytes": os.path.getsize(os.path.join(self.path, _DATA_FILE)),
        }

    def query(self, text: str):
        """Run a query (see docs/query.md): a Result with .ids, .scores, .rows, .plan.

        ``EXPLAIN ...`` returns the Plan without scanning.
        """
        from .query import run

        return run(self, text)

    def vectors(self, set_name: str, checkpoint: str, encoding: str = "f16") -> np.ndarray:
        """Dequantized float32 vectors (n, dim) of one set at one checkpoint, in row order."""
        rows = self.read(set_name, checkpoint, encoding)
        vectors = quant.dequantize(rows.payload, rows.scale, encoding, self.dim)
        if parse_encoding(encoding).centered and len(vectors):
            vectors += self.centroid(set_name, checkpoint)  # rows hold the residuals x - c
        return vectors

    # ---- maintenance: what gradstore.ops (merge, requantize, check) builds on ------------
    def read_range(self, set_name: str, checkpoint: str, encoding: str, start: int,
                   stop: int) -> quant.QuantizedRows:
        """Stored rows start..stop-1 of one (set, checkpoint, encoding), copied; reads only their blocks."""
        enc = parse_encoding(encoding)
        with self.env.begin(buffers=True) as txn:
            rec = self._set_record(txn, set_name)
            layout = self._encoding_layout(rec, set_name, enc)
            ci = self._checkpoint_index(txn, checkpoint)
            n = rec["written"].get(checkpoint, 0)
            if not 0 <= start <= stop <= n:
                raise ValueError(f"set {set_name!r} checkpoint {checkpoint!r}: rows {start}..{stop}"
                                 f" are outside the {n} written")
            br = layout["block_rows"]
            parts = []
            for b in range(start // br, (stop + br - 1) // br):
                blk = self._read_block(txn, rec, layout, set_name, enc, checkpoint, ci, b)
                lo, hi = max(start - b * br, 0), min(stop - b * br, br)
                if hi > len(blk.scale):
                    raise CorruptStoreError(f"{self.path}: set {set_name!r} checkpoint {checkpoint!r}"
                                            f" encoding {enc.name} block {b}: holds {len(blk.scale)}"
                                            f" rows, expected {hi}")
                parts.append(blk.rows(lo, hi))
        return quant.QuantizedRows.concat(parts) if parts else self._no_rows(enc)

    def _no_rows(self, enc: Encoding) -> quant.QuantizedRows:
        extra = np.zeros((0, len(quant.CENTERED_COLUMNS)), np.float32) if enc.centered else None
        return quant.QuantizedRows(np.zeros((0, enc.row_bytes(self.dim)), np.uint8),
                                   np.zeros(0, np.float32), np.zeros(0, np.float32), extra)

    def write_quantized(self, set_name: str, checkpoint: str, rows: dict, ids: Sequence[str],
                        kind: str = "train", metadata: Sequence[dict] | None = None) -> int:
        """Append rows already in stored form, {encoding: QuantizedRows}, in one transaction.

        As `write` (same order and duplicate rules), for copying rows between stores without a
        lossy round trip (merge). `metadata` records are taken as `rows()` returns them.
        """
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with readonly=False")
        ids = [str(i) for i in ids]
        n = len(ids)
        _check_unique(ids, set_name)
        encs = [parse_encoding(e) for e in rows]
        _refuse_global(encs)
        for enc in encs:
            if enc.centered:  # each source froze its own centroid; their residuals do not mix
                raise SchemaMismatchError(
                    f"set {set_name!r}: {enc.name} rows cannot be copied between stores (each froze"
                    " its own centroid); merge the other encodings and requantize")
        for enc in encs:
            got = rows[enc.name]
            shape = (n, enc.row_bytes(self.dim))
            if got.payload.shape != shape or got.scale.shape != (n,) or got.norm.shape != (n,):
                raise SchemaMismatchError(
                    f"set {set_name!r}: {enc.name} rows must be payload {shape}, scale and norm ({n},)")
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        rows_meta = [_row_record(i, None, m, set_name) for i, m in zip(ids, metadata)]
        return self._append_rows(set_name, checkpoint, kind, encs, ids, rows_meta, dict(rows))

    def stage_blocks(self, set_name: str, checkpoint: str, encoding: str, key: str, start: int,
                     rows: quant.QuantizedRows) -> None:
        """Write blocks of `encoding` under block key `key` from row `start` (a block boundary).

        Nothing points at them until `commit_encodings`, so readers never see them half-written;
        a re-run overwrites them.
        """
        enc = parse_encoding(encoding)
        layout = self._layout(enc)
        br = layout["block_rows"]
        if start % br:
            raise ValueError(f"stage_blocks: start {start} is not a multiple of {br} rows")

        def put(txn):
            set_id = self._set_record(txn, set_name)["id"]
            ci = self._checkpoint_index(txn, checkpoint)
            for lo in range(0, len(rows.scale), br):
                hi = lo + br
                txn.put(_block_key(set_id, ci, key, (start + lo) // br),
                        encode_block(rows.take(slice(lo, hi))),
                        db=self._dbs["blocks"])

        self._write_txn(put)

    def clear_blocks(self, set_id: int, ckpt: int, key: str, first_block: int = 0,
                     batch: int = 256) -> int:
        """Delete the blocks of (set id, checkpoint index, block key) from `first_block` on."""
        prefix = _block_prefix(set_id, ckpt, key)
        total = 0
        while True:
            def drop(txn):
                cur = txn.cursor(db=self._dbs["blocks"])
                n = 0
                if cur.set_range(_block_key(set_id, ckpt, key, first_block)):
                    while n < batch and bytes(cur.key()).startswith(prefix):
                        cur.delete()  # moves to the next record
                        n += 1
                return n

            n = self._write_txn(drop)
            total += n
            if n < batch:
                return total

    def commit_encodings(self, set_name: str, layouts: dict, scales: dict, written: dict,
                         centroids: dict | None = None) -> dict:
        """Show staged encodings in one transaction: set their layouts (with block key) and scales,
        and the centroids ({checkpoint: vector}) the staged centered encodings subtract.

        Refused if the set's `written` counts are no longer `written` (rows arrived meanwhile).
        Returns {encoding: block key it replaced} for the caller to clear.
        """
        def flip(txn):
            rec = self._set_record(txn, set_name)
            if rec["written"] != written:
                raise SchemaMismatchError(
                    f"set {set_name!r} changed while its encodings were derived; run again")
            for checkpoint, center in (centroids or {}).items():
                key = struct.pack(">II", rec["id"], self._checkpoint_index(txn, checkpoint))
                txn.put(key, np.ascontiguousarray(center, "<f4").tobytes(), db=self._dbs["centroids"])
            old = {}
            for name, layout in layouts.items():
                if name in rec["encodings"]:
                    old[name] = _enc_key(rec["encodings"][name], name)
                rec["encodings"][name] = layout
                rec.setdefault("scales", {}).pop(name, None)
                if scales.get(name):
                    rec["scales"][name] = scales[name]
            if not rec.get("scales"):
                rec.pop("scales", None)
            txn.put(set_name.encode(), _dumps(rec), db=self._dbs["sets"])
            return old

        return self._write_txn(flip)

    def block_layout(self, encoding: str) -> dict:
        """{row_bytes, block_rows} of `encoding` in this store."""
        return self._layout(parse_encoding(encoding))

    def set_records(self) -> dict:
        """Every set record by name (with its numeric id), in creation order."""
        with self.env.begin() as txn:
            recs = {bytes(k).decode(): _loads(v) for k, v in txn.cursor(db=self._dbs["sets"])}
        return dict(sorted(recs.items(), key=lambda kv: kv[1]["id"]))


def _row_record(row_id: str, subtask, metadata: dict, set_name: str) -> dict:
    if not isinstance(metadata, dict):
        raise SchemaMismatchError(f"set {set_name!r}: metadata of id {row_id!r} must be a dict")
    record = dict(metadata)
    record["id"] = row_id
    record["subtask"] = subtask if subtask is not None else metadata.get("subtask")
    try:
        _dumps(record)
    except (TypeError, ValueError) as exc:
        raise SchemaMismatchError(f"set {set_name!r}: metadata of id {row_id!r} is not JSON: {exc}") from None
    return record


def _refuse_global(encs: list[Encoding]) -> None:
    for enc in encs:
        if enc.global_scale:
            raise SchemaMismatchError(
                f"encoding {enc.name!r} needs the whole set's scale; write per-row encodings"
                " and derive it with requantize")


def _check_version(path: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: store format version {version} is newer than this gradstore"
                                 f" supports ({FORMAT_VERSION}); upgrade gradstore")
    if version < FORMAT_VERSION:
        raise FormatVersionError(f"{path}: store format version {version} is older than this gradstore"
                                 f" reads ({FORMAT_VERSION}); re-run ingest into a new store")


def _check_unique(ids: list[str], set_name: str) -> None:
    seen: dict[str, int] = {}
    for i, row_id in enumerate(ids):
        if row_id in seen:
            raise DuplicateIdError(
                f"set {set_name!r}: id {row_id!r} appears twice in one batch (positions {seen[row_id]} and {i})")
        seen[row_id] = i


def _listing(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "(none)"
