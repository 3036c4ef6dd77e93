"""A sharded store: shard stores listed in a manifest, queried in place.

`open_sharded(manifest)` starts a worker per shard, where the shard is (a Ray actor on its node,
or a thread here), and never opens a shard itself: each worker opens its shard read-only and
describes it (`merge.describe`: meta, checkpoints with lr, per set its record and ids), and the
driver checks those descriptions with merge's own checks and messages (same dim, projection,
model, LoRA config, one lr per checkpoint, the same encodings), plus what querying in place
needs: every shard holds the same checkpoints and no id is in two shards. It then answers
queries as the store `merge` would build from the shards in manifest order: a set's rows are
the shards' rows one after the other, so row numbers, ids, scores and ties (the lower row wins:
shard order, then row) are the merged store's.

A query is planned once, on the whole, from the descriptions (TOP p% counts the rows of every
shard; a WHERE-filtered percentage is the sum of the shards' counts of the rows that pass; task
rows come from the shards that hold them), then fanned out: each shard runs a stage over its
own rows under one snapshot and returns its best (row numbers and scores, never vectors), and
the driver keeps the best of those. A two-stage plan takes two rounds, so that the rerank sees
the merged store's shortlist: every shard returns its first-stage best `keep`, the driver keeps
the global shortlist, and each shard reranks only its rows of it. `SCORE` returns every shard's
scores in row order. The selected rows' metadata (and `rows`, `rows_at`, `read`, `vectors`)
comes from the workers too.

Shards run on a thread pool in this process (the default), or on Ray actors (`ray=True`;
`pip install 'gradstore[ray]'`), one per shard, placed on the node its manifest entry names
(else on the driver's node), each keeping its shard's LMDB environment open between queries.
On Ray the driver needs no access to the shards' files: only the actors read them.

Centered encodings are scored per shard against that shard's centroid (each shard froze its
own, which is why `merge` cannot combine their rows); with a shared centroid the scores equal
one store's.

Manifest (JSON; relative paths are relative to the manifest's folder):

    {"shards": [{"path": "shard-0", "node": "10.0.0.5"}, {"path": "shard-1"}]}

`node` (optional): a Ray node id, or the IP address of one alive Ray node.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from . import quant
from .errors import DuplicateIdError, GradstoreError, SchemaMismatchError, UnknownNameError
from .format import rows_in_every
from .ops.merge import StoreDescription, _merge_plan, describe
from .query import run
from .query.executor import Result, _TopK, in_row_order, run_stage, stage_scorers
from .query.planner import Plan
from .store import open as open_store

MANIFEST_FIELDS = {"path", "node"}
MANIFEST = "manifest.json"  # what `ingest --ray` writes beside its shards


@dataclass(frozen=True)
class Shard:
    path: str  # absolute
    node: str | None = None  # Ray node id or IP address


class ManifestError(GradstoreError, ValueError):
    "A shard manifest that is not valid JSON or not the expected layout."


def read_manifest(path) -> list[Shard]:
    """The shards a manifest lists, paths made absolute; one-line errors naming the file and field."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not JSON ({exc})") from None
    shards = doc.get("shards") if isinstance(doc, dict) else None
    if not isinstance(shards, list) or not shards:
        raise ManifestError(f"{path}: expected an object whose \"shards\" is a non-empty list")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, entry in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: expected an object with \"path\" (and optional \"node\")")
        unknown = sorted(set(entry) - MANIFEST_FIELDS)
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r} (fields: node, path)")
        shard_path, node = entry.get("path"), entry.get("node")
        if not isinstance(shard_path, str) or not shard_path:
            raise ManifestError(f"{where}.path: expected the shard store's path as a string")
        if node is not None and (not isinstance(node, str) or not node):
            raise ManifestError(f"{where}.node: expected a Ray node id or IP address as a string")
        out.append(Shard(os.path.realpath(os.path.join(base, shard_path)), node))
    seen = {}
    for i, s in enumerate(out):
        if s.path in seen:
            raise ManifestError(f"{path}: shards[{i}].path: the same store as shards[{seen[s.path]}]")
        seen[s.path] = i
    return out


