"""gradstore.ops: merge, requantize, compare, check (with mayhem on the data file)."""

import contextlib
import hashlib
import math
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest

import gradstore
from gradstore import ops, quant
from gradstore.errors import (
    DuplicateIdError,
    SchemaMismatchError,
    StoreExistsError,
)
from gradstore.format import block_key, chunk_key, decode_rows, encode_rows
from gradstore.staging import Staging

DIM = 70  # not a multiple of 8: rows carry padding
PROJ = {"kind": "sparse-rademacher", "seed": 0}


def rand(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def ids(lo, hi):
    return [f"z{i}" for i in range(lo, hi)]


def make(path, rows=range(20), ckpts=(("e1", 2e-5), ("e2", 1e-5)), encodings=("f32", "absmax8", "sign1"),
         task=True, projection=PROJ, seed=0):
    """A store with tiny blocks (rows span many) holding train rows `rows` for each checkpoint."""
    with gradstore.create(path, dim=DIM, projection=projection, block_bytes=64) as st:
        for i, (c, lr) in enumerate(ckpts):
            st.add_checkpoint(c, lr=lr)
            x = rand(100, seed + i)[list(rows)]
            if len(x):
                st.write("train", c, x, [f"z{r}" for r in rows], encodings=encodings,
                         metadata=[{"source": "dolly" if r % 2 else "flan"} for r in rows])
            if task:
                st.write("mmlu", c, rand(5, 50 + seed + i), list("abcde"), kind="task", encodings=encodings,
                         subtasks=["x", "x", "y", "y", "z"])
    return path


def digest(path):
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


# ---- merge ------------------------------------------------------------------------------

def test_merge_shards_equals_one_store(tmp_path):
    a = make(tmp_path / "a", range(7))
    b = make(tmp_path / "b", range(7, 20), task=False)
    whole = make(tmp_path / "whole", range(20))
    before = digest(a), digest(b)
    report = ops.merge([a, b], tmp_path / "m")
    assert (digest(a), digest(b)) == before  # sources untouched
    assert report.sets["train"] == {"kind": "train", "rows": 20, "written": {"e1": 20, "e2": 20},
                                    "encodings": ["absmax8", "f32", "sign1"]}
    with gradstore.open(tmp_path / "m") as m, gradstore.open(whole) as w:
        assert m.ids("train") == w.ids("train") and m.rows("train") == w.rows("train")
        assert m.checkpoints() == w.checkpoints()
        for enc in ("f32", "absmax8", "sign1"):
            got, want = m.read("train", "e2", enc), w.read("train", "e2", enc)
            for g, x in zip(got, want):
                np.testing.assert_array_equal(g, x)
        for q in ("TOP 5 FROM train BY mmlu", "TOP 5 FROM train BY mmlu ENCODING sign1"):
            r1, r2 = m.query(q), w.query(q)
            assert r1.ids == r2.ids and np.array_equal(r1.scores, r2.scores)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "m", "whole"]  # no temporary left


def test_merge_checkpoints_computed_apart(tmp_path):
    a = make(tmp_path / "a", ckpts=(("e1", 2e-5),))
    b = make(tmp_path / "b", ckpts=(("e2", 1e-5),), seed=1)
    ops.merge([a, b], tmp_path / "m")
    whole = make(tmp_path / "whole")
    with gradstore.open(tmp_path / "m") as m, gradstore.open(whole) as w:
        assert m.checkpoint_names() == ["e1", "e2"]
        assert m.set_info("train")["written"] == {"e1": 20, "e2": 20}
        np.testing.assert_array_equal(m.vectors("train", "e2", "f32"), w.vectors("train", "e2", "f32"))
        assert m.query("TOP 3 FROM train BY mmlu").ids == w.query("TOP 3 FROM train BY mmlu").ids


