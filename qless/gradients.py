"""Per-example gradients of the response-token loss w.r.t. the LoRA parameters.

`GradientComputer(model, optimizer_state, mode)` gives, per example, a flat float32 vector in the
model's trainable-parameter order (the order `optimizer_state.load_optimizer_state` uses):
- mode "sgd" (target-task examples): the gradient g of the mean cross-entropy over the
  response tokens (labels != -100), as `model(**batch).loss` computes it at batch size 1;
- mode "adam" (training examples): LESS's Adam update direction, exactly as its
  `obtain_gradients_with_adam`: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2,
  direction = m' / sqrt(v' + eps) (eps inside the sqrt, no bias correction), with the
  checkpoint's AdamW betas and eps (0.9, 0.999, 1e-8 by default, as LESS).

Two paths to the same vectors:
- `batched(examples)` (the default): examples sorted by length and grouped into
  batches of at most `token_budget` tokens; one forward and one backward per batch. A batch is
  packed (the examples one after the other in one sequence, position ids restarting per
  example, attention kept inside each example by `qless.packing`) where the model dispatches
  attention through transformers' attention interface, else padded (right, no attention mask
  needed: the model is causal; a pad position has no loss and no later real token attends to
  it, so it contributes nothing). Every LoRA layer runs as one `qless.lora_update.LoRAUpdate`,
  whose backward records each LoRA weight's input x_t and output gradient d_t; example e's
  weight gradient is sum_{t in e} d_t x_t^T (for lora_A that is (B^T d) x^T, for lora_B
  d (A x)^T, the LoRA scaling folded into d). Each
  token's loss is weighted by 1 / (its example's response-token count), so each example's
  gradient is that of its own mean loss, as at batch size 1. The loss applies the output head
  itself (`HeadCrossEntropy`), only at positions that predict a label and a few hundred rows at
  a time, so the batch's logits are never whole; a model whose logits are more than the head's
  output (soft-capping, a logit scale) is refused.
  `batched(examples, projection)` (what ingest runs) yields the projected vectors instead, never
  forming the (n, dim) per-example gradients: per LoRA module, in parameter order, its (n, size)
  block is formed, turned into the Adam direction (that module's columns of m and v) and its
  projection accumulated (`Projection.accumulate`): `projection.project` of `batched`'s vectors
  to float32 rounding (the sums run in another order).
- `gradient(example)`: LESS's loop, one forward and backward per example (its forward asks
  only for the logits of positions that predict a label), through the model's own attention:
  the reference the tests hold the batched path to (cosine >= 0.9999 per row in fp32).

Memory: activations grow with the token budget; without a projection the per-example
gradients of a batch, float32 (n, dim), are capped at `gradient_bytes` by limiting the examples
per batch; with one a batch holds n x the projection's dim and one module's block, so only the
token budget bounds it.

Mode: the model runs in eval mode, as in LESS (`from_pretrained` returns an eval-mode model and
LESS never calls `train()`), so LoRA dropout is off and the gradient is deterministic.
The model runs in its dtype (per-example weight gradients too, as autograd's at batch 1) and
vectors come out float32, with float32 Adam arithmetic. An
example with no response token (all labels -100 after truncation) has no loss: it gets no vector
(`gradient` returns None) and `skipped` counts it (its Adam direction would be pure momentum,
the same for every such row).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ADAM_BETAS, ADAM_EPS
from .config import IngestConfig
from .data import IGNORE_INDEX
from .lora_update import lora_layer, recording
from .model import disable_cpu_repacking
from .optimizer_state import flatten_state, trainable_parameters
from .packing import pack_attention
from .projection import CHUNK

DEFAULT_GRADIENT_BYTES = 512 << 20
# Logit rows per step of the batch loss (16 x a 49K vocabulary in float32 stays in L2), and
# bytes of logits per step of the output head (256 rows of a 49K vocabulary in bf16; the matrix
# products of steps much smaller run slower).
LOSS_ROWS = 16
HEAD_BYTES = 24 << 20


def _token_tensors(input_ids, labels, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An example's input_ids and labels as 1-D long tensors; a one-line error unless they are
    flat lists of one length."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    lab = torch.as_tensor(labels, dtype=torch.long, device=device)
    if ids.shape != lab.shape or ids.ndim != 1:
        raise ValueError(f"input_ids and labels must be equal-length lists, got "
                         f"{len(input_ids)} and {len(labels)}")
    return ids, lab


def response_tokens(example) -> int:
    """How many positions predict a label (the label at position 0 predicts nothing)."""
    return sum(1 for y in example.labels[1:] if y != IGNORE_INDEX)


class HeadCrossEntropy(torch.autograd.Function):
    """sum_k weight_k * cross_entropy(hidden_k @ head^T, target_k): the output head and the loss
    at once, with the gradient autograd would give (the logits in the model's dtype, upcast to
    float32 for the loss as HF's loss does). The head runs on HEAD_BYTES of logits at a time, the
    loss on LOSS_ROWS rows of those at a time, so the logits, float32 log-probabilities and their
    gradient are never whole (vocabulary x response tokens: ~100-200 MB each for a 2K-token batch
    of a 49K-word model, on fresh pages every batch); the gradient overwrites the logits it came
    from. The gradient w.r.t. `hidden` is formed in the forward (the batch needs exactly one
    backward)."""

    @staticmethod
    def forward(ctx, hidden, head, target, weight):
        n, vocab = hidden.shape[0], head.shape[0]
        step = max(LOSS_ROWS, HEAD_BYTES // (vocab * head.element_size()) // LOSS_ROWS * LOSS_ROWS)
        buffer = hidden.new_empty(min(n, step), vocab)
        grad = torch.empty_like(hidden)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, n, step):
            logits = buffer[:min(step, n - a)]
            torch.mm(hidden[a:a + step], head.T, out=logits)
            for start in range(0, logits.shape[0], LOSS_ROWS):
                rows = slice(start, start + LOSS_ROWS)
                y = target[a + start:a + start + LOSS_ROWS, None]
                w = weight[a + start:a + start + LOSS_ROWS, None]
                logp = torch.log_softmax(logits[rows], -1, dtype=torch.float32)
                loss -= (w * logp.gather(1, y)).sum()
                logits[rows] = logp.exp_().mul_(w).scatter_add_(1, y, -w)  # w (softmax - onehot)
            torch.mm(logits, head, out=grad[a:a + step])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad.mul_(upstream.to(grad.dtype)), None, None, None


class GradientComputer:
    """Flat per-example LoRA gradients (mode "sgd") or Adam directions (mode "adam")."""

    def __init__(self, model, optimizer_state: Any = None, mode: str = "adam",
                 token_budget: int = IngestConfig.token_budget, gradient_bytes: int = DEFAULT_GRADIENT_BYTES,
                 betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS, pack: bool = True):
        if mode not in ("adam", "sgd"):
            raise ValueError(f"mode must be 'adam' or 'sgd', got {mode!r}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.model = model
        self.mode = mode
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no trainable parameters (attach or load LoRA first)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.token_budget = token_budget
        self.max_rows = max(1, gradient_bytes // (4 * self.dim))
        self.skipped = 0
        # Seconds in the model's forward and backward, forming per-example gradients from the
        # recorded tensors (the part a factored projection could replace), and projecting them.
        self.seconds = {"model": 0.0, "per_example": 0.0, "projection": 0.0}
        # Tokens the batches ran through the model, and those of the examples (the rest is padding).
        self.tokens = {"run": 0, "real": 0}
        self.m = self.v = None
        self.betas, self.eps = betas, eps  # the checkpoint's (Checkpoint.betas, .eps)
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
        # Packed batches carry no padding; `pack=False` (or a model packing cannot serve) pads.
        self.packed = pack and pack_attention(model)

    def _direction(self, g: torch.Tensor, start: int = 0) -> torch.Tensor:
        """g itself (sgd), or the Adam direction of g (rows or one vector), in place of g; g holds
        the coordinates [start, start + g.shape[-1]) (one module's block, or the whole vector)."""
        if self.mode == "sgd":
            return g
        beta1, beta2 = self.betas
        width = g.shape[-1]
        for a in range(0, width, CHUNK):  # chunks: the temporaries stay in cache
            b = min(a + CHUNK, width)
            state = slice(start + a, start + b)
            g_ = g[..., a:b]
            v = (g_ * g_).mul_(1 - beta2).add_(self.v[state], alpha=beta2)
            g_.mul_(1 - beta1).add_(self.m[state], alpha=beta1).div_(v.add_(self.eps).sqrt_())
        return g

    # -- the default path: length-sorted batches (packed or padded), per-example gradients from
    # -- the factors each LoRA layer records

    def _cost(self, lengths: list[int]) -> int:
        """Tokens a batch of examples of these lengths (longest first) runs through the model."""
        return sum(lengths) if self.packed else len(lengths) * lengths[0]

    def batches(self, examples: Sequence, capped: bool = True) -> list[list[int]]:
        """Indices of `examples` grouped into batches, longest first, each at most `token_budget`
        tokens (a longer example is a batch alone) and, if `capped` (the (n, dim) vectors are
        formed), `max_rows` examples. Examples without response tokens are left out."""
        max_rows = self.max_rows if capped else len(examples)
        order = sorted((i for i, ex in enumerate(examples) if response_tokens(ex) > 0),
                       key=lambda i: -len(examples[i].input_ids))
        out: list[list[int]] = []
        lengths: list[int] = []
        for i in order:
            n = len(examples[i].input_ids)
            if out and len(out[-1]) < max_rows and self._cost(lengths + [n]) <= self.token_budget:
                out[-1].append(i)
                lengths.append(n)
            else:
                out.append([i])
                lengths = [n]
        return out

    def _lora_layers(self) -> list[tuple[torch.nn.Module, str]]:
        """Each trainable parameter's PEFT LoRA layer and adapter, in parameter order (one entry per
        layer); a one-line error unless every trainable parameter is a plain LoRA weight."""
        layers = {}
        for name in self.names:
            layer, _, adapter = lora_layer(name, self.model)
            layers[layer, adapter] = None
        return list(layers)

    def _output_head(self) -> torch.nn.Linear:
        """The output embedding, which the batch loss applies itself (`HeadCrossEntropy`)."""
        head = self.model.get_output_embeddings()
        rescaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                    if getattr(self.model.config, k, None) not in (None, 1)]
        if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad or rescaled:
            raise ValueError("batched gradients need the output embedding to be a frozen bias-free "
                             "Linear whose outputs are the logits"
                             + (f" ({rescaled[0]} rescales them)" if rescaled else ""))
        return head

    def _inputs(self, examples: Sequence) -> tuple[dict, torch.Tensor, torch.Tensor, list[int], list[int]]:
        """The model's inputs for one batch (on its device); each position's target (the next token's label, -100
        where it predicts none) and loss weight, flattened over the batch; each example's first
        flat position (packed: its offset in the sequence; padded: its row's) and length."""
        lengths = [len(ex.input_ids) for ex in examples]
        width = sum(lengths) if self.packed else max(lengths)  # flat length of one row of the batch
        starts = list(itertools.accumulate(lengths, initial=0)) if self.packed else \
            [b * width for b in range(len(examples) + 1)]
        ids = torch.zeros(starts[-1], dtype=torch.long)
        target = torch.full((starts[-1],), IGNORE_INDEX, dtype=torch.long)
        weight = torch.zeros(starts[-1])
        for ex, start, k in zip(examples, starts, lengths):
            example_ids, labels = _token_tensors(ex.input_ids, ex.labels)
            ids[start:start + k] = example_ids
            target[start:start + k - 1] = labels[1:]
            labelled = target[start:start + k] != IGNORE_INDEX
            if not labelled.any():
                raise ValueError("batch_tensor: an example has no response tokens (use batches())")
            weight[start:start + k][labelled] = 1.0 / int(labelled.sum())
        if self.packed:  # the boundaries stay on the CPU: the attention reads them as numbers
            inputs = {"input_ids": ids[None].to(self.device),
                      "position_ids": torch.cat([torch.arange(k) for k in lengths])[None].to(self.device),
                      "cu_seq_lens_q": torch.tensor(starts)}
        else:  # no attention mask: padding is on the right, so no real token sees a pad
            inputs = {"input_ids": ids.view(len(examples), width).to(self.device)}
        return inputs, target, weight, starts, lengths

    def _module_vectors(self, examples: Sequence, out: torch.Tensor | None = None
                        ) -> Iterator[tuple[int, torch.Tensor]]:
        """One forward and backward of `examples` (each with response tokens), then per LoRA
        module in parameter order (its first coordinate, the float32 (n, size) block of the
        examples' vectors: g or its Adam direction, on the model's device). Blocks are written
        into `out` (n, dim) when given, else each is new."""
        inputs, target, weight, starts, lengths = self._inputs(examples)
        self.tokens["run"] += inputs["input_ids"].numel()
        self.tokens["real"] += sum(lengths)
        keep = target != IGNORE_INDEX
        target, weight = target[keep].to(self.device), weight[keep].to(self.device)
        keep = keep.view(inputs["input_ids"].shape).to(self.device)

        layers = self._lora_layers()
        head = self._output_head()
        kept: list[torch.Tensor] = []

        def to_the_loss(module, args):  # the loss runs the head, on positions that predict a label
            kept.append(args[0][keep])
            return (args[0][..., :0, :],)

        t0 = time.perf_counter()
        handle = head.register_forward_pre_hook(to_the_loss)
        try:
            with recording(layers) as record, torch.enable_grad():
                self.model(**inputs, use_cache=False)
                loss = HeadCrossEntropy.apply(kept.pop(), head.weight, target, weight)
                loss.backward(inputs=self.params)  # fills `record`; the weights get no gradient
        finally:
            handle.remove()
        self.seconds["model"] += time.perf_counter() - t0
        offset = 0
        for p in self.params:
            t0 = time.perf_counter()
            x, d = record.pop(p)
            # Written in place (a new tensor per example, converted row by row, took 3x as long for
            # r=128 lora_A shapes alone, ~10% more of the per-example time in the model).
            each = torch.empty(len(examples), *p.shape, dtype=d.dtype, device=self.device)
            for e, (start, k) in enumerate(zip(starts[:-1], lengths)):
                torch.mm(d[start:start + k].T, x[start:start + k], out=each[e])
            each = each.view(len(examples), p.numel())
            block = each.float() if out is None else out[:, offset:offset + p.numel()].copy_(each)
            self.seconds["per_example"] += time.perf_counter() - t0
            yield offset, self._direction(block, offset)
            offset += p.numel()

    def batch_tensor(self, examples: Sequence) -> torch.Tensor:
        """float32 (n, dim) vectors of `examples` (each with response tokens) from one forward
        and backward, on the model's device."""
        out = torch.empty(len(examples), self.dim, dtype=torch.float32, device=self.device)
        for _ in self._module_vectors(examples, out):
            pass
        return out

    def batch_projected(self, examples: Sequence, projection) -> torch.Tensor:
        """float32 (n, projection.dim): `projection.project(batch_tensor(examples))` without
        forming the (n, dim) vectors (each module's block is projected, then dropped)."""
        acc = projection.accumulator(len(examples), self.device)
        for offset, block in self._module_vectors(examples):
            t0 = time.perf_counter()
            projection.accumulate(acc, block, offset)
            self.seconds["projection"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = projection.finish(acc)
        self.seconds["projection"] += time.perf_counter() - t0
        return out

    def batched(self, examples: Sequence, projection=None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices into `examples`, their float32 (n, dim) vectors) per batch, in batch order;
        examples without response tokens appear in none and are counted in `skipped`. With a
        `projection` (a `qless.projection.Projection` of this computer's dim), the vectors are
        projected, (n, projection.dim), module by module (`batch_projected`), and batches are
        not capped at `max_rows`: no (n, dim) buffer is formed."""
        if projection is not None and projection.input_dim != self.dim:
            raise ValueError(f"the projection takes {projection.input_dim} coordinates, "
                             f"the model has {self.dim} trainable")
        plan = self.batches(examples, capped=projection is None)
        self.skipped += len(examples) - sum(len(b) for b in plan)
        for idx in plan:
            batch = [examples[i] for i in idx]
            yield idx, (self.batch_tensor(batch) if projection is None
                        else self.batch_projected(batch, projection))

    def gradients(self, examples: Iterable) -> Iterator[tuple[Any, np.ndarray | None]]:
        """(example, float32 vector or None without response tokens) for each example, in order."""
        examples = list(examples)
        vectors: list[np.ndarray | None] = [None] * len(examples)
        for idx, rows in self.batched(examples):
            for i, row in zip(idx, rows.cpu().numpy()):
                vectors[i] = row
        yield from zip(examples, vectors)

    # -- the reference: LESS's batch-1 loop --

    def _loss(self, input_ids: list[int], labels: list[int]) -> torch.Tensor | None:
        ids, lab = _token_tensors(input_ids, labels, self.device)
        target = lab[1:]  # position t predicts token t+1
        keep = torch.nonzero(target != IGNORE_INDEX).flatten()
        if keep.numel() == 0:
            return None
        out = self.model(input_ids=ids[None], logits_to_keep=keep, use_cache=False)
        logits = out.logits[0].float()  # HF's loss upcasts the logits too
        return F.cross_entropy(logits, target[keep])

    def raw_gradient(self, example) -> torch.Tensor | None:
        """Batch 1: g as one float32 tensor on the model's device, or None without response tokens."""
        with torch.enable_grad():
            loss = self._loss(example.input_ids, example.labels)
            if loss is None:
                return None
            grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1).float() for g in grads])

    def gradient_tensor(self, example) -> torch.Tensor | None:
        """Batch 1: the vector this computer stands for (g or the Adam direction), on the model's device."""
        g = self.raw_gradient(example)
        return None if g is None else self._direction(g)

    def gradient(self, example) -> np.ndarray | None:
        """Batch 1: float32 (dim,) numpy vector, or None (and `skipped` += 1) without response tokens."""
        t = self.gradient_tensor(example)
        if t is None:
            self.skipped += 1
            return None
        return t.cpu().numpy()