def write_manifest(path, shards: list[Shard]) -> None:
    """Write a manifest listing `shards` (paths relative to its folder when inside it)."""
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for s in shards:
        rel = os.path.relpath(s.path, base)
        entry = {"path": rel if not rel.startswith("..") else s.path}
        if s.node:
            entry["node"] = s.node
        entries.append(entry)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"shards": entries}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _check_shardable(descriptions: list[StoreDescription], plan: dict) -> None:
    """Beyond merge's checks: the same checkpoints everywhere, and no id in two shards."""
    first, *rest = descriptions
    names = [c["name"] for c in first.checkpoints]
    for d in rest:
        theirs = [c["name"] for c in d.checkpoints]
        if theirs != names:
            raise SchemaMismatchError(
                f"cannot shard: checkpoints differ: {first.path} has {', '.join(names) or 'none'},"
                f" {d.path} has {', '.join(theirs) or 'none'}")
    for name, p in plan["sets"].items():
        for path, ids in p.get("src_ids", {}).items():
            for row_id in ids:
                first = p["ids"][row_id][0]  # merge's plan: the first source holding the id
                if first != path:
                    raise DuplicateIdError(f"cannot shard: id {row_id!r} of set {name!r} is in"
                                           f" both {first} and {path}")


@dataclass(frozen=True)
class _MergedSet:
    """What a sharded store keeps of one set: the merged store's record of it, and the shards
    holding its rows, in order, with where those rows fall in the merged set."""

    info: dict  # set_info: kind, n_rows, written per checkpoint, encodings, subtasks
    spans: list[tuple[int, int, int]]  # (shard index, first merged row, rows)
    written: dict[int, dict]  # shard index -> its rows per checkpoint

    @classmethod
    def of(cls, name: str, p: dict, descriptions: list[StoreDescription]) -> _MergedSet:
        """From merge's plan of the set (`p`) and the shards' descriptions."""
        held = {i: d.sets[name] for i, d in enumerate(descriptions) if name in d.sets}
        spans, start = [], 0
        for i in held:
            n = len(p.get("src_ids", {}).get(descriptions[i].path, ()))
            if n:
                spans.append((i, start, n))
                start += n
        layouts = {e: layout for rec in held.values() for e, layout in rec["encodings"].items()}
        info = {"kind": p["kind"], "n_rows": len(p["ids"]),
                "written": {c: sum(w for _, w in parts) for c, parts in p["parts"].items()},
                "encodings": {e: layouts[e] for e in p["encodings"] + p["global"]},
                "subtasks": list(dict.fromkeys(s for rec in held.values() for s in rec["subtasks"]))}
        return cls(info, spans, {i: rec["written"] for i, rec in held.items()})


def open_sharded(manifest, ray: bool = False) -> ShardedStore:
    """Open the shard stores a manifest lists as one read-only store (see the module docstring).

    `ray`: run each shard's side on a Ray actor (starts a local Ray instance unless one is
    running or RAY_ADDRESS names a cluster); default: a thread pool in this process.
    """
    return ShardedStore(manifest, read_manifest(manifest), ray)


