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


def kernel_of(enc, mode):
    if enc.startswith("sign1") and mode == "symmetric":
        return "xor-popcount"
    return "float-dot" if enc in ("f32", "f16") else "int-dot"


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
    """DESIGN's score with G ~ c + |G-c| R (R the stored unit residual), exact |G|:
    cos(G, v) ~ (<c, v^> + |G-c| gain <R, u>) / |G|, v^ the task row's exact unit direction,
    u = v^ (asymmetric) or its plain quantization made unit (symmetric); gain puts a sign
    agreement on the cosine's scale (pi/2 sign vs sign, sqrt(pi/2) sign vs float), else 1."""
    from gradstore.encodings import Encoding, parse_encoding
    from gradstore.quant import quantize_reference, unpack_levels

    e = parse_encoding(enc)
    base = Encoding(e.kind, e.bits)
    gain = 1.0 if e.kind != "sign" else (np.pi / 2 if mode == "symmetric" else np.sqrt(np.pi / 2))
    lrs = np.array(list(CKPTS.values()))
    subtasks = np.array(TASKS[task])
    acc = 0
    for w, c in zip(lrs / lrs.sum(), CKPTS):
        g = store.vectors("train", c, "f32").astype(np.float64)
        center = g[:20].mean(axis=0)  # the first batch's mean, frozen
        r = unpack_levels(store.read("train", c, enc).payload, base, DIM).astype(np.float64)
        r /= np.linalg.norm(r, axis=1)[:, None]
        v = store.vectors(task, c, "f32").astype(np.float64)
        v /= np.linalg.norm(v, axis=1)[:, None]
        u = v
        if mode == "symmetric":
            u = unpack_levels(quantize_reference(v.astype(np.float32), base).payload, base, DIM)
            u = u / np.linalg.norm(u, axis=1)[:, None]
        a = np.linalg.norm(g - center, axis=1)[:, None]
        cos = (center @ v.T + a * gain * (r @ u.T)) / np.linalg.norm(g, axis=1)[:, None]
        acc = acc + w * np.stack([cos[:, subtasks == s].mean(axis=1) for s in dict.fromkeys(TASKS[task])], axis=1)
    return acc.max(axis=1) if agg == "max" else acc.mean(axis=1)


@pytest.mark.parametrize("enc", CENTERED)
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_centered_encodings_match_the_formula(store, enc, mode):
    result = store.query(f"SCORE FROM train BY mmlu ENCODING {enc} MODE {mode}")
    np.testing.assert_allclose(result.scores, reference_centered(store, "mmlu", enc, mode), rtol=1e-4, atol=1e-5)
    assert result.plan.kernel == kernel_of(enc, mode)


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
    assert result.plan.kernel == kernel_of(enc, mode)


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


TIE_PATHS = [("f32", None), ("f16", None), ("absmax8", "asymmetric"), ("absmax8", "symmetric"),
             ("absmax4", None), ("absmean2", None), ("sign1", "symmetric"), ("sign1", "asymmetric"),
             ("sign1-centered", "symmetric"), ("sign1-centered", "asymmetric"),
             ("absmax8-centered", None)]


@pytest.mark.parametrize("dim", [8, 100])
def test_identical_rows_get_identical_scores_on_every_path(tmp_path, dim):
    # 11 copies of one row among others: the copies sit at every position of a kernel's row tile
    # (4 rows) and in a tail; BLAS may sum them in different orders, our kernels must not.
    rng = np.random.default_rng(dim)
    st = gradstore.create(tmp_path / "t", dim=dim, block_bytes=256)
    st.add_checkpoint("e1", lr=1)
    x = rng.standard_normal((23, dim)).astype(np.float32)
    copies = np.array([0, 1, 2, 3, 5, 8, 9, 14, 19, 21, 22])
    x[copies] = rng.standard_normal(dim).astype(np.float32) + 3.0  # the best rows, all equal
    encs = sorted({e for e, _ in TIE_PATHS})
    ids = [f"r{i}" for i in range(len(x))]
    st.write("train", "e1", x, ids, encodings=encs)
    st.write("task", "e1", x[:1] + 0.1, ["v"], kind="task", encodings=encs)
    for enc, mode in TIE_PATHS:
        q = f"SCORE FROM train BY task ENCODING {enc}" + (f" MODE {mode}" if mode else "")
        scores = st.query(q).scores
        assert len(set(scores[copies].tolist())) == 1, q
        top = st.query(q.replace("SCORE", "TOP 4"))
        assert top.ids == [ids[i] for i in copies[:4]], q
    two = st.query("TOP 4 FROM train BY task ENCODING sign1 RERANK f32 OVERSAMPLE 3")
    assert len(two.plan.stages) == 2 and two.ids == [ids[i] for i in copies[:4]]
    st.close()


