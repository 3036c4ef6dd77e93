"""Per-example LoRA gradients and LESS's Adam direction on a tiny random LLaMA."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qless import gradients
from qless.gradients import GradientComputer, HeadCrossEntropy
from qless.model import attach_lora
from qless.optimizer_state import trainable_parameters


@dataclass
class Ex:
    input_ids: list
    labels: list


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=64)
    m = attach_lora(LlamaForCausalLM(cfg), r=4, alpha=16, dropout=0.1, seed=0)
    with torch.no_grad():  # LoRA B starts at zero; make the gradient of A non-zero too
        for n, p in trainable_parameters(m):
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def example(seed=0, n=20, prompt=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n,), generator=g).tolist()
    return Ex(ids, [-100] * prompt + ids[prompt:])


def reference_grad(model, ex):
    """LESS's way: the HF loss on the full sequence, .backward(), flatten."""
    model.zero_grad()
    model.eval()
    out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
    out.loss.backward()
    g = torch.cat([p.grad.reshape(-1).float() for _, p in trainable_parameters(model)])
    model.zero_grad()
    return g.numpy()


def test_sgd_gradient_equals_hf_loss_backward(model):
    gc = GradientComputer(model, mode="sgd")
    ex = example()
    g = gc.gradient(ex)
    assert g.dtype == np.float32 and g.shape == (gc.dim,)
    np.testing.assert_allclose(g, reference_grad(model, ex), rtol=1e-4, atol=1e-6)
    assert np.abs(g).max() > 0


def test_deterministic_despite_dropout(model):
    model.train()  # the computer must put it back in eval mode (as LESS runs)
    gc = GradientComputer(model, mode="sgd")
    assert not model.training
    ex = example(1)
    np.testing.assert_array_equal(gc.gradient(ex), gc.gradient(ex))


def test_adam_direction_is_less_formula(model, monkeypatch):
    D = sum(p.numel() for _, p in trainable_parameters(model))
    rng = np.random.default_rng(0)
    m = torch.from_numpy(rng.standard_normal(D).astype(np.float32) * 1e-3)
    v = torch.from_numpy(rng.random(D).astype(np.float32) * 1e-6)
    state = {}
    offset = 0
    for n, p in trainable_parameters(model):
        k = p.numel()
        state[n] = {"exp_avg": m[offset:offset + k].view(p.shape),
                    "exp_avg_sq": v[offset:offset + k].view(p.shape)}
        offset += k
    gc = GradientComputer(model, optimizer_state=state, mode="adam")
    ex = example(2)
    g = reference_grad(model, ex).astype(np.float64)
    m2 = 0.9 * m.numpy() + 0.1 * g
    v2 = 0.999 * v.numpy() + 0.001 * g * g
    expected = m2 / np.sqrt(v2 + 1e-8)  # eps inside the sqrt, no bias correction
    np.testing.assert_allclose(gc.gradient(ex), expected, rtol=2e-3, atol=1e-4)
    wrong = m2 / (np.sqrt(v2) + 1e-8)  # the textbook form ranks differently: must not be ours
    assert not np.allclose(gc.gradient(ex), wrong, rtol=1e-2, atol=1e-3)
    # a tuple of flat moments works the same
    gc2 = GradientComputer(model, optimizer_state=(m, v), mode="adam")
    np.testing.assert_array_equal(gc2.gradient(ex), gc.gradient(ex))
    # computed in column chunks (7, dividing nothing here): the same values bit for bit
    import qless.gradients
    whole = gc.gradient(ex)
    monkeypatch.setattr(qless.gradients, "CHUNK", 7)
    np.testing.assert_array_equal(gc.gradient(ex), whole)
    monkeypatch.undo()
    # a checkpoint's own betas and eps (Checkpoint.betas, .eps) are the ones used
    gc3 = GradientComputer(model, optimizer_state=(m, v), mode="adam", betas=(0.5, 0.9), eps=1e-6)
    m3, v3 = 0.5 * m.numpy() + 0.5 * g, 0.9 * v.numpy() + 0.1 * g * g
    np.testing.assert_allclose(gc3.gradient(ex), m3 / np.sqrt(v3 + 1e-6), rtol=2e-3, atol=1e-4)