class ShardedStore:
    """Shard stores read as the one store merging them in manifest order would be.

    Knows them only by what their workers report: their descriptions (`merge.describe`) for the
    checks, of which it keeps each set's merged record and where its rows lie; rows, ids, task
    rows and vectors are asked of the workers. Offers what the planner and readers use: `sets`,
    `set_info`, `checkpoints`, `n_rows`, `n_passing`, `rows`, `ids`, `rows_at`, `read`,
    `vectors`, `query`.
    """

    def __init__(self, manifest, shards: list[Shard], ray: bool = False):
        self.path = os.fspath(manifest)
        self.shards = shards
        self._workers = None
        try:
            self._workers = _RayWorkers(self.path, shards) if ray else _LocalWorkers(shards)
            descriptions = self._workers.call("describe", list(range(len(shards))), ())
            plan = _merge_plan(descriptions)
            _check_shardable(descriptions, plan)
        except BaseException:
            self.close()
            raise
        # Every row's id was for the checks: what is kept does not grow with the rows.
        self.meta = descriptions[0].meta
        self._checkpoints = plan["ckpt_records"]
        self._sets = {name: _MergedSet.of(name, p, descriptions) for name, p in plan["sets"].items()}

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<gradstore.ShardedStore {self.path!r} {len(self.shards)} shards>"

    # ---- the merged store's records ------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.meta["dim"]

    def checkpoints(self) -> list[dict]:
        return list(self._checkpoints)

    def checkpoint_names(self) -> list[str]:
        return [c["name"] for c in self._checkpoints]

    def sets(self) -> list[str]:
        return list(self._sets)

    def _set(self, set_name: str) -> _MergedSet:
        merged = self._sets.get(set_name)
        if merged is None:
            raise UnknownNameError(f"unknown set {set_name!r}; the sharded store has:"
                                   f" {', '.join(self._sets) or '(none)'}")
        return merged

    def set_info(self, set_name: str) -> dict:
        """The merged set's record: kind, n_rows, written per checkpoint, encodings, subtasks."""
        return self._set(set_name).info

    def n_rows(self, set_name: str, checkpoints=None) -> int:
        written = self.set_info(set_name)["written"]
        return rows_in_every(written, checkpoints if checkpoints is not None else list(written))

    def _spans(self, set_name: str) -> list[tuple[int, int, int]]:
        return self._set(set_name).spans

    def _ask(self, shards: list[int], method: str, *args, each: list | None = None) -> list:
        """store.method(*args[, each[j]]) of shard shards[j], on its worker; answers in order."""
        calls = [[(*args, *(() if each is None else (each[j],)))] for j in range(len(shards))]
        return [answer for (answer,) in self._workers.call("ask", shards, (method,), calls)]

    def rows_at(self, set_name: str, rows) -> list[dict]:
        """Row metadata for merged row numbers, in the order given (from the shards holding them)."""
        spans = self._spans(set_name)
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted([start for _, start, _ in spans], rows, side="right") - 1
        asked = []  # (shard, where its rows stand in `rows`, its first merged row)
        for j, (i, start, _) in enumerate(spans):
            at = np.flatnonzero(which == j)
            if len(at):
                asked.append((i, at, start))
        answers = self._ask([i for i, _, _ in asked], "rows_at", set_name,
                            each=[rows[at] - start for _, at, start in asked])
        out: list[dict | None] = [None] * len(rows)
        for (_, at, _), records in zip(asked, answers):
            for j, rec in zip(at, records):
                out[j] = rec
        return out

    def rows(self, set_name: str) -> list[dict]:
        return self.rows_at(set_name, np.arange(self.set_info(set_name)["n_rows"]))

    def ids(self, set_name: str) -> list[str]:
        spans = self._spans(set_name)
        answers = self._ask([i for i, _, _ in spans], "ids", set_name)
        return [row_id for ids, (_, _, n) in zip(answers, spans) for row_id in ids[:n]]

    def n_passing(self, set_name: str, where, limit: int) -> int:
        """How many of the merged set's first `limit` rows pass `where`, counted by the shards."""
        mine = [(i, min(n, limit - start)) for i, start, n in self._spans(set_name) if start < limit]
        counts = self._ask([i for i, _ in mine], "n_passing", set_name, where, each=[m for _, m in mine])
        return sum(counts)

    def read(self, set_name: str, checkpoint: str, encoding: str) -> quant.QuantizedRows:
        """The stored rows of one (set, checkpoint, encoding), the shards' one after another
        (sent by their workers: a task set's few rows, or a whole train set if asked)."""
        key = (set_name, checkpoint, encoding)
        return self._read_all([key])[key]

    def _read_all(self, keys) -> dict[tuple[str, str, str], quant.QuantizedRows]:
        """`read` of every (set, checkpoint, encoding) key, in one call to each shard holding any:
        a query's task rows at every checkpoint cost one round trip, not one per key."""
        holders = {key: [i for i, _, _ in self._spans(key[0])] for key in keys}
        shards = sorted({i for held in holders.values() for i in held})
        asked = [[key for key, held in holders.items() if i in held] for i in shards]
        parts: dict[tuple, list] = {key: [] for key in holders}
        for mine, answers in zip(asked, self._workers.call("ask", shards, ("read",), asked)):
            for key, rows in zip(mine, answers):
                parts[key].append(rows)
        return {key: quant.QuantizedRows.concat(rows) for key, rows in parts.items()}

    def vectors(self, set_name: str, checkpoint: str, encoding: str = "f16") -> np.ndarray:
        """Dequantized float32 vectors (centered rows with their own shard's centroid), sent by
        the shards' workers."""
        shards = [i for i, _, _ in self._spans(set_name)]
        return np.concatenate(self._ask(shards, "vectors", set_name, checkpoint, encoding))

    # ---- queries -------------------------------------------------------------------------
    def query(self, text: str):
        """Run a query (docs/query.md) over every shard: as the merged store would answer it."""
        return run(self, text, _execute)


