"""The executor against a plain numpy implementation of DESIGN.md's score formula."""

import itertools

import numpy as np
import pytest

import gradstore
from gradstore import QuerySyntaxError, SchemaMismatchError, UnknownNameError

DIM = 100
ENCODINGS = ("f32", "f16", "absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "sign1")
CENTERED = ("sign1-centered", "absmax4-centered", "absmax2-centered", "absmean8-centered")
CKPTS = {"e1": 3e-5, "e2": 2e-5, "e3": 1e-5}
TASKS = {  # unequal subtask sizes, interleaved rows
    "mmlu": ["law", "art", "law", "bio", "law", "art"],
    "tydiqa": ["en", "fi", "ko"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("q") / "s"
    st = gradstore.create(path, dim=DIM, block_bytes=256)
    n = 57
    shared = rng.standard_normal(DIM)  # rows share a direction, as real gradients do
    for name, lr in CKPTS.items():
        st.add_checkpoint(name, lr=lr)
        x = (rng.standard_normal((n, DIM)) + 0.5 * shared).astype(np.float32)
        for lo in range(0, n, 20):
            st.write("train", name, x[lo:lo + 20], [f"z{i}" for i in range(lo, min(n, lo + 20))],
                     encodings=ENCODINGS + CENTERED,
                     metadata=[{"source": "dolly" if i % 3 else "flan", "tokens": 10 * i}
                               for i in range(lo, min(n, lo + 20))])
        for task, subtasks in TASKS.items():
            v = (rng.standard_normal((len(subtasks), DIM)) + 0.5 * shared).astype(np.float32)
            st.write(task, name, v, [f"{task}{i}" for i in range(len(subtasks))], kind="task",
                     encodings=ENCODINGS, subtasks=subtasks)
    yield st
    st.close()


def _cos(a, b):
    na = np.linalg.norm(a, axis=1)[:, None]
    nb = np.linalg.norm(b, axis=1)[None, :]
    return (a @ b.T) / (na * nb)


def reference(store, tasks, ckpts, weight, enc, mode, agg, combine):
    lrs = np.array([CKPTS[c] for c in ckpts])
    w = lrs / lrs.sum() if weight == "lr" else np.full(len(ckpts), 1 / len(ckpts))
    per_task = []
    for task in tasks:
        subtasks = np.array(TASKS[task])
        names = list(dict.fromkeys(TASKS[task]))
        acc = 0
        for wi, c in zip(w, ckpts):
            g = store.vectors("train", c, enc).astype(np.float64)
            v = store.vectors(task, c, enc if mode == "symmetric" else "f32").astype(np.float64)
            cos = _cos(g, v)
            acc = acc + wi * np.stack([cos[:, subtasks == s].mean(axis=1) for s in names], axis=1)
        per_task.append(acc.max(axis=1) if agg == "max" else acc.mean(axis=1))
    per_task = np.stack(per_task)
    return {"mean": per_task.mean(0), "max": per_task.max(0), "sum": per_task.sum(0)}[combine]


def reference_centered(store, task, enc, mode, agg="max"):
    """DESIGN's score with G ~ c + |G-c| R (R the stored unit residual), exact |G| and |V|;
    symmetric: the task row's direction quantized plainly."""
    from gradstore.encodings import Encoding, parse_encoding
    from gradstore.quant import quantize_reference, unpack_levels

    e = parse_encoding(enc)
    base = Encoding(e.kind, e.bits)
    lrs = np.array(list(CKPTS.values()))
    subtasks = np.array(TASKS[task])
    acc = 0
    for w, c in zip(lrs / lrs.sum(), CKPTS):
        g = store.vectors("train", c, "f32").astype(np.float64)
        center = g[:20].mean(axis=0)  # the first batch's mean, frozen
        r = unpack_levels(store.read("train", c, enc).payload, base, DIM).astype(np.float64)
        g_approx = center + np.linalg.norm(g - center, axis=1)[:, None] * r / np.linalg.norm(r, axis=1)[:, None]
        v = store.vectors(task, c, "f32").astype(np.float64)
        if mode == "symmetric":  # the task row's own direction, quantized plainly, at its exact length
            lv = unpack_levels(quantize_reference(v.astype(np.float32), base).payload, base, DIM)
            v_approx = np.linalg.norm(v, axis=1)[:, None] * lv / np.linalg.norm(lv, axis=1)[:, None]
        else:
            v_approx = v
        cos = (g_approx @ v_approx.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(v, axis=1))
        acc = acc + w * np.stack([cos[:, subtasks == s].mean(axis=1) for s in dict.fromkeys(TASKS[task])], axis=1)
    return acc.max(axis=1) if agg == "max" else acc.mean(axis=1)


@pytest.mark.parametrize("enc", CENTERED)
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_centered_encodings_match_the_formula(store, enc, mode):
    result = store.query(f"SCORE FROM train BY mmlu ENCODING {enc} MODE {mode}")
    np.testing.assert_allclose(result.scores, reference_centered(store, "mmlu", enc, mode), rtol=1e-4, atol=1e-5)
    assert result.plan.kernel == ("xor-popcount" if (enc, mode) == ("sign1-centered", "symmetric") else "float-dot")


def test_centered_scores_track_float_scores_better_than_plain(store):
    exact = store.query("SCORE FROM train BY mmlu ENCODING f32").scores
    for bits in ("sign1", "absmax2"):
        plain = store.query(f"SCORE FROM train BY mmlu ENCODING {bits} MODE asymmetric").scores
        centered = store.query(f"SCORE FROM train BY mmlu ENCODING {bits}-centered MODE asymmetric").scores
        assert np.abs(centered - exact).mean() < np.abs(plain - exact).mean()


def check_top(result, ref, k):
    assert len(result.ids) == k
    np.testing.assert_allclose(result.scores, ref[result.rows], rtol=1e-4, atol=1e-5)
    kth = np.sort(ref)[::-1][k - 1]
    assert (ref[result.rows] >= kth - 1e-5).all()
    assert (np.diff(result.scores) <= 1e-7).all()  # best first


@pytest.mark.parametrize("enc,mode", [(e, m) for e in ENCODINGS for m in ("symmetric", "asymmetric")
                                      if not (e.startswith("f") and m == "symmetric")])
def test_every_encoding_and_mode_matches_the_formula(store, enc, mode):
    result = store.query(f"TOP 10 FROM train BY mmlu ENCODING {enc} MODE {mode}")
    ref = reference(store, ["mmlu"], list(CKPTS), "lr", enc, mode, "max", "mean")
    check_top(result, ref, 10)
    assert result.plan.kernel == ("xor-popcount" if (enc, mode) == ("sign1", "symmetric") else "float-dot")


@pytest.mark.parametrize("agg,combine,weight", list(itertools.product(("max", "mean"), ("mean", "max", "sum"),
                                                                      ("lr", "uniform"))))
def test_aggregations_weights_and_task_combinations(store, agg, combine, weight):
    q = (f"SCORE FROM train BY mmlu, tydiqa COMBINE {combine} AGG {agg} OVER subtasks WEIGHT {weight}"
         " ENCODING absmax4")
    result = store.query(q)
    ref = reference(store, ["mmlu", "tydiqa"], list(CKPTS), weight, "absmax4", "asymmetric", agg, combine)
    np.testing.assert_array_equal(result.rows, np.arange(57))
    np.testing.assert_allclose(result.scores, ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_subset_and_percentage(store):
    result = store.query("TOP 10% FROM train BY tydiqa CHECKPOINTS e1, e3 ENCODING sign1")
    ref = reference(store, ["tydiqa"], ["e1", "e3"], "lr", "sign1", "symmetric", "max", "mean")
    check_top(result, ref, 5)  # floor(57 * 10%) = 5
    assert result.plan.weights == pytest.approx((0.75, 0.25))
    by_position = store.query("TOP 10% FROM train BY tydiqa CHECKPOINTS 1,3 ENCODING sign1")
    assert by_position.plan.checkpoints == ("e1", "e3") and by_position.ids == result.ids


def test_where_filters_rows_and_percentage_counts_what_passes(store):
    result = store.query("TOP 50% FROM train BY mmlu WHERE source = 'flan' AND tokens < 400 ENCODING f16")
    ref = reference(store, ["mmlu"], list(CKPTS), "lr", "f16", "asymmetric", "max", "mean")
    keep = np.array([i % 3 == 0 and 10 * i < 400 for i in range(57)])
    assert set(result.rows) <= set(np.flatnonzero(keep))
    assert len(result) == keep.sum() // 2
    masked = np.where(keep, ref, -np.inf)
    check_top(result, masked, keep.sum() // 2)
    assert all(r["source"] == "flan" for r in result.records)


def test_ties_break_by_row_order(tmp_path):
    st = gradstore.create(tmp_path / "t", dim=8)
    st.add_checkpoint("e1", lr=1)
    x = np.tile(np.arange(1, 9, dtype=np.float32), (6, 1))
    st.write("train", "e1", x, list("abcdef"), encodings=["f32", "sign1"])
    st.write("task", "e1", x[:1], ["v"], kind="task", encodings=["f32", "sign1"])
    for enc in ("f32", "sign1"):
        assert st.query(f"TOP 4 FROM train BY task ENCODING {enc}").ids == list("abcd")


def test_explain_returns_the_plan_without_scanning(store):
    plan = store.query("EXPLAIN TOP 5% FROM train BY mmlu ENCODING sign1")
    text = str(plan)
    assert "xor-popcount" in text and "TASK       mmlu: 6 rows, 3 subtasks" in text
    plan = store.query("EXPLAIN TOP 5% FROM train BY mmlu")
    assert plan.encoding == "absmax8" and plan.mode == "asymmetric"
    assert "collapse" in str(plan) and plan.to_dict()["collapse"] is True


def test_errors_name_what_exists(store):
    with pytest.raises(UnknownNameError, match="unknown task 'bbh'; the store has: mmlu, tydiqa"):
        store.query("TOP 5 FROM train BY bbh")
    with pytest.raises(UnknownNameError, match="unknown checkpoint 'e9'"):
        store.query("TOP 5 FROM train BY mmlu CHECKPOINTS e9")
    with pytest.raises(SchemaMismatchError, match="FROM takes a train set"):
        store.query("TOP 5 FROM mmlu BY tydiqa")
    with pytest.raises(QuerySyntaxError):
        store.query("TOP FROM train")


def test_a_percentage_of_an_empty_filter_selects_nothing(store):
    result = store.query("TOP 5% FROM train BY mmlu WHERE source = 'nobody'")
    assert result.ids == [] and len(result.scores) == 0