def test_merge_refusals_name_the_field_and_both_sources(tmp_path):
    a = make(tmp_path / "a", range(5))
    b = make(tmp_path / "b", range(5, 10), projection={"kind": "sparse-rademacher", "seed": 1})
    with pytest.raises(SchemaMismatchError, match=(
            f"cannot merge: projection differs: {a} has {{'kind': 'sparse-rademacher', 'seed': 0}},"
            f" {b} has {{'kind': 'sparse-rademacher', 'seed': 1}}")):
        ops.merge([a, b], tmp_path / "m")
    c = make(tmp_path / "c", range(5, 10), ckpts=(("e1", 3e-5),))
    with pytest.raises(SchemaMismatchError, match=f"checkpoint 'e1' has lr 2e-05 in {a}, 3e-05 in {c}"):
        ops.merge([a, c], tmp_path / "m")
    d = make(tmp_path / "d", range(4, 10))
    with pytest.raises(DuplicateIdError, match=f"id 'z4' of set 'train' checkpoint 'e1' is in both {a} and {d}"):
        ops.merge([a, d], tmp_path / "m")
    e = make(tmp_path / "e", range(5, 10), encodings=("f16", "sign1"))
    with pytest.raises(SchemaMismatchError, match=f"set 'train' holds absmax8, f32, sign1 in {a}, f16, sign1 in {e}"):
        ops.merge([a, e], tmp_path / "m")
    with pytest.raises(StoreExistsError, match="already exists"):
        ops.merge([a, b], a)
    assert not (tmp_path / "m").exists()


def test_merge_killed_midway_leaves_no_output(tmp_path, monkeypatch):
    a = make(tmp_path / "a", range(5))
    b = make(tmp_path / "b", range(5, 10), task=False)
    calls = []

    def boom(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    real = Staging.write_quantized
    monkeypatch.setattr(Staging, "write_quantized", boom)
    with pytest.raises(KeyboardInterrupt):
        ops.merge([a, b], tmp_path / "m", batch_rows=2)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_merge_rows_out_of_order_across_checkpoints(tmp_path):
    a = make(tmp_path / "a", range(5), ckpts=(("e1", 2e-5),))
    b = make(tmp_path / "b", range(5, 10), ckpts=(("e1", 2e-5),), task=False)
    c = make(tmp_path / "c", range(5, 10), ckpts=(("e2", 1e-5),), task=False)
    d = make(tmp_path / "d", range(5), ckpts=(("e2", 1e-5),), task=False)
    with pytest.raises(SchemaMismatchError, match="checkpoint 'e2': row 0 would be 'z5', but the merged"
                                                  " set's row 0 is 'z0'"):
        ops.merge([a, b, c, d], tmp_path / "m")
    ops.merge([a, d, b, c], tmp_path / "m")  # each checkpoint in shard order
    with gradstore.open(tmp_path / "m") as m:
        assert m.ids("train") == ids(0, 10)
        assert m.set_info("train")["written"] == {"e1": 10, "e2": 10}


# ---- requantize -------------------------------------------------------------------------

def test_requantize_per_row_and_global(tmp_path):
    path = make(tmp_path / "s", encodings=("f32", "sign1"))
    with gradstore.open(path, readonly=False) as st:
        done = ops.requantize(st, "train", to=["absmax4", "absmean2-global"], batch_rows=3)
        assert [(d["encoding"], d["from"], d["replaced"]) for d in done] == [
            ("absmax4", "f32", False), ("absmean2-global", "f32", False)]
        info = st.set_info("train")
        assert sorted(info["encodings"]) == ["absmax4", "absmean2-global", "f32", "sign1"]
        # one scale for the set over both checkpoints (QLESS), not one per checkpoint
        both = np.concatenate([st.vectors("train", c, "f32") for c in ("e1", "e2")])
        s = info["scales"]["absmean2-global"]["e1"]
        assert info["scales"]["absmean2-global"]["e2"] == s
        assert s == pytest.approx(quant.set_scale(both, "absmean2-global"), rel=1e-12)
        assert s != pytest.approx(quant.set_scale(st.vectors("train", "e1", "f32"), "absmean2-global"))
        for c in ("e1", "e2"):
            v = st.vectors("train", c, "f32")
            want = quant.quantize(v, "absmax4")
            got = st.read("train", c, "absmax4")
            np.testing.assert_array_equal(got.payload, want.payload)
            np.testing.assert_array_equal(got.scale, want.scale)
            want = quant.quantize(v, "absmean2-global", global_scale=s)
            np.testing.assert_array_equal(st.read("train", c, "absmean2-global").payload, want.payload)
        assert st.info()["sets"]["train"]["scales"] == info["scales"]
        assert len(st.query("TOP 3 FROM train BY mmlu ENCODING absmean2-global")) == 3
        assert ops.check(st).ok


def qless_levels(per_ckpt: list[np.ndarray], bits: int, absmeasure: str) -> list[np.ndarray]:
    """QLESS's quantize_gradients.py in numpy, over L2-normalized rows (the store quantizes
    directions): compute_scale_factor over every checkpoint's file of the set, then
    clamp(round(x * L / s), -L, L) per file. Sums in float64 (QLESS's float16 absmean sum
    overflows to inf above ~900 rows)."""
    units = [(x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)) for x in per_ckpt]
    if absmeasure == "max":
        s = max(np.abs(u).max() for u in units)
    else:
        s = sum(np.abs(u).sum() for u in units) / sum(u.size for u in units)
    L = 2 ** (bits - 1) - 1
    return [np.clip(np.round(u * (L / s)), -L, L) for u in units]


