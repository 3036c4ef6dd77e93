"""Adam state (exp_avg, exp_avg_sq) of the LoRA parameters, read from a checkpoint folder.

Formats read by `load_optimizer_state`, first found wins:
- `optimizer_state.safetensors`: ours (`save_optimizer_state`), keyed `<param name>.exp_avg` and
  `<param name>.exp_avg_sq`;
- `optimizer.pt` / `optimizer.bin`: a torch optimizer `state_dict()` as the HF Trainer (LESS) and
  accelerate save it, loaded with `torch.load(weights_only=True)`. Its `state` is keyed either by
  parameter name or by integer index. An integer index is a position in the optimizer's
  parameter groups, which the Trainer fills in the model's own `named_parameters()` order
  (layer 0..N, q, k, v, o, A before B). It is NOT the adapter file's order (string-sorted:
  layers.0, layers.1, layers.10, ...): pairing those by position is wrong, and some wrong
  pairings pass a shape check. So integer keys are mapped through the model's parameter order.

Names are compared in a canonical form (peft's `base_model.model.` prefixes and the adapter name
segment, e.g. `.default.`, removed), so state saved from a peft model matches another peft model
or an adapter file's names. Every tensor's shape is checked against its parameter.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

OURS = "optimizer_state.safetensors"
TRAINER_FILES = ("optimizer.pt", "optimizer.bin")
_MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimizerStateError(ValueError):
    "An optimizer state file is missing, or does not match the model's trainable parameters."


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, in the model's own order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def canonical_name(name: str, adapter: str = "default") -> str:
    """Strip peft's wrapping so names from a model, a state file or an adapter file compare."""
    while name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return re.sub(rf"\.{re.escape(adapter)}(?=\.)", "", name)


def save_optimizer_state(directory: str | os.PathLike, model, optimizer) -> Path:
    """Write the Adam moments of `model`'s trainable parameters to `directory/optimizer_state.safetensors`.

    Keyed by parameter name; written to a temp file then renamed, so a crash leaves no half file.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    step = None
    for name, p in trainable_parameters(model):
        state = optimizer.state.get(p)
        if not state or any(k not in state for k in _MOMENTS):
            raise OptimizerStateError(f"{name}: the optimizer holds no Adam state for it")
        for k in _MOMENTS:
            tensors[f"{name}.{k}"] = state[k].detach().to("cpu", torch.float32).contiguous()
        if step is None and "step" in state:
            step = int(torch.as_tensor(state["step"]).item())
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    out = path / OURS
    tmp = path / f".{OURS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "qless-adam-v1", "step": str(step)})
    os.replace(tmp, out)
    return out


def find_state_file(checkpoint_dir: str | os.PathLike) -> Path:
    """The optimizer file in a checkpoint folder (ours first, then the Trainer's)."""
    path = Path(checkpoint_dir)
    if path.is_file():
        return path
    for name in (OURS, *TRAINER_FILES):
        if (path / name).is_file():
            return path / name
    raise OptimizerStateError(
        f"{path}: no optimizer state ({OURS}, {' or '.join(TRAINER_FILES)})"
    )


def _check(file: Path, name: str, param: torch.nn.Parameter, moments: dict) -> dict:
    out = {}
    for k in _MOMENTS:
        if k not in moments:
            raise OptimizerStateError(f"{file}: parameter {name}: no {k} in the optimizer state")
        t = moments[k]
        if tuple(t.shape) != tuple(param.shape):
            raise OptimizerStateError(
                f"{file}: parameter {name}: {k} has shape {tuple(t.shape)}, "
                f"the model's parameter has {tuple(param.shape)}"
            )
        out[k] = t.detach().to("cpu", torch.float32)
    return out


def _by_name(file: Path, params, named: dict[str, dict]) -> OrderedDict:
    canon = {canonical_name(k): v for k, v in named.items()}
    out: OrderedDict = OrderedDict()
    for name, p in params:
        key = canonical_name(name)
        if key not in canon:
            raise OptimizerStateError(f"{file}: parameter {name}: not in the optimizer state")
        out[name] = _check(file, name, p, canon[key])
    return out


def _index_order(file: Path, params, groups: list[dict]) -> list[int]:
    """Integer state keys, listed in the order that matches `params` (the model's order).

    One group: its indices in order. Several non-empty groups (the Trainer's decay / no-decay
    split): the model's parameters are dealt into groups the same way, then concatenated.
    """
    group_ids = [list(g["params"]) for g in groups]
    total = sum(len(g) for g in group_ids)
    if total != len(params):
        raise OptimizerStateError(
            f"{file}: the optimizer holds {total} parameters, the model has {len(params)} trainable"
        )
    nonempty = [g for g in group_ids if g]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else []
    # HF Trainer: group 0 = decay (not bias, not a norm), group 1 = no decay, each in model order.
    no_decay = [bool(re.search(r"bias|norm", n, re.IGNORECASE)) for n, _ in params]
    sizes = [len(g) for g in group_ids]
    if len(group_ids) != 2 or sizes != [no_decay.count(False), no_decay.count(True)]:
        raise OptimizerStateError(
            f"{file}: cannot map {len(group_ids)} parameter groups of sizes {sizes} "
            f"onto the model's trainable parameters"
        )
    decay_iter, nodecay_iter = iter(group_ids[0]), iter(group_ids[1])
    return [next(nodecay_iter) if nd else next(decay_iter) for nd in no_decay]


def load_optimizer_state(checkpoint_dir: str | os.PathLike, model) -> OrderedDict:
    """{param name: {"exp_avg", "exp_avg_sq"} float32 CPU tensors} in the model's trainable order.

    Raises OptimizerStateError (one line, naming the file and the parameter) when a parameter is
    missing, a shape differs, or the counts disagree.
    """
    file = find_state_file(checkpoint_dir)
    params = trainable_parameters(model)
    if not params:
        raise OptimizerStateError(f"{file}: the model has no trainable parameters")
    if file.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(str(file))
        named: dict[str, dict] = {}
        for key, t in flat.items():
            base, _, moment = key.rpartition(".")
            named.setdefault(base, {})[moment] = t
        return _by_name(file, params, named)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OptimizerStateError(f"{file}: cannot read: {e}".splitlines()[0]) from e
    state = sd.get("state") if isinstance(sd, dict) else None
    if not isinstance(state, dict) or not state:
        raise OptimizerStateError(f"{file}: no 'state' in the optimizer state dict")
    keys = list(state)
    if all(isinstance(k, str) for k in keys):
        return _by_name(file, params, state)
    if not all(isinstance(k, int) for k in keys):
        raise OptimizerStateError(f"{file}: state keys mix names and indices")
    groups = sd.get("param_groups") or [{"params": sorted(keys)}]
    order = _index_order(file, params, groups)
    out: OrderedDict = OrderedDict()
    for (name, p), idx in zip(params, order):
        if idx not in state:
            raise OptimizerStateError(f"{file}: parameter {name}: no state at index {idx}")
        out[name] = _check(file, name, p, state[idx])
    return out


def flatten_state(state: OrderedDict, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v): the moments flattened in the state's order (the model's), float32 on `device`."""
    m = torch.cat([s["exp_avg"].reshape(-1) for s in state.values()])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state.values()])
    return m.to(device, torch.float32), v.to(device, torch.float32)
