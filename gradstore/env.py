"""A store directory's LMDB environment: one per path per process, grown on demand, compacted.

`Environment` is what a Store holds: the lmdb.Environment (reopened after fork, remapped to
what other writers grew the file to), its named databases and meta record, write
transactions that grow the map and retry, and read transactions that outlive single calls.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import threading
from typing import Iterator

import lmdb

from .errors import DiskFullError, GradstoreError, ReadOnlyError, StoreBusyError, StoreNotFoundError
from .format import DATA_FILE, DBS, LOCK_FILE, check_version, dumps, loads

DEFAULT_MAP_SIZE = 64 << 20  # grows on demand (doubling), so small stores stay small
# A write compacts the store when it leaves more free pages than this share of the file:
# below it, rewriting the whole file buys too little.
COMPACT_MIN_FREE = 0.01
_COMPACT_PREFIX = ".compacting-"


class _EnvRegistry:
    """One lmdb.Environment per real path per process (py-lmdb forbids opening a file twice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[tuple[int, str], list] = {}  # (pid, path) -> [env, handles, snapshots]

    def acquire(self, path: str, map_size: int) -> lmdb.Environment:
        key = (os.getpid(), path)
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                # Environments inherited across fork() must never be used: the pid in the
                # key makes a child open its own.
                writable = os.access(path, os.W_OK)
                env = lmdb.open(
                    path, map_size=map_size, max_dbs=len(DBS), subdir=True, readonly=not writable,
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


def used_bytes(env: lmdb.Environment) -> int:
    """Bytes of the data file up to its last page: what the map and the file must hold."""
    return (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def _adopt_growth(env: lmdb.Environment) -> None:
    """Map what another process's writes grew the store to, before the next transaction.

    Without this a long-lived handle (a reader beside an ingest, a second writer) fails with
    lmdb's MapResizedError once the data outgrow the map it opened with.
    """
    if used_bytes(env) > env.info()["map_size"]:
        env.set_mapsize(0)  # 0: adopt the size the growing writer recorded


def resolve(path) -> str:
    return os.path.realpath(os.fspath(path))


def create_environment(real: str, meta: dict, map_size: int) -> None:
    """A new environment at `real` (an empty directory) with every database and `meta`."""
    env = lmdb.open(real, map_size=map_size, max_dbs=len(DBS), subdir=True)
    try:
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in DBS}
            txn.put(b"meta", dumps(meta), db=dbs["meta"])
    finally:
        env.close()


class Environment:
    """The environment of one open store: `lmdb`, `dbs`, `meta`, `write`, `reading`."""

    def __init__(self, path: str, readonly: bool, map_size: int):
        if not os.path.isfile(os.path.join(path, DATA_FILE)):
            raise StoreNotFoundError(f"{path}: not a gradstore store (no {DATA_FILE})")
        if not readonly and not os.access(path, os.W_OK):
            raise ReadOnlyError(f"{path}: directory is not writable")
        self.path = path
        self.readonly = readonly
        self._map_size = max(map_size, os.path.getsize(os.path.join(path, DATA_FILE)))
        self._pid = -1
        self._env: lmdb.Environment | None = None
        self._connect()

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
            self.meta = loads(raw)
            check_version(self.path, self.meta.get("format_version", 0))
            self.dbs = {name: self._env.open_db(name.encode(), create=False) for name in DBS}
        except lmdb.Error as exc:
            _REGISTRY.release(self.path)
            raise StoreNotFoundError(f"{self.path}: not a gradstore store ({exc})") from None
        except GradstoreError:
            _REGISTRY.release(self.path)
            raise

    @property
    def lmdb(self) -> lmdb.Environment:
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

    def require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with readonly=False")

    def reading(self):
        """A read transaction whose views stay valid until it exits (see _EnvRegistry.reading)."""
        return _REGISTRY.reading(self.path, self.lmdb)

    def write(self, fn):
        """Run fn(txn) in one write transaction; on a full map, grow it and retry the batch."""
        self.require_writable()
        env = self.lmdb
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
    real = resolve(path)
    data = os.path.join(real, DATA_FILE)
    if not os.path.isfile(data):
        raise StoreNotFoundError(f"{path}: not a gradstore store (no {DATA_FILE})")
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
            env = lmdb.open(real, readonly=True, lock=False, max_dbs=len(DBS), subdir=True)
            try:
                if _free_bytes(env) <= min_free * before:
                    return None
                env.copy(tmp, compact=True)
            finally:
                env.close()
            with builtins.open(os.path.join(tmp, DATA_FILE), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, DATA_FILE), data)
            _fsync_dir(real)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # The lock file still holds the old file's last transaction id. LMDB's first opener
        # rewrites it from the data file; opening once while our lock keeps others out makes us
        # that opener, so nobody reads the new file through the old lock state.
        lmdb.open(real, max_dbs=len(DBS), subdir=True, create=False).close()
    finally:
        os.close(lock_fd)  # after LMDB's first open, so nobody opens in between
    return before, os.path.getsize(data)


def _lock_out_others(real: str) -> int | None:
    """A descriptor of the store's lock file holding LMDB's exclusive-open lock, or None when
    another process has the environment open (LMDB holds a shared lock on that byte while it
    is open; an opener waits for ours to go)."""
    fd = os.open(os.path.join(real, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    if _try_exclusive(fd):
        return fd
    os.close(fd)
    return None


def in_use(path) -> bool:
    """Whether another process has the LMDB environment at `path` open."""
    try:
        fd = os.open(os.path.join(resolve(path), LOCK_FILE), os.O_RDWR)
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
        for name in DBS:
            st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    return used_bytes(env) - used * main["psize"]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