def test_no_response_tokens_returns_none_and_counts(model):
    gc = GradientComputer(model, mode="sgd")
    ids = list(range(10))
    assert gc.gradient(Ex(ids, [-100] * 10)) is None
    assert gc.gradient(Ex(ids, [5] + [-100] * 9)) is None  # label at position 0 predicts nothing
    assert gc.skipped == 2
    out = list(gc.gradients([Ex(ids, [-100] * 10), example(3)]))
    assert out[0][1] is None and out[1][1] is not None and gc.skipped == 3


def test_bf16_model_returns_float32_close_to_fp32(model):
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    ex = example(4)
    g32 = GradientComputer(model, mode="sgd").gradient(ex)
    g16 = GradientComputer(m16, mode="sgd").gradient(ex)
    assert g16.dtype == np.float32
    cos = g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32)
    assert cos > 0.98


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="optimizer state"):
        GradientComputer(model, mode="adam")
    with pytest.raises(ValueError, match="mode"):
        GradientComputer(model, mode="sign")
    with pytest.raises(ValueError, match="values"):
        GradientComputer(model, optimizer_state=(torch.zeros(3), torch.zeros(3)))


@pytest.mark.parametrize("pack", [True, False])
def test_unequal_input_ids_and_labels_are_one_line_errors_on_both_paths(model, pack):
    ex = example()
    bad = Ex(ex.input_ids, ex.labels[:-1])
    computer = GradientComputer(model, mode="sgd", pack=pack)
    for run in (lambda: computer.gradient(bad), lambda: list(computer.batched([ex, bad]))):
        with pytest.raises(ValueError, match=r"^input_ids and labels must be equal-length lists, got 20 and 19$"):
            run()


@pytest.mark.slow
def test_smollm2_gradient_matches_hf_backward():
    from qless.model import load_model

    m = attach_lora(load_model("smollm2-135m", dtype="fp32"), r=8, alpha=32, seed=0)
    ex = example(5, n=40, prompt=20)
    gc = GradientComputer(m, mode="sgd")
    g = gc.gradient(ex)
    ref = reference_grad(m, ex)
    cos = g @ ref / np.linalg.norm(g) / np.linalg.norm(ref)
    assert g.shape == (gc.dim,) and cos > 0.9999


# -- the batched path (length-bucketed padded batches, per-example gradients from hooks) --

def mixed_examples(count=9, seed=10):
    """Examples of different lengths and prompt lengths, one without response tokens."""
    out = [example(seed + i, n=6 + 5 * i % 37, prompt=2 + i % 5) for i in range(count)]
    out.insert(3, Ex(list(range(12)), [-100] * 12))
    return out


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def adam_state(model, seed=0):
    D = sum(p.numel() for _, p in trainable_parameters(model))
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal(D).astype(np.float32) * 1e-3),
            torch.from_numpy(rng.random(D).astype(np.float32) * 1e-6))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("mode", ["sgd", "adam"])
def test_batched_equals_batch1(model, mode, pack):
    exs = mixed_examples()
    gc = GradientComputer(model, adam_state(model) if mode == "adam" else None, mode=mode, token_budget=64,
                          pack=pack)
    assert gc.packed == pack
    assert len(gc.batches(exs)) > 2  # several batches, not one
    batched = list(gc.gradients(exs))
    assert batched[3][1] is None and gc.skipped == 1
    ref = np.stack([gc.gradient(e) for i, e in enumerate(exs) if i != 3])
    got = np.stack([v for i, (_, v) in enumerate(batched) if i != 3])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert cosines(got, ref).min() >= 0.9999
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5 if mode == "sgd" else 1e-3)