@pytest.mark.parametrize("enc", ["absmax2-global", "absmean4-global", "absmax8-global"])
def test_requantize_global_equals_qless_formula(tmp_path, enc):
    path = make(tmp_path / "s", encodings=("f32",))
    with gradstore.open(path, readonly=False) as st:
        ops.requantize(st, to=[enc])
        e = gradstore.parse_encoding(enc)
        for name in ("train", "mmlu"):  # the training set and each task: one scale each
            masters = [st.vectors(name, c, "f32") for c in ("e1", "e2")]
            want = qless_levels(masters, e.bits, "max" if e.kind == "absmax" else "mean")
            for c, w in zip(("e1", "e2"), want):
                got = quant.unpack_levels(st.read(name, c, enc).payload, e, st.dim)
                # rounding halves may fall either way between the two float orders
                assert np.mean(got != w) < 1e-3 and np.abs(got - w).max() <= 1


def test_requantize_refusals(tmp_path):
    path = make(tmp_path / "s", encodings=("absmax8", "sign1"))
    with gradstore.open(path, readonly=False) as st:
        with pytest.raises(SchemaMismatchError, match="set 'train' holds no float master"):
            ops.requantize(st, "train", to=["absmax4"])
        with pytest.raises(SchemaMismatchError, match="set 'train': absmax8 is quantized"):
            ops.requantize(st, "train", to=["absmax4"], source="absmax8")
        with pytest.raises(SchemaMismatchError, match="set 'train' already holds sign1; replace it"):
            ops.requantize(st, "train", to=["sign1"], source="absmax8", allow_lossy=True)
        with pytest.raises(SchemaMismatchError, match="f16 is more precise than its source absmax8"):
            ops.requantize(st, "train", to=["f16"], allow_lossy=True)
        assert sorted(st.set_info("train")["encodings"]) == ["absmax8", "sign1"]
        ops.requantize(st, to=["absmax4"], allow_lossy=True)  # every set
        assert "absmax4" in st.set_info("mmlu")["encodings"]


def test_requantize_replace_and_killed_run(tmp_path, monkeypatch):
    path = make(tmp_path / "s", encodings=("f32", "absmax8"))
    with gradstore.open(path, readonly=False) as st:
        before = st.read("train", "e1", "absmax8")
        real = Staging.commit_encodings

        def killed(self, *args, **kwargs):
            raise KeyboardInterrupt  # dies after staging every block, before the flip

        monkeypatch.setattr(Staging, "commit_encodings", killed)
        with pytest.raises(KeyboardInterrupt):
            ops.requantize(st, "train", to=["absmax8-global", "absmax8"], replace=True)
        assert sorted(st.set_info("train")["encodings"]) == ["absmax8", "f32"]  # as it was
        np.testing.assert_array_equal(st.read("train", "e1", "absmax8").payload, before.payload)
        assert not ops.check(st).ok  # the staged blocks are orphans
        monkeypatch.setattr(Staging, "commit_encodings", real)
        done = ops.requantize(st, "train", to=["absmax8-global", "absmax8"], replace=True)
        assert [d["replaced"] for d in done] == [False, True]
        assert st.set_info("train")["encodings"]["absmax8"]["key"].startswith("~")
        np.testing.assert_array_equal(st.read("train", "e1", "absmax8").payload, before.payload)
        assert ops.check(st).findings == []  # orphans overwritten, old blocks cleared
        ops.requantize(st, "train", to=["absmax8"], replace=True)  # and back to its own key
        assert "key" not in st.set_info("train")["encodings"]["absmax8"]
        assert ops.check(st).ok