def _execute(sharded: ShardedStore, plan: Plan) -> Result:
    """Fan the plan out to the shards, a round per stage, and keep the best of their answers."""
    whole = sharded._set(plan.set_name)
    spans = [(i, start, n) for i, start, n in whole.spans
             if rows_in_every(whole.written[i], plan.checkpoints)]
    # the task rows every stage reads, each fetched once from the shards holding them
    tasks = sharded._read_all(dict.fromkeys(
        (t.name, c, stage.task_encodings[i])
        for stage in plan.stages for i, t in enumerate(plan.tasks) for c in plan.checkpoints))
    workers, shards = sharded._workers, [i for i, _, _ in spans]
    qid = uuid.uuid4().hex

    def merged(answers) -> list[tuple[np.ndarray, np.ndarray]]:  # shard rows -> merged rows
        return [(s, r + start) for (s, r), (_, start, _) in zip(answers, spans)]

    try:
        answers = workers.call("first", shards, (qid, plan, tasks))
        scores, rows = _best(merged(answers), plan.stages[0].keep)
        if len(plan.stages) > 1:
            rows = np.sort(rows)
            mine = [rows[(rows >= start) & (rows < start + n)] - start for _, start, n in spans]
            answers = workers.call("rerank", shards, (qid, plan), mine)
            scores, rows = _best(merged(answers), plan.k)
    finally:
        workers.call("finish", shards, (qid,), quiet=True)
    records = sharded.rows_at(plan.set_name, rows)
    return Result([r["id"] for r in records], scores, rows, plan, records)


def _best(parts: list[tuple[np.ndarray, np.ndarray]], keep: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The shards' answers (merged row numbers, in shard order) as one store's: its `keep` best
    (ties to the lower row), or, for SCORE, every score in row order."""
    if keep is None:
        return in_row_order(parts)
    top = _TopK(keep)
    for s, r in parts:
        top.push(s, r)
    return top.best()


class _TaskRows:
    """What a shard's scorer reads to prepare the task side: the sharded store's task rows
    (shipped with the query), and the shard's own centroids for centered train rows."""

    def __init__(self, store, rows: dict):
        self.store, self.rows = store, rows

    @property
    def dim(self) -> int:
        return self.store.dim

    def read(self, set_name: str, checkpoint: str, encoding: str) -> quant.QuantizedRows:
        return self.rows[set_name, checkpoint, encoding]

    def vectors(self, set_name: str, checkpoint: str, encoding: str) -> np.ndarray:
        rows = self.rows[set_name, checkpoint, encoding]  # task rows are never centered
        return quant.dequantize(rows.payload, rows.scale, encoding, self.dim)

    def centroid(self, set_name: str, checkpoint: str):
        return self.store.centroid(set_name, checkpoint)


class ShardWorker:
    """One shard's side of a sharded store, where the shard lives: describes it, answers reads
    of it, and runs a plan's stages over its rows under one snapshot held from the first round
    to `finish`. A Ray actor on the shard's node, or an object on the local pool.

    The store opens on first use: an error opening it reaches the driver as itself (Ray reports
    an actor's __init__ error only as text), and a restarted actor reopens it.
    """

    def __init__(self, path: str):
        self.path = path
        self._store = None
        self._queries: dict[str, tuple[contextlib.ExitStack, object, list]] = {}

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.path)
        return self._store

    def describe(self) -> StoreDescription:
        return describe(self.store)

    def ask(self, method: str, calls: list[tuple]) -> list:
        """store.method(*args) for each args in `calls`: reads of the shard's store (opened
        read-only) for the driver, which never opens it."""
        return [getattr(self.store, method)(*args) for args in calls]

    def first(self, qid: str, plan: Plan, tasks: dict):
        # every stage's task side before the snapshot (see executor.execute)
        scorers = stage_scorers(_TaskRows(self.store, tasks), plan)
        stack = contextlib.ExitStack()
        snap = stack.enter_context(self.store.snapshot())
        self._queries[qid] = (stack, snap, scorers)
        return run_stage(self.store, plan, scorers[0], snap)

    def rerank(self, qid: str, plan: Plan, rows: np.ndarray):
        if qid not in self._queries:
            raise GradstoreError(f"{self.store.path}: this shard's worker restarted during the query"
                                 " (its first round is lost); run the query again")
        _, snap, scorers = self._queries[qid]
        return run_stage(self.store, plan, scorers[1], snap, rows)

    def finish(self, qid: str) -> None:
        held = self._queries.pop(qid, None)
        if held is not None:
            held[0].close()

    def where(self) -> tuple[str, int]:
        """(Ray node id, process id) of this worker on Ray: where its shard is read."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def close(self) -> None:
        for qid in list(self._queries):
            self.finish(qid)
        if self._store is not None:
            self._store.close()


class _LocalWorkers:
    """The shards' workers on a thread pool in this process."""

    def __init__(self, shards: list[Shard]):
        self.workers = [ShardWorker(s.path) for s in shards]
        self.pool = ThreadPoolExecutor(len(shards), thread_name_prefix="gradstore-shard")

    def call(self, method: str, shards: list[int], common: tuple, each: list | None = None,
             quiet: bool = False) -> list:
        """worker.method(*common[, each[j]]) on shards[j], all at once; their answers in order.
        `quiet`: a worker's failure is not raised (its answer is left out)."""
        futures = [self.pool.submit(getattr(self.workers[i], method), *common,
                                    *(() if each is None else (each[j],)))
                   for j, i in enumerate(shards)]
        wait(futures)  # all of them, even when one failed: `finish` must come after every `first`
        return [f.result() for f in futures if not (quiet and f.exception())]

    def close(self) -> None:
        self.pool.shutdown()
        for w in self.workers:
            w.close()