@pytest.mark.parametrize("projection", ["sparse nnz 1", "sparse nnz 2", "dense", "dense materialized"])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("mode", ["sgd", "adam"])
def test_fused_projection_equals_projecting_the_vectors(model, mode, pack, projection, monkeypatch):
    """batched(examples, projection) (per module: block, direction, accumulate) gives the
    projection of batched(examples)'s whole vectors, to float32 rounding, in the same batches."""
    import qless.gradients
    from qless.projection import DenseRademacher, SparseRademacher

    exs = mixed_examples()
    gc = GradientComputer(model, adam_state(model) if mode == "adam" else None, mode=mode, token_budget=64,
                          pack=pack)
    P = {"sparse nnz 1": lambda: SparseRademacher(gc.dim, dim=64, seed=1),
         "sparse nnz 2": lambda: SparseRademacher(gc.dim, dim=64, seed=1, nnz=2),
         "dense": lambda: DenseRademacher(gc.dim, dim=64, seed=1),
         "dense materialized": lambda: DenseRademacher(gc.dim, dim=64, seed=1, materialize=True)}[projection]()
    monkeypatch.setattr(qless.gradients, "CHUNK", 100)  # Adam chunks that straddle the modules' edges
    ref = [(idx, P.project(v)) for idx, v in gc.batched(exs)]
    got = list(gc.batched(exs, projection=P))
    assert [idx for idx, _ in got] == [idx for idx, _ in ref] and len(ref) > 2
    assert gc.skipped == 2  # one example without response tokens, once per pass
    for (_, a), (_, b) in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape == (b.shape[0], 64)
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    with pytest.raises(ValueError, match="projection takes"):
        next(gc.batched(exs, projection=SparseRademacher(gc.dim + 1, dim=8)))


def test_batched_sgd_equals_hf_loss_backward(model):
    exs = [example(20, n=30, prompt=10), example(21, n=12, prompt=3)]
    got = dict((id(e), v) for e, v in GradientComputer(model, mode="sgd").gradients(exs))
    for e in exs:
        np.testing.assert_allclose(got[id(e)], reference_grad(model, e), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pack, expected", [(True, [[5], [1], [3, 2], [0, 6, 4]]),
                                             (False, [[5], [1], [3], [2, 0, 6], [4]])])
def test_batches_respect_the_token_budget(model, pack, expected):
    exs = [example(i, n=n, prompt=1) for i, n in enumerate([10, 40, 12, 25, 5, 70, 10])]
    gc = GradientComputer(model, mode="sgd", token_budget=40, pack=pack)
    plan = gc.batches(exs)
    assert sorted(i for b in plan for i in b) == list(range(len(exs)))
    assert plan[0] == [5]  # longer than the budget: alone
    lengths = [len(exs[b[0]].input_ids) for b in plan]
    assert lengths == sorted(lengths, reverse=True)
    for b in plan[1:]:  # packed: the tokens; padded: the rows times the longest
        sizes = [len(exs[i].input_ids) for i in b]
        assert (sum(sizes) if pack else len(b) * max(sizes)) <= 40
    assert plan == expected
    gc.max_rows = 2
    assert all(len(b) <= 2 for b in gc.batches(exs))
    assert gc.batches(exs, capped=False) == expected  # the fused path forms no (n, dim) buffer to cap


def test_batched_bf16_selects_the_same_top_rows(model):
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    pool = [example(100 + i, n=8 + (7 * i) % 40, prompt=2 + i % 6) for i in range(60)]
    gc = GradientComputer(m16, adam_state(model, 1), mode="adam", token_budget=128)
    task = GradientComputer(m16, mode="sgd").gradient(example(999, n=30, prompt=10))
    ref = np.stack([gc.gradient(e) for e in pool])
    got = np.stack([v for _, v in gc.gradients(pool)])
    assert cosines(got, ref).min() > 0.99

    def top(x):  # LESS's score, top 5%
        return set(np.argsort(-(x @ task) / np.linalg.norm(x, axis=1))[:3])
    assert top(got) == top(ref)