# ---- compare ----------------------------------------------------------------------------

def test_rankdata_and_spearman_by_hand():
    np.testing.assert_array_equal(ops.rankdata([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
    # ranks a: 1, 2.5, 2.5, 4; b: 1, 3, 2, 4 -> sum d_a d_b = 4.5, sum d_a^2 = 4.5, sum d_b^2 = 5
    assert ops.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), rel=1e-12)
    assert ops.spearman([1, 2, 3], [9, 5, 1]) == pytest.approx(-1)
    assert math.isnan(ops.spearman([1, 1, 1], [1, 2, 3]))


def test_parse_k():
    assert [ops.parse_k(k, 40) for k in ("5%", "1%", "100%", "7", "100")] == [2, 1, 40, 7, 40]
    with pytest.raises(ValueError, match="k must be a count or a percentage such as 5%, got '0'"):
        ops.parse_k("0", 10)


def test_compare_encodings_and_queries(tmp_path):
    with gradstore.open(make(tmp_path / "s")) as st:
        same = ops.compare(st, "absmax8", "absmax8", tasks=["mmlu"], k="25%")
        assert (same.rows, same.spearman, same.k, same.overlap) == (20, 1.0, 5, 1.0)
        got = ops.compare(st, "f32", "sign1", tasks=["mmlu"], k=4)
        a = st.query("SCORE FROM train BY mmlu ENCODING f32")
        b = st.query("SCORE FROM train BY mmlu ENCODING sign1")
        assert got.a == "SCORE FROM train BY mmlu ENCODING f32"
        assert got.spearman == pytest.approx(ops.spearman(a.scores, b.scores))
        top_a = set(st.query("TOP 4 FROM train BY mmlu ENCODING f32").ids)
        top_b = set(st.query("TOP 4 FROM train BY mmlu ENCODING sign1").ids)
        assert got.overlap == len(top_a & top_b) / 4
        q = ops.compare(st, "TOP 5 FROM train BY mmlu AGG max", "SCORE FROM train BY mmlu AGG mean"
                        " WHERE source = 'dolly'", k=3)
        assert q.rows == 10 and q.k == 3  # only the rows both sides score
        with pytest.raises(ValueError, match="comparing encodings \\(f32\\) needs a task"):
            ops.compare(st, "f32", "sign1")


# ---- check: mayhem ----------------------------------------------------------------------

def _block_value(path, set_name, ckpt, enc, block):
    with gradstore.open(path) as st:
        rec = st.set_info(set_name)
        with st.env.begin() as txn:
            return txn.get(block_key(rec["id"], st.checkpoint_names().index(ckpt), enc, block),
                           db=Staging(st).dbs["blocks"])


def _raw_env(path, fn):
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(txn, env.open_db(b"blocks", txn=txn), env.open_db(b"rows", txn=txn))
    finally:
        env.close()


def test_check_clean_store(tmp_path):
    with gradstore.open(make(tmp_path / "s")) as st:
        report = ops.check(st)
        assert report.ok and report.findings == [] and report.blocks > 40


def test_check_finds_a_flipped_byte_on_disk_and_fix_keeps_the_good_prefix(tmp_path):
    path = make(tmp_path / "s")
    with gradstore.open(path) as st:
        br = st.set_info("train")["encodings"]["sign1"]["block_rows"]
        good = st.vectors("train", "e1", "f32")
    value = _block_value(path, "train", "e1", "sign1", 2)
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(value)
    while at >= 0:  # LMDB's copy-on-write may leave stale copies in free pages: flip them all
        data[at + len(value) - 30] ^= 0x40  # inside the payload/scale area, past the header
        at = data.find(value, at + 1)
    (path / "data.mdb").write_bytes(bytes(data))
    with gradstore.open(path) as st:
        assert [str(f) for f in ops.check(st).findings] == [
            "set 'train' checkpoint 'e1' encoding sign1 block 2: block checksum mismatch"]
    with gradstore.open(path, readonly=False) as st:
        report = ops.check(st, fix=True)
        assert report.dropped == [(f"set 'train' checkpoint 'e1': rows {2 * br}..19 dropped"
                                   f" ({20 - 2 * br} rows; a resumed ingest recomputes them)")]
        assert ops.check(st).ok
        assert st.set_info("train")["written"] == {"e1": 2 * br, "e2": 20}
        np.testing.assert_array_equal(st.vectors("train", "e1", "f32"), good[:2 * br])
        assert st.written_ids("train", "e1") == set(ids(0, 2 * br))
        # the resumed ingest appends cleanly after the fix
        st.write("train", "e1", rand(100)[2 * br:20], ids(2 * br, 20), encodings=("f32", "absmax8", "sign1"))
        assert ops.check(st).ok
        np.testing.assert_array_equal(st.vectors("train", "e1", "f32"), good)


def test_check_truncated_and_missing_blocks_and_repeated_ids(tmp_path):
    path = make(tmp_path / "s")
    with gradstore.open(path) as st:
        rec = st.set_info("train")

    def mayhem(txn, blocks, rows_db):
        key = block_key(rec["id"], 1, "f32", 5)
        txn.put(key, txn.get(key, db=blocks)[:-7], db=blocks)  # a truncated block value
        txn.delete(block_key(rec["id"], 0, "absmax8", 9), db=blocks)
        chunk = chunk_key(rec["id"], 0)
        records = decode_rows(txn.get(chunk, db=rows_db))
        records[17]["id"] = records[3]["id"]  # metadata that contradicts itself
        txn.put(chunk, encode_rows(records), db=rows_db)

    _raw_env(path, mayhem)
    with gradstore.open(path) as st:
        findings = [str(f) for f in ops.check(st).findings]
    assert findings == [
        "set 'train' row 17: id 'z3' repeats row 3",
        "set 'train' checkpoint 'e1': written says 20 rows, the set holds 17",
        "set 'train' checkpoint 'e1' encoding absmax8 block 9: missing",
        "set 'train' checkpoint 'e2': written says 20 rows, the set holds 17",
        "set 'train' checkpoint 'e2' encoding f32 block 5: block framing is wrong (size 293, expected 300)",
    ]
    with gradstore.open(path, readonly=False) as st:
        report = ops.check(st, fix=True)
        assert report.dropped == [
            "set 'train': rows 17..19 dropped (metadata lost)",
            "set 'train' checkpoint 'e1': rows 9..19 dropped (11 rows; a resumed ingest recomputes them)",
            "set 'train' checkpoint 'e2': rows 5..19 dropped (15 rows; a resumed ingest recomputes them)",
        ]
        assert ops.check(st).ok
        assert st.written_ids("train", "e2") == set(ids(0, 5))


def test_requantize_to_centered_uses_the_whole_set_mean_and_recenter_rebuilds(tmp_path):
    path = make(tmp_path / "s", encodings=("f32", "sign1"))
    with gradstore.open(path, readonly=False) as st:
        ops.requantize(st, "train", to=["sign1-centered", "absmax4-centered"])
        master = st.vectors("train", "e1", "f32")
        center = st.centroid("train", "e1")
        np.testing.assert_allclose(center, master.mean(axis=0), rtol=1e-5, atol=1e-6)
        direct = quant.quantize_centered(master, center, "sign1-centered")
        stored = st.read("train", "e1", "sign1-centered")
        np.testing.assert_array_equal(stored.payload, direct.payload)
        np.testing.assert_allclose(stored.extra, direct.extra, rtol=1e-6)
        # a later centered target reuses the frozen centroid
        ops.requantize(st, "train", to=["absmax2-centered"])
        np.testing.assert_array_equal(st.centroid("train", "e1"), center)
        with pytest.raises(SchemaMismatchError, match="derive absmax2-centered, absmax4-centered too"):
            ops.requantize(st, "train", to=["sign1-centered"], recenter=True)
        # queries score the derived encodings
        assert len(st.query("TOP 3 FROM train BY mmlu ENCODING sign1-centered MODE asymmetric").ids) == 3


def test_recenter_moves_the_centroid_atomically(tmp_path):
    path = make(tmp_path / "s", encodings=("f32",))
    with gradstore.open(path, readonly=False) as st:
        st.write("extra", "e1", rand(10, 9) + 5, ids(0, 10), encodings=["f32", "sign1-centered"])
        first_batch_mean = st.centroid("extra", "e1")
        st.write("extra", "e1", rand(10, 8) - 5, ids(10, 20), encodings=["f32", "sign1-centered"])
        assert np.allclose(st.centroid("extra", "e1"), first_batch_mean)
        ops.requantize(st, "extra", to=["sign1-centered"], recenter=True)
        whole = st.vectors("extra", "e1", "f32").mean(axis=0)
        np.testing.assert_allclose(st.centroid("extra", "e1"), whole, rtol=1e-5, atol=1e-5)
        assert ops.check(st).ok


@contextlib.contextmanager
def held_open(path):
    """Another process holding the store at `path` open until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", (f"import gradstore, sys; s = gradstore.open({str(path)!r});"
                               " print('open', flush=True); sys.stdin.read()")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        yield
    finally:
        holder.communicate("")


def test_merge_clears_a_killed_merges_folders_but_not_a_running_ones(tmp_path):
    a = make(tmp_path / "a", range(5))
    killed = tmp_path / ".m.k1ll3d.merging"  # what a kill -9 during merge leaves
    killed.mkdir()
    (killed / "data.mdb").write_bytes(b"half a store")
    running = make(tmp_path / ".m.runn1ng.merging", range(3))  # another merge's, open in its process
    with held_open(running):
        ops.merge([a], tmp_path / "m")
        assert sorted(os.listdir(tmp_path)) == [".m.runn1ng.merging", "a", "m"]
    ops.merge([a], tmp_path / "n")  # another output's folders are not ours to clear
    assert sorted(os.listdir(tmp_path)) == [".m.runn1ng.merging", "a", "m", "n"]


# ---- compact ------------------------------------------------------------------------------

def test_compact_drops_free_pages_and_keeps_every_byte_of_content(tmp_path):
    path = tmp_path / "s"
    with gradstore.create(path, dim=DIM, projection=PROJ, block_bytes=4096) as st:
        st.add_checkpoint("e1", lr=1e-5)
        for lo in range(0, 300, 7):  # 7-row batches: each rewrites the last partial block
            st.write("train", "e1", rand(300)[lo:lo + 7], ids(lo, min(300, lo + 7)), encodings=("f32", "sign1"))
        before = {e: st.read("train", "e1", e) for e in ("f32", "sign1")}
        with pytest.raises(gradstore.StoreBusyError, match="this process has the store open"):
            gradstore.compact(path)
    (path / ".compacting-k1ll3d").mkdir()  # a killed compaction's copy
    size = os.path.getsize(path / "data.mdb")
    assert gradstore.compact(path, min_free=0.99) is None and os.path.getsize(path / "data.mdb") == size
    done = gradstore.compact(path)
    assert done == (size, os.path.getsize(path / "data.mdb")) and done[1] < 0.8 * size
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
    with gradstore.open(path) as st:
        for e, want in before.items():
            for got, x in zip(st.read("train", "e1", e), want):
                np.testing.assert_array_equal(got, x)
        assert st.ids("train") == ids(0, 300) and ops.check(st).ok
    assert gradstore.compact(path) is None  # nothing left to drop
    with held_open(path):
        with pytest.raises(gradstore.StoreBusyError) as e:
            gradstore.compact(path, min_free=0)
        assert str(e.value) == f"{path}: another process has the store open; compact it when that is done"
    with gradstore.open(path, readonly=False) as st:  # the compacted store takes more writes
        st.write("train", "e1", rand(5, 9), ids(300, 305), encodings=("f32", "sign1"))
        assert st.n_rows("train") == 305 and ops.check(st).ok
