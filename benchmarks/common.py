"""Shared helpers for the store-level benchmarks (bench_query, bench_memory).

- ``machine()``: cores, CPU model, numba threads, load average (others may share the box).
- ``print_table`` / ``write_json``: a plain text table on stdout, results JSON under
  benchmarks/results/.
- Synthetic LESS-shaped data: ``Shape`` fixes rows, dim, checkpoints (with LESS's learning
  rates) and the task; ``build_stores`` streams deterministic vectors in batches into one or
  more stores (each with its own encodings), so no full-shape matrix is ever held in RAM.

The vectors have the structure of real projected gradients: every row of a checkpoint shares
a dominant direction (mean pairwise cosine about 0.8), plus one of 64 topic directions
(the 57 MMLU subtasks are topics 0..56, so some training rows are more relevant than others),
plus noise. Everything derives from (seed, checkpoint, row), never from the batch size.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

import gradstore
from qless.data import Example

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
STORES_DIR = ROOT / "stores"  # git-ignored

# LESS's training pool (Xia et al. 2024): 270,679 rows from four sources.
LESS_SOURCES = (("flan_v2", 100_000), ("cot", 100_000), ("dolly", 15_011), ("oasst1", 55_668))
LESS_LRS = (1.69e-5, 1.26e-5, 0.84e-5, 0.42e-5)  # one per warmup epoch (linear decay)
CATEGORIES = {
    "flan_v2": ("cot_gsm8k", "anli_r1", "natural_questions", "trivia_qa", "wmt16_translate"),
    "cot": ("gsm8k", "strategyqa", "creak", "ecqa", "qasc"),
    "dolly": ("open_qa", "general_qa", "classification", "brainstorming", "summarization"),
    "oasst1": ("conversation",),
}
N_TOPICS = 64


@dataclass(frozen=True)
class Shape:
    n_train: int = 270_679
    dim: int = 8192
    lrs: tuple[float, ...] = LESS_LRS
    n_sub: int = 57
    per_sub: int = 5
    batch: int = 4096
    seed: int = 0
    cos: float = 0.8  # target mean pairwise cosine of train rows of one checkpoint

    @property
    def n_val(self) -> int:
        return self.n_sub * self.per_sub

    @property
    def ckpts(self) -> list[str]:
        return [f"epoch-{i + 1}" for i in range(len(self.lrs))]


# ---- machine and output --------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(int(x.split()[1]) * 1024 for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = None
    from gradstore import kernels

    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "numba_threads": numba.get_num_threads(),
        "ram_gib": round(mem / 2**30, 1) if mem else None,
        "vnni": kernels.HAS_VNNI,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """Print rows as a fixed-width table (floats to 4 significant places); return the text."""
    def fmt(v):
        if isinstance(v, float):
            if v == 0 or 1e-3 <= abs(v) < 1e6:
                return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.1f}"
            return f"{v:.3e}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                           for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


class Timer:
    """with Timer() as t: ...; t.s is wall seconds, t.cpu the process CPU seconds (all threads).

    On a shared box wall time depends on the other load; cpu / cores is a floor for the wall
    time this process would take on idle cores.
    """

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


# ---- disk ------------------------------------------------------------------------------------


def disk_usage(path) -> dict:
    """Bytes of data.mdb on disk (allocated blocks) and its apparent size."""
    f = Path(path) / "data.mdb"
    st = f.stat()
    return {"du_bytes": st.st_blocks * 512, "apparent_bytes": st.st_size}


def evict(path) -> bool:
    """Drop a store's file from the page cache (posix_fadvise DONTNEED, no root needed)."""
    f = Path(path) / "data.mdb"
    try:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def cached_fraction(path) -> float | None:
    """Fraction of data.mdb resident in the page cache (via `fincore`, when installed)."""
    f = Path(path) / "data.mdb"
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", str(f)],
                             capture_output=True, text=True, check=True).stdout.split()
        res, size = int(out[0]), int(out[1])
        return res / size if size else None
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return None


