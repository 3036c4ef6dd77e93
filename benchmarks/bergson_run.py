"""Time bergson's gradient collection on the rows, model and LoRA adapter bench_ingest.py uses.

Runs in a separate environment that has bergson (never a dependency of this project):

    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0 bergson
    .bench-venv/bin/python benchmarks/bergson_run.py ADAPTER_DIR ROWS.jsonl OUT_DIR TOKEN_BUDGET PROJ_DIM

ROWS.jsonl holds pre-tokenized rows (`input_ids`, `labels` with -100 outside the response), so
bergson sees exactly our token ids. What this times is what `bergson build` does per batch,
single process: length-grouped padded batches of at most TOKEN_BUDGET tokens, one forward
(logits at every position) and backward, per-example gradients of every LoRA Linear from its
hooks, each example's loss its mean over response tokens (`loss_reduction="mean"`), every module's
gradient projected by its own two-sided random matrices to PROJ_DIM x PROJ_DIM, written to disk.
Model loading and dataset preparation are outside the timed part (as in bench_ingest.py).
Prints one JSON line: seconds, rows, modules, peak_mib (RSS above the start of the timed part).
"""

import json
import sys
import time

import torch
from rss import PeakRSS

from peft import PeftConfig

from bergson.collection import collect_gradients
from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig
from bergson.data import allocate_batches
from bergson.utils.worker_utils import create_processor, setup_data_pipeline, setup_model_and_peft


def main(adapter, rows, out, budget, proj_dim):
    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path  # holds the tokenizer
    cfg = IndexConfig(run_path=out, overwrite=True, model=adapter, tokenizer=base, precision="bf16",
                      data=DataConfig(dataset=rows), token_batch_size=int(budget),
                      loss_reduction="mean", projection_dim=int(proj_dim))
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    ds, _ = setup_data_pipeline(cfg)
    model, targets = setup_model_and_peft(cfg)
    processor = create_processor(model, cfg, targets)
    batches = allocate_batches(ds["length"][:], cfg.token_batch_size, max_batch_size=cfg.max_batch_size)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        collect_gradients(model=model, data=ds, processor=processor, cfg=cfg, batches=batches,
                          target_modules=targets, preprocess_cfg=PreprocessConfig())
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rows": len(ds), "modules": len(targets),
                      "peak_mib": peak.mib, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