@pytest.mark.parametrize("family", ["eager llama", "mistral, sliding window 6"])
def test_models_packing_cannot_serve_plainly_still_equal_batch1(family):
    """An eager-attention model is padded (its attention is not in the interface); a sliding
    window is kept per packed example by the model's own attention."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
    if family == "eager llama":
        base = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="eager"))
    else:
        base = MistralForCausalLM(MistralConfig(**shape, sliding_window=6, attn_implementation="sdpa"))
    m = attach_lora(base, r=4, alpha=16, seed=0)
    with torch.no_grad():
        for n, p in trainable_parameters(m):
            if "lora_B" in n:
                p.normal_(0, 0.1)
    gc = GradientComputer(m, mode="sgd", token_budget=64)
    assert gc.packed == (family != "eager llama")
    exs = [e for i, e in enumerate(mixed_examples()) if i != 3]
    got = np.stack([v for _, v in gc.gradients(exs)])
    ref = np.stack([gc.gradient(e) for e in exs])
    assert cosines(got, ref).min() >= 0.9999


def test_batched_rejects_a_trainable_non_lora_parameter(model):
    import copy

    m = copy.deepcopy(model)
    m.get_input_embeddings().weight.requires_grad_(True)
    gc = GradientComputer(m, mode="sgd")
    with pytest.raises(ValueError, match="bias-free Linear"):
        list(gc.gradients([example(1)]))


@pytest.mark.slow
def test_smollm2_batched_equals_batch1_on_real_rows(shared_data):
    """Real Dolly and Flan rows: fp32 rows equal batch 1's (pool Adam directions and task
    gradients), and the bf16 model selects the same top 5% either way."""
    import itertools

    from qless.data import iter_pool
    from qless.model import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    rows = []
    for path in ("train/dolly/dolly_00.jsonl", "train/flan_v2_cot/flan_v2_cot_00.jsonl"):
        rows += itertools.islice(iter_pool([shared_data / path], tok, 256, skip_invalid=True,
                                           chat_format="tulu"), 10)
    task = rows.pop()
    for dtype in ("fp32", "bf16"):
        m = attach_lora(load_model("smollm2-135m", dtype=dtype), r=8, alpha=32, seed=0)
        with torch.no_grad():
            for n, p in trainable_parameters(m):
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
        state = adam_state(m, 2)
        pool = GradientComputer(m, (state[0] * 1e-2, state[1] * 1e-6), mode="adam", token_budget=1024)
        ref = np.stack([pool.gradient(e) for e in rows])
        got = np.stack([v for _, v in pool.gradients(rows)])
        if dtype == "fp32":
            assert cosines(got, ref).min() >= 0.9999
            sgd = GradientComputer(m, mode="sgd", token_budget=1024)
            tasks = rows[:8]
            assert cosines(np.stack([v for _, v in sgd.gradients(tasks)]),
                           np.stack([sgd.gradient(e) for e in tasks])).min() >= 0.9999
        else:
            v = GradientComputer(m, mode="sgd").gradient(task)

            def top(x):  # LESS's score, top 5%
                return set(np.argsort(-(x @ v) / np.linalg.norm(x, axis=1))[:2])
            assert top(got) == top(ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_equals_batch1_on_cuda(model):
    import copy

    m = copy.deepcopy(model).to("cuda")
    exs = mixed_examples()
    gc = GradientComputer(m, tuple(t.cuda() for t in adam_state(model)), mode="adam", token_budget=64)
    got = np.stack([v for i, (_, v) in enumerate(gc.gradients(exs)) if i != 3])
    ref = np.stack([gc.gradient(e) for i, e in enumerate(exs) if i != 3])
    assert cosines(got, ref).min() >= 0.9999
    from qless.projection import SparseRademacher  # the fused path on the device (float32 sums)

    P = SparseRademacher(gc.dim, dim=64, seed=1)
    for (_, a), (_, b) in zip(gc.batched(exs, projection=P), gc.batched(exs)):
        assert a.device.type == "cuda" and (a - P.project(b)).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("rows", [1, 17, 40])
@pytest.mark.parametrize("head_bytes", [1, 32 * 50 * 4, 1 << 30])  # steps of 16, 32, all rows
def test_head_cross_entropy_equals_autograd(rows, head_bytes, monkeypatch):
    """The head and loss in steps of rows give autograd's loss and gradient of the whole."""
    monkeypatch.setattr(gradients, "HEAD_BYTES", head_bytes)
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 8, generator=g, requires_grad=True)
    head = torch.randn(50, 8, generator=g)
    target = torch.randint(0, 50, (rows,), generator=g)
    weight = torch.rand(rows, generator=g)
    loss = HeadCrossEntropy.apply(hidden, head, target, weight)
    (got,) = torch.autograd.grad(2 * loss, hidden)
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = (weight * F.cross_entropy(ref_hidden @ head.T, target, reduction="none")).sum()
    (want,) = torch.autograd.grad(2 * ref, ref_hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got, want)


def test_batched_refuses_a_model_that_rescales_its_logits(model):
    import copy

    m = copy.deepcopy(model)
    m.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping rescales them"):
        list(GradientComputer(m, mode="sgd").gradients([example(1)]))