class _RayWorkers:
    """One Ray actor per shard, on the node its manifest entry names (else the driver's)."""

    # A worker that dies is restarted (its shard reopened); a call it was running is retried
    # there, so a lost first round is redone, and a lost rerank fails with a clear error.
    MAX_RESTARTS = 3

    def __init__(self, manifest: str, shards: list[Shard]):
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ModuleNotFoundError:
            raise GradstoreError("ray is not installed; running shards on Ray needs"
                                 " pip install 'gradstore[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False)
        alive = [n for n in ray.nodes() if n["Alive"]]
        named: dict[str, set[str]] = {}  # a node id or address -> the alive nodes it names
        for n in alive:
            for key in (n["NodeID"], n["NodeManagerAddress"]):
                named.setdefault(key, set()).add(n["NodeID"])
        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(ShardWorker)
        self.shards = shards
        self.actors = []
        for i, s in enumerate(shards):
            node = here
            if s.node is not None:
                where = f"{manifest}: shards[{i}].node {s.node!r}"
                if s.node not in named:
                    raise GradstoreError(f"{where}: no alive Ray node has that id or address"
                                         f" ({', '.join(n['NodeManagerAddress'] for n in alive)})")
                if len(named[s.node]) > 1:  # several nodes on one machine (or behind one address)
                    raise GradstoreError(f"{where}: {len(named[s.node])} alive Ray nodes have that"
                                         " address; name the node by its id")
                (node,) = named[s.node]
            self.actors.append(actor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                max_restarts=self.MAX_RESTARTS, max_task_retries=1).remote(s.path))

    def call(self, method: str, shards: list[int], common: tuple, each: list | None = None,
             quiet: bool = False) -> list:
        """As _LocalWorkers.call; `common` is put in the object store once for every shard."""
        ray = self.ray
        common = [ray.put(a) for a in common]
        refs = [getattr(self.actors[i], method).remote(*common, *(() if each is None else (each[j],)))
                for j, i in enumerate(shards)]
        out = []
        for i, ref in zip(shards, refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                if not quiet:
                    raise exc.cause from None
            except ray.exceptions.RayActorError as exc:
                if not quiet:
                    raise GradstoreError(
                        f"{self.shards[i].path}: its Ray worker died during the query and the"
                        f" query was not answered; run it again ({type(exc).__name__})") from None
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
