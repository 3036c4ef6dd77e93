#!/usr/bin/env bash
# Ingest examples/s on a CUDA GPU: LESS's batch-1 loop vs qless's packed and padded batches, SmolLM2-135M bf16,
# real pool rows up to 512 and 1,024 tokens, LoRA r=8 and 128 (bergson is not run: its
# environment is the CPU one). Needs a Python with a CUDA build of torch and this project
# installed: PY=/path/to/python (default .venv/bin/python). Writes benchmarks/results/ingest_cuda.json.
#   bash benchmarks/gpu_check.sh                 # 128 rows per configuration, 16,384-token batches
#   ROWS=32 TOKEN_BUDGET=8192 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
"$PY" -m pytest -q -m gpu ../tests/test_qless_gradients.py
exec "$PY" bench_ingest.py --device cuda --rows "${ROWS:-128}" --token-budget "${TOKEN_BUDGET:-16384}" --no-bergson --no-filed