def remove_store(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- synthetic vectors -------------------------------------------------------------------------


@njit(inline="always")
def _splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    z = x
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(parallel=True, nogil=True, cache=True)
def _fill_rows(out, base, topics, topic_of, key, row0, a, b, c):
    """out[i] = a*base + b*topics[topic_of[i]] + c*noise(key, row0 + i), noise ~ N(0, 1)-ish.

    Noise: each 64-bit draw of a per-row xorshift stream gives four 16-bit uniforms whose
    sum (Irwin-Hall, n=4) is scaled to unit variance.
    """
    n, d = out.shape
    inv = np.float32(math.sqrt(3.0) / 32768.0)  # 4 uniforms on [-1, 1): variance 4/3 -> 1
    mask = np.uint64(0xFFFF)
    for i in prange(n):
        s = _splitmix(key ^ _splitmix(np.uint64(row0 + i)))
        if s == 0:
            s = np.uint64(1)
        t = topic_of[i]
        for j in range(d):
            s ^= s << np.uint64(13)
            s ^= s >> np.uint64(7)
            s ^= s << np.uint64(17)
            u = (np.int64(s & mask) + np.int64((s >> np.uint64(16)) & mask)
                 + np.int64((s >> np.uint64(32)) & mask) + np.int64(s >> np.uint64(48)) - 131070)
            out[i, j] = a * base[j] + b * topics[t, j] + c * np.float32(u) * inv * np.float32(0.5)


class Generator:
    """Deterministic LESS-shaped vectors: `train(ckpt, row0, n)` and `task(ckpt)`."""

    def __init__(self, shape: Shape):
        self.shape = shape
        d = shape.dim
        rng = np.random.default_rng([shape.seed, 12345])
        unit = lambda v: (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
        common = rng.standard_normal(d)
        # The dominant direction turns a little between epochs, as a model's gradients do.
        self.bases = [unit(common + 0.35 * rng.standard_normal(d)) for _ in shape.lrs]
        self.topics = unit(rng.standard_normal((N_TOPICS, d)))
        # x = a*base + b*topic + c*noise/sqrt(d): pairwise cosine ~ a^2 (+ b^2 for one topic)
        self.train_abc = (math.sqrt(shape.cos - 0.02), math.sqrt(0.05), math.sqrt(0.17))
        self.task_abc = (math.sqrt(shape.cos - 0.02), math.sqrt(0.10), math.sqrt(0.12))

    def _key(self, kind: int, ckpt: int) -> np.uint64:
        return np.uint64((self.shape.seed * 1_000_003 + kind * 101 + ckpt) * 0x2545F4914F6CDD1D
                         % (1 << 64))

    def train_topics(self, row0: int, n: int) -> np.ndarray:
        rows = np.arange(row0, row0 + n, dtype=np.uint64)
        return ((rows * np.uint64(2654435761)) >> np.uint64(7)).astype(np.int64) % N_TOPICS

    def train(self, ckpt: int, row0: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((n, self.shape.dim), np.float32) if out is None else out[:n]
        a, b, c = self.train_abc
        _fill_rows(out, self.bases[ckpt], self.topics, self.train_topics(row0, n),
                   self._key(1, ckpt), row0, np.float32(a), np.float32(b),
                   np.float32(c / math.sqrt(self.shape.dim)))
        return out

    def task(self, ckpt: int) -> np.ndarray:
        s = self.shape
        out = np.empty((s.n_val, s.dim), np.float32)
        a, b, c = self.task_abc
        topic_of = np.repeat(np.arange(s.n_sub, dtype=np.int64), s.per_sub)
        _fill_rows(out, self.bases[ckpt], self.topics, topic_of, self._key(2, ckpt), 0,
                   np.float32(a), np.float32(b), np.float32(c / math.sqrt(s.dim)))
        return out


def mean_pairwise_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = u @ u.T
    n = len(x)
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


# ---- row metadata ----------------------------------------------------------------------------


def _source_bounds(n_train: int) -> list[tuple[str, int, int]]:
    """(source, first row, end row): LESS's four sources, scaled to n_train rows."""
    total = sum(c for _, c in LESS_SOURCES)
    out, lo = [], 0
    for i, (name, count) in enumerate(LESS_SOURCES):
        hi = n_train if i == len(LESS_SOURCES) - 1 else lo + round(count * n_train / total)
        out.append((name, lo, hi))
        lo = hi
    return out


def train_metadata(n_train: int, row0: int, n: int) -> tuple[list[str], list[dict]]:
    """Ids and row metadata (`Example.to_row`, what the real ingest stores) of synthetic rows."""
    ids, metas = [], []
    bounds = _source_bounds(n_train)
    for row in range(row0, row0 + n):
        name, lo, _ = next(b for b in bounds if b[1] <= row < b[2])
        k = row - lo
        h = (row * 2654435761) & 0xFFFFFFFF
        cats = CATEGORIES[name]
        cat = cats[h % len(cats)]
        tokens = 64 + (h >> 8) % 1984
        ids.append(f"{name}_{cat}_{k}")
        # byte offset of line k: lines average ~4.2 bytes per token plus JSON framing
        ex = Example(ids[-1], [], [], f"/data/less/train/processed/{name}/{name}_data.jsonl",
                     int(k * 2150 + (h % 997)), k + 1,
                     metadata={"source": name, "category": cat, "tokens": int(tokens)})
        metas.append(ex.to_row())
    return ids, metas


def task_metadata(shape: Shape) -> tuple[list[str], list[str], list[dict]]:
    ids, subtasks, metas = [], [], []
    for s in range(shape.n_sub):
        for j in range(shape.per_sub):
            ids.append(f"mmlu_subject_{s:02d}_dev_{j}")
            subtasks.append(f"subject_{s:02d}")
            metas.append({"source": "mmlu", "tokens": 300 + 7 * j,
                          "source_file": f"/data/less/eval/mmlu/dev/subject_{s:02d}_dev.csv",
                          "offset": j * 400, "line": j + 1})
    return ids, subtasks, metas


# ---- building stores -------------------------------------------------------------------------


@dataclass
class BuildReport:
    rows: int
    seconds_total: float = 0.0
    seconds_generate: float = 0.0
    seconds_write: dict = field(default_factory=dict)  # store path -> seconds in store.write

    def to_dict(self) -> dict:
        return asdict(self)


def build_stores(targets: list[tuple[str, tuple[str, ...]]], shape: Shape, with_task: bool = True,
                 with_metadata: bool = True, n_rows: int | None = None,
                 progress: bool = True, task_encodings_extra: tuple[str, ...] = (),
                 first_row: int = 0) -> BuildReport:
    """Create each (path, encodings) store and stream the same synthetic rows into all of them:
    `n_rows` (default all) from `first_row` on (a shard of the pool; rows depend on their number only).

    Checkpoint by checkpoint (as the real ingest), `shape.batch` rows per write transaction.
    Each vector batch is generated once and written to every target. The task set gets
    `task_encodings_extra` on top (e.g. f16, for asymmetric queries against a quantized pool).
    """
    n = shape.n_train if n_rows is None else n_rows
    gen = Generator(shape)
    stores = []
    for path, encs in targets:
        remove_store(path)
        st = gradstore.create(path, dim=shape.dim,
                              projection={"kind": "rademacher", "seed": shape.seed, "dim": shape.dim})
        for name, lr in zip(shape.ckpts, shape.lrs):
            st.add_checkpoint(name, lr=lr, epoch=int(name.split("-")[1]))
        stores.append((st, tuple(encs)))
    rep = BuildReport(rows=n, seconds_write={p: 0.0 for p, _ in targets})
    t_start = time.perf_counter()
    buf = np.empty((shape.batch, shape.dim), np.float32)
    if with_task:
        vids, vsubs, vmeta = task_metadata(shape)
        for ci, ck in enumerate(shape.ckpts):
            v = gen.task(ci)
            for (st, encs), (p, _) in zip(stores, targets):
                t = time.perf_counter()
                tencs = tuple(dict.fromkeys(encs + tuple(task_encodings_extra)))
                st.write("mmlu", ck, v, vids, kind="task", encodings=tencs, metadata=vmeta,
                         subtasks=vsubs)
                rep.seconds_write[p] += time.perf_counter() - t
    n_batches = (n + shape.batch - 1) // shape.batch
    for ci, ck in enumerate(shape.ckpts):
        for bi in range(n_batches):
            row0 = first_row + bi * shape.batch
            m = min(shape.batch, first_row + n - row0)
            t = time.perf_counter()
            x = gen.train(ci, row0, m, buf)
            if with_metadata:
                ids, metas = train_metadata(shape.n_train, row0, m)
            else:
                ids, metas = [f"r{r}" for r in range(row0, row0 + m)], None
            rep.seconds_generate += time.perf_counter() - t
            for (st, encs), (p, _) in zip(stores, targets):
                t = time.perf_counter()
                st.write("train", ck, x, ids, kind="train", encodings=encs, metadata=metas)
                rep.seconds_write[p] += time.perf_counter() - t
            if progress and (bi % 16 == 15 or bi == n_batches - 1):
                el = time.perf_counter() - t_start
                done = ci * n_batches + bi + 1
                print(f"  build {ck}: {row0 + m - first_row:,}/{n:,} rows, {el:.0f} s elapsed, "
                      f"~{el / done * (len(shape.ckpts) * n_batches - done):.0f} s left", flush=True)
    for st, _ in stores:
        st.close()
    rep.seconds_total = time.perf_counter() - t_start
    return rep
