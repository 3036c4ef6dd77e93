"""qless: models, data, LESS's warmup, per-example LoRA gradients and their projection."""

import logging

# bitsandbytes, imported by peft, warns on every CPU with AVX512-BF16 that it cannot fetch its
# packed-weight inference kernel from the hub (the `kernels` package). qless never wants that
# kernel: it has no backward, and `qless.model.disable_cpu_repacking` turns its path off. So the
# fallback is the intended path, and only that one message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))