def shortlist_then_rerank(store, task, first, mode, rerank, k, m, where=None):
    """Two stages by hand: single-stage scores of every row, top m*k in `first`, top k of those."""
    cond = f" WHERE {where}" if where else ""
    s1 = store.query(f"SCORE FROM train BY {task} ENCODING {first} MODE {mode}{cond}")
    short = s1.rows[np.lexsort((s1.rows, -s1.scores.astype(np.float64)))[: int(np.ceil(m * k))]]
    s2 = store.query(f"SCORE FROM train BY {task} ENCODING {rerank}")
    scores = s2.scores[short]
    order = np.lexsort((short, -scores.astype(np.float64)))[:k]
    return short[order], scores[order]


@pytest.mark.parametrize("m", [1, 2.5, 4])
def test_two_stage_plan_equals_shortlist_then_rerank(store, m):
    result = store.query(f"TOP 5 FROM train BY mmlu, tydiqa RERANK absmax8 OVERSAMPLE {m}")
    first, second = result.plan.stages
    assert (first.encoding, first.mode, first.kernel, first.keep) == (
        "sign1-centered", "symmetric", "xor-popcount", int(np.ceil(m * 5)))
    assert (second.encoding, second.mode, second.kernel, second.keep) == ("absmax8", "asymmetric", "int-dot", 5)
    rows, scores = shortlist_then_rerank(store, "mmlu, tydiqa", "sign1-centered", "symmetric", "absmax8", 5, m)
    np.testing.assert_array_equal(result.rows, rows)
    np.testing.assert_array_equal(result.scores, scores)  # the same kernel on the same rows: equal
    assert result.ids == [f"z{r}" for r in rows]


def test_default_plan_is_two_stage_for_top_and_single_for_score(store):
    top = store.query("TOP 3 FROM train BY mmlu")
    rows, scores = shortlist_then_rerank(store, "mmlu", "sign1-centered", "symmetric", "absmax8", 3, 6)
    np.testing.assert_array_equal(top.rows, rows)
    assert [s.encoding for s in top.plan.stages] == ["sign1-centered", "absmax8"]
    assert len(store.query("SCORE FROM train BY mmlu").plan.stages) == 1
    # ENCODING or MODE force one stage
    assert len(store.query("TOP 3 FROM train BY mmlu ENCODING sign1-centered").plan.stages) == 1
    assert store.query("TOP 3 FROM train BY mmlu MODE symmetric").plan.stages[0].encoding == "absmax8"
    # a shortlist that would hold every row is one stage in the rerank encoding
    whole = store.query("TOP 10 FROM train BY mmlu")
    assert [s.encoding for s in whole.plan.stages] == ["absmax8"]
    assert "would hold every row: one stage" in " ".join(whole.plan.notes)


def test_two_stage_where_percentage_counts_rows_that_pass(store):
    result = store.query("TOP 20% FROM train BY mmlu WHERE source = 'dolly' RERANK absmax8 OVERSAMPLE 2")
    n_pass = sum(i % 3 != 0 for i in range(57))
    assert len(result) == n_pass // 5 and all(r["source"] == "dolly" for r in result.records)
    rows, _ = shortlist_then_rerank(store, "mmlu", "sign1-centered", "symmetric", "absmax8", n_pass // 5, 2,
                                    where="source = 'dolly'")
    np.testing.assert_array_equal(result.rows, rows)


def test_rerank_errors(store, tmp_path):
    with pytest.raises(UnknownNameError, match="set 'train' has no encoding 'absmax8-centered'"):
        store.query("TOP 5 FROM train BY mmlu RERANK absmax8-centered")
    with pytest.raises(UnknownNameError, match="set 'train' has no encoding 'absmax4-global'; it holds:"):
        store.query("EXPLAIN TOP 5 FROM train BY mmlu ENCODING absmax4-global RERANK absmax8")
    st = gradstore.create(tmp_path / "f", dim=8)
    st.add_checkpoint("e1", lr=1)
    st.write("train", "e1", np.eye(8, dtype=np.float32), list("abcdefgh"), encodings=["f16", "absmax8"])
    st.write("t", "e1", np.ones((1, 8), np.float32), ["v"], kind="task", encodings=["f16"])
    with pytest.raises(UnknownNameError, match="RERANK needs a shortlist encoding: set 'train' holds"
                                               " no 1-bit encoding"):
        st.query("TOP 1 FROM train BY t RERANK f16")
    assert st.query("TOP 1 FROM train BY t ENCODING absmax8 RERANK f16 OVERSAMPLE 2").plan.stages[0].keep == 2
    st.close()


def test_explain_returns_the_plan_without_scanning(store):
    plan = store.query("EXPLAIN TOP 5% FROM train BY mmlu ENCODING sign1")
    text = str(plan)
    assert "xor-popcount" in text and "TASK       mmlu: 6 rows, 3 subtasks" in text
    plan = store.query("EXPLAIN TOP 5% FROM train BY mmlu")
    assert plan.encoding == "absmax8" and plan.mode == "asymmetric"
    text = str(plan)
    assert "a shortlist of 12 (6 x k)" in text and "ENCODING   sign1-centered (symmetric)" in text
    assert "RERANK     the shortlist's 12 rows x 3 checkpoints read again" in text
    assert "int-dot (VNNI) with the subtask collapse" in text
    d = plan.to_dict()
    assert [s["keep"] for s in d["stages"]] == [12, 2] and d["rows_reread"] == 36


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
