"""Per-example gradients of the response-token loss w.r.t. the LoRA parameters.

`GradientComputer(model, optimizer_state, mode)` returns, for one example, a flat float32 vector
in the model's trainable-parameter order (the order `optimizer_state.load_optimizer_state` uses):
- mode "sgd" (target-task examples): the gradient g of the mean cross-entropy over the
  response tokens (labels != -100), as `model(**batch).loss` computes it at batch size 1;
- mode "adam" (training examples): LESS's Adam update direction, exactly as its
  `obtain_gradients_with_adam`: m' = 0.9 m + 0.1 g, v' = 0.999 v + 0.001 g^2,
  direction = m' / sqrt(v' + 1e-8) (eps inside the sqrt, no bias correction).

How (measured on a 2-core CPU, SmolLM2-135M, bf16): a batch-1 loop whose forward asks only for
the logits of positions that predict a label (`logits_to_keep` as an index tensor) was fastest;
vmap and padded per-example hooks were slower and used 3-10x the memory.

Mode: the model runs in eval mode, as in LESS (`from_pretrained` returns an eval-mode model and
LESS never calls `train()`), so LoRA dropout is off and the gradient is deterministic.
Gradients are computed in the model's dtype and returned in float32; the Adam arithmetic is
float32. An example with no response token (all labels -100 after truncation) has no loss:
`gradient` returns None and the caller skips and counts it (its Adam direction would be pure
momentum, the same for every such row).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import disable_cpu_repacking
from .optimizer_state import flatten_state, trainable_parameters

BETA1 = 0.9
BETA2 = 0.999
EPS = 1e-8
IGNORE = -100


class GradientComputer:
    """Flat per-example LoRA gradients (mode "sgd") or Adam directions (mode "adam")."""

    def __init__(self, model, optimizer_state: Any = None, mode: str = "adam"):
        if mode not in ("adam", "sgd"):
            raise ValueError(f"mode must be 'adam' or 'sgd', got {mode!r}")
        self.model = model
        self.mode = mode
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no trainable parameters (attach or load LoRA first)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.skipped = 0
        self.m = self.v = None
        if mode == "adam":
            if optimizer_state is None:
                raise ValueError("mode 'adam' needs the checkpoint's optimizer state")
            if isinstance(optimizer_state, tuple):
                m, v = (t.to(self.device, torch.float32).reshape(-1) for t in optimizer_state)
            else:
                if list(optimizer_state) != self.names:
                    raise ValueError(
                        "the optimizer state's parameters are not the model's trainable "
                        "parameters in the model's order (use optimizer_state.load_optimizer_state)"
                    )
                m, v = flatten_state(optimizer_state, self.device)
            if m.numel() != self.dim or v.numel() != self.dim:
                raise ValueError(
                    f"optimizer state has {m.numel()} / {v.numel()} values, "
                    f"the model has {self.dim} trainable"
                )
            self.m, self.v = m, v
        disable_cpu_repacking(model)  # a 4-bit layer must not repack for its no-backward kernel
        model.eval()

    def _loss(self, input_ids: list[int], labels: list[int]) -> torch.Tensor | None:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        lab = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if ids.shape != lab.shape or ids.ndim != 1:
            raise ValueError(f"input_ids and labels must be equal-length lists, got "
                             f"{len(input_ids)} and {len(labels)}")
        target = lab[1:]  # position t predicts token t+1
        keep = torch.nonzero(target != IGNORE).flatten()
        if keep.numel() == 0:
            return None
        out = self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False)
        logits = out.logits[0].float()  # HF's loss upcasts the logits too
        return F.cross_entropy(logits, target[keep])

    def raw_gradient(self, example) -> torch.Tensor | None:
        """g as one float32 tensor on the model's device, or None without response tokens."""
        with torch.enable_grad():
            loss = self._loss(example.input_ids, example.labels)
            if loss is None:
                return None
            grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1).float() for g in grads])

    def gradient_tensor(self, example) -> torch.Tensor | None:
        """The vector this computer stands for (g or the Adam direction), on the model's device."""
        g = self.raw_gradient(example)
        if g is None:
            return None
        if self.mode == "sgd":
            return g
        m = BETA1 * self.m + (1 - BETA1) * g
        v = BETA2 * self.v + (1 - BETA2) * g * g
        return m / torch.sqrt(v + EPS)

    def gradient(self, example) -> np.ndarray | None:
        """float32 (dim,) numpy vector, or None (and `skipped` += 1) without response tokens."""
        t = self.gradient_tensor(example)
        if t is None:
            self.skipped += 1
            return None
        return t.cpu().numpy()

    def gradients(self, examples: Iterable) -> Iterator[tuple[Any, np.ndarray | None]]:
        """(example, vector or None) for each example, in order."""
        for ex in examples:
            yield ex, self.gradient(ex)
