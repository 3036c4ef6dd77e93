"""Ingest spread over Ray workers: one shard store per worker, then a manifest of them.

Worker i runs `qless.ingest.ingest` on shard i of n (the i-th contiguous slice of the examples,
as `--shard i/n` takes) with its own model replica, one GPU when the cluster has GPUs, else on
CPU, and writes `out/shard-i` on the node it runs on. When every worker is done, `out/manifest.json`
lists the shards in order with the address of each one's node, so `gradstore.open_sharded`
reads them as the store merging them in order would be.

Resumable as ingest is: a re-run skips the ids each shard holds. A worker whose process or node
is lost is rerun by Ray (its task's `max_retries`), and resumes its shard; an error in the work
itself (a bad checkpoint, a full disk) is not retried but raised.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from gradstore.errors import GradstoreError
from gradstore.sharded import MANIFEST, Shard, write_manifest

from .config import IngestConfig
from .ingest import IngestReport, ingest

# Reruns of a shard whose worker was lost (a killed process, a node gone).
MAX_RETRIES = 3


def _ingest_shard(path: str, examples, shard: tuple[int, int], args: tuple, kind: str):
    """One worker: its shard into its own store. Returns (report, the node's address)."""
    import ray

    # no progress bars: a worker's would only reach Ray's log files
    report = ingest(path, examples, *args, kind=kind, shard=shard, progress=False)
    return report, ray.util.get_node_ip_address()


def ingest_on_ray(out, examples: Sequence, set_name: str, checkpoints, source,
                  config: IngestConfig = IngestConfig(), *, workers: int, kind: str = "train") -> IngestReport:
    """`ingest` over `workers` Ray workers into shard stores under the folder `out`, then
    `out/manifest.json`; the arguments are ingest's. Starts a local Ray instance unless one is
    running or RAY_ADDRESS names a cluster. Returns the summed report."""
    try:
        import ray
    except ModuleNotFoundError:
        raise GradstoreError("ray is not installed; ingest on Ray workers needs"
                             " pip install 'gradstore[ray]'") from None
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    run = ray.remote(_ingest_shard).options(num_gpus=gpus, max_retries=MAX_RETRIES)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(os.path.realpath(out), f"shard-{i}") for i in range(workers)]
    shared = ray.put(list(examples))
    refs = [run.remote(path, shared, (i, workers), (set_name, checkpoints, source, config), kind)
            for i, path in enumerate(paths)]
    results = ray.get(refs)
    write_manifest(os.path.join(out, MANIFEST), [Shard(p, node) for p, (_, node) in zip(paths, results)])
    return _total([r for r, _ in results])


def _total(reports: list[IngestReport]) -> IngestReport:
    total = IngestReport()
    for r in reports:
        total.written += r.written
        total.already_stored += r.already_stored
        total.no_response += r.no_response
        for k, v in r.seconds.items():
            total.seconds[k] += v
    rows = sum(r.written for r in reports)
    total.padding = sum(r.padding * r.written for r in reports) / rows if rows else 0.0
    return total
