import multiprocessing
import pickle

import numpy as np
import pytest

import gradstore
from gradstore import (
    DuplicateIdError,
    FormatVersionError,
    InvalidVectorError,
    ReadOnlyError,
    SchemaMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownNameError,
)
from gradstore import quant
from gradstore.staging import Staging

DIM = 70  # not a multiple of 64 or 8


@pytest.fixture
def tmp_store(tmp_path):
    """A store with a tiny map (so growth really happens) and tiny blocks (so rows span blocks)."""
    store = gradstore.create(tmp_path / "s", dim=DIM, projection={"kind": "sparse-rademacher", "seed": 0},
                             map_size=64 << 10, block_bytes=64)
    store.add_checkpoint("epoch-1", lr=2e-5, step=10, epoch=1)
    store.add_checkpoint("epoch-2", lr=1e-5, step=20, epoch=2)
    yield store
    store.close()


def rand(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_round_trip_across_blocks_and_batches(tmp_store):
    x = rand(50)
    ids = [f"r{i}" for i in range(50)]
    for lo, hi in [(0, 7), (7, 8), (8, 31), (31, 50)]:  # batches cut inside blocks
        tmp_store.write("train", "epoch-1", x[lo:hi], ids[lo:hi], encodings=("f32", "absmax8", "sign1"),
                        metadata=[{"source": "dolly", "tokens": i} for i in range(lo, hi)])
    assert tmp_store.ids("train") == ids
    np.testing.assert_allclose(tmp_store.vectors("train", "epoch-1", "f32"), x, rtol=1e-6, atol=1e-6)
    expected = quant.quantize(x, "absmax8")
    stored = tmp_store.read("train", "epoch-1", "absmax8")
    np.testing.assert_array_equal(stored.payload, expected.payload)
    np.testing.assert_array_equal(stored.scale, expected.scale)
    assert tmp_store.rows("train")[3] == {"id": "r3", "subtask": None, "source": "dolly", "tokens": 3}
    # tiny blocks: the f32 layout holds one row per block, sign1 several
    assert tmp_store.set_info("train")["encodings"]["sign1"]["block_rows"] == 4
    # the map grew from 64 KiB
    assert tmp_store.env.info()["map_size"] > 64 << 10


def test_checkpoints_in_creation_order_and_reopen(tmp_store, tmp_path):
    assert tmp_store.checkpoint_names() == ["epoch-1", "epoch-2"]
    assert tmp_store.checkpoints()[1]["lr"] == 1e-5
    tmp_store.add_checkpoint("epoch-1", lr=2e-5)  # identical: no-op
    with pytest.raises(SchemaMismatchError, match="already exists with lr"):
        tmp_store.add_checkpoint("epoch-1", lr=3e-5)
    tmp_store.write("b", "epoch-1", rand(2), ["x", "y"], encodings=["sign1"])
    tmp_store.write("a", "epoch-1", rand(2), ["x", "y"], encodings=["sign1"])
    tmp_store.close()
    with gradstore.open(tmp_path / "s") as store:
        assert store.sets() == ["b", "a"]
        assert store.meta["projection"] == {"kind": "sparse-rademacher", "seed": 0}


def test_second_checkpoint_follows_the_set_order(tmp_store):
    x = rand(6)
    ids = list("abcdef")
    tmp_store.write("train", "epoch-1", x, ids, encodings=["f32"])
    tmp_store.write("train", "epoch-2", 2 * x[:4], ids[:4], encodings=["f32"])
    assert tmp_store.written_ids("train", "epoch-2") == set("abcd")
    assert tmp_store.n_rows("train", ["epoch-1", "epoch-2"]) == 4
    with pytest.raises(SchemaMismatchError, match="row 4 of the set is 'e', but 'f' was given"):
        tmp_store.write("train", "epoch-2", x[5:], ["f"], encodings=["f32"])
    with pytest.raises(DuplicateIdError, match="'a' is already written to train/epoch-2"):
        tmp_store.write("train", "epoch-2", x[:1], ["a"], encodings=["f32"])
    tmp_store.write("train", "epoch-2", 2 * x[4:], ids[4:], encodings=["f32"])
    np.testing.assert_allclose(tmp_store.vectors("train", "epoch-2", "f32"), 2 * x, rtol=1e-6)


def test_bad_input_is_refused_and_nothing_is_written(tmp_store):
    x = rand(3)
    cases = [
        (dict(vectors=rand(3)[:, :5]), SchemaMismatchError, r"shape \(n, 70\)"),
        (dict(vectors=np.where(np.arange(DIM) == 4, np.nan, x)), InvalidVectorError, "row 0 .*NaN or inf"),
        (dict(ids=["a", "b", "a"]), DuplicateIdError, "'a' appears twice"),
        (dict(checkpoint="epoch-9"), UnknownNameError, "unknown checkpoint 'epoch-9'; the store has: epoch-1, epoch-2"),
        (dict(encodings=["absmax3"]), UnknownNameError, "unknown encoding 'absmax3'"),
        (dict(encodings=["absmax8-global"]), SchemaMismatchError, "requantize"),
        (dict(ids=["a", "b"]), SchemaMismatchError, "2 ids for 3 vectors"),
    ]
    for change, error, message in cases:
        args = dict(set_name="train", checkpoint="epoch-1", vectors=x, ids=["a", "b", "c"], encodings=["sign1"])
        args.update(change)
        with pytest.raises(error, match=message):
            tmp_store.write(**args)
    assert tmp_store.sets() == []
    inf = x.copy()
    inf[2, 0] = np.inf
    with pytest.raises(InvalidVectorError, match="row 2 \\(id 'c'\\)"):
        tmp_store.write("train", "epoch-1", inf, ["a", "b", "c"])
    tmp_store.write("train", "epoch-1", x, ["a", "b", "c"], encodings=["sign1"])
    with pytest.raises(SchemaMismatchError, match="holds encodings sign1; this write has f16"):
        tmp_store.write("train", "epoch-1", x, ["d", "e", "f"], encodings=["f16"])
    with pytest.raises(SchemaMismatchError, match="is a train set, not task"):
        tmp_store.write("train", "epoch-1", x, ["d", "e", "f"], kind="task", encodings=["sign1"])
    with pytest.raises(DuplicateIdError, match="'b' is already written"):
        tmp_store.write("train", "epoch-1", x[:1], ["b"], encodings=["sign1"])
    assert tmp_store.ids("train") == ["a", "b", "c"]


def test_unknown_names_list_what_exists(tmp_store):
    tmp_store.write("train", "epoch-1", rand(2), ["a", "b"], encodings=["sign1"])
    with pytest.raises(UnknownNameError, match="unknown set 'mmlu'; the store has: train"):
        tmp_store.vectors("mmlu", "epoch-1", "sign1")
    with pytest.raises(UnknownNameError, match="has no encoding 'f16'; it holds: sign1"):
        tmp_store.vectors("train", "epoch-1", "f16")


def test_open_errors(tmp_path, tmp_store):
    with pytest.raises(StoreNotFoundError, match="not a gradstore store"):
        gradstore.open(tmp_path)
    with pytest.raises(StoreExistsError, match="a store already exists"):
        gradstore.create(tmp_path / "s", dim=4)
    ro = gradstore.open(tmp_path / "s")
    with pytest.raises(ReadOnlyError, match="open read-only"):
        ro.write("train", "epoch-1", rand(1), ["z"])
    with pytest.raises(ReadOnlyError):
        ro.add_checkpoint("e3", lr=1.0)
    ro.close()


def test_newer_format_is_refused(tmp_path):
    store = gradstore.create(tmp_path / "s", dim=4)
    store.meta["format_version"] = 99
    staging = Staging(store, write=True)
    staging.write(lambda txn: txn.put(b"meta", __import__("json").dumps(store.meta).encode(),
                                      db=staging.dbs["meta"]))
    store.close()
    with pytest.raises(FormatVersionError, match="format version 99 is newer"):
        gradstore.open(tmp_path / "s")


def test_task_sets_keep_subtasks_in_first_seen_order(tmp_store):
    tmp_store.write("mmlu", "epoch-1", rand(5), list("abcde"), kind="task", encodings=["f16"],
                    subtasks=["law", "law", "art", "law", "bio"])
    info = tmp_store.set_info("mmlu")
    assert info["subtasks"] == ["law", "art", "bio"] and info["kind"] == "task"
    assert [r["subtask"] for r in tmp_store.rows("mmlu")] == ["law", "law", "art", "law", "bio"]


def _child_reads(path, queue):
    with gradstore.open(path) as store:
        queue.put(store.ids("train"))


def test_spawned_workers_and_pickle_reopen(tmp_store):
    tmp_store.write("train", "epoch-1", rand(3), ["a", "b", "c"], encodings=["sign1"])
    clone = pickle.loads(pickle.dumps(tmp_store))
    assert clone.ids("train") == ["a", "b", "c"] and clone.readonly is False
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_reads, args=(tmp_store.path, queue))
    proc.start()
    assert queue.get(timeout=60) == ["a", "b", "c"]
    proc.join(60)
    assert proc.exitcode == 0


def test_one_environment_per_path(tmp_store, tmp_path):
    other = gradstore.open(tmp_path / "s")
    assert other.env is tmp_store.env
    other.close()  # the shared environment stays open for the other handle
    assert tmp_store.checkpoint_names() == ["epoch-1", "epoch-2"]


def test_centered_rows_keep_a_frozen_centroid_and_exact_norms(tmp_store):
    x = rand(12) + 3.0  # a shared offset, as real gradients have
    tmp_store.write("train", "epoch-1", x[:5], [f"r{i}" for i in range(5)], encodings=["f32", "sign1-centered"])
    tmp_store.write("train", "epoch-1", x[5:], [f"r{i}" for i in range(5, 12)], encodings=["f32", "sign1-centered"])
    center = tmp_store.centroid("train", "epoch-1")
    np.testing.assert_allclose(center, x[:5].mean(axis=0), rtol=1e-6)  # frozen at the first batch
    rows = tmp_store.read("train", "epoch-1", "sign1-centered")
    res_norm, full_norm = rows.extra.T
    np.testing.assert_allclose(res_norm, np.linalg.norm(x - center, axis=1), rtol=1e-5)
    np.testing.assert_allclose(full_norm, np.linalg.norm(x, axis=1), rtol=1e-5)
    signs = quant.unpack_levels(rows.payload, "sign1", DIM)
    np.testing.assert_array_equal(signs, np.where(x - center > 0, 1, -1))
    # dequantized: centroid plus the residual at its exact length along the stored signs
    approx = tmp_store.vectors("train", "epoch-1", "sign1-centered")
    np.testing.assert_allclose(np.linalg.norm(approx - center, axis=1), res_norm, rtol=1e-5)
    assert tmp_store.centroid("train", "epoch-2") is None
    assert tmp_store.info()["sets"]["train"]["centroid_norms"] == {
        "epoch-1": pytest.approx(float(np.linalg.norm(center)), rel=1e-6)}


def test_a_calibration_centroid_is_used_when_given(tmp_store):
    x = rand(4)
    calibration = np.full(DIM, 0.5, np.float32)
    tmp_store.write("t", "epoch-1", x, list("abcd"), encodings=["absmax4-centered"], centroid=calibration)
    np.testing.assert_array_equal(tmp_store.centroid("t", "epoch-1"), calibration)
    with pytest.raises(SchemaMismatchError, match="cannot be copied between stores"):
        Staging(tmp_store).write_quantized(
            "u", "epoch-1", {"absmax4-centered": tmp_store.read("t", "epoch-1", "absmax4-centered")}, list("abcd"))


def test_older_format_is_refused_by_version_before_anything_else(tmp_path):
    import json

    import lmdb

    store = gradstore.create(tmp_path / "s", dim=4)
    meta = dict(store.meta, format_version=1)
    store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"meta", json.dumps(meta).encode(), db=env.open_db(b"meta", txn=txn))
        txn.drop(env.open_db(b"centroids", txn=txn), delete=True)  # as a version-1 store lacks it
    env.close()
    with pytest.raises(FormatVersionError, match="format version 1 is older than this gradstore reads \\(2\\)"):
        gradstore.open(tmp_path / "s")


def test_scan_rows_reads_just_the_given_rows_block_by_block(tmp_store):
    x, y = rand(30), rand(30, seed=1)
    ids = [f"r{i}" for i in range(30)]
    encs = ("absmax8", "sign1", "sign1-centered")
    tmp_store.write("train", "epoch-1", x, ids, encodings=encs)
    tmp_store.write("train", "epoch-2", y[:20], ids[:20], encodings=encs)
    rows = np.array([0, 1, 2, 3, 5, 9, 13, 14, 19])
    for enc in encs:
        whole = [tmp_store.read("train", c, enc) for c in ("epoch-1", "epoch-2")]
        br = tmp_store.set_info("train")["encodings"][enc]["block_rows"]
        steps = list(tmp_store.scan_rows("train", ["epoch-1", "epoch-2"], enc, rows))
        # one step per stored block that holds a wanted row, in row order
        assert [int(p[0]) // br for p, _, _ in steps] == sorted({int(r) // br for r in rows})
        np.testing.assert_array_equal(np.concatenate([p for p, _, _ in steps]), rows)
        for picked, at, blocks in steps:
            np.testing.assert_array_equal(at, picked - blocks[0].start)
        for c, full in enumerate(whole):
            got = [(b[c], at) for _, at, b in steps]
            np.testing.assert_array_equal(np.concatenate([b.payload[at] for b, at in got]), full.payload[rows])
            np.testing.assert_array_equal(np.concatenate([b.norm[at] for b, at in got]), full.norm[rows])
            if full.extra is not None:
                np.testing.assert_array_equal(np.concatenate([b.extra[at] for b, at in got]),
                                              full.extra[rows])
    assert list(tmp_store.scan_rows("train", ["epoch-1"], "sign1", [])) == []
    with pytest.raises(ValueError, match="rows must be a 1-D array of increasing row numbers"):
        list(tmp_store.scan_rows("train", ["epoch-1"], "sign1", [3, 3]))
    with pytest.raises(ValueError, match="rows 5..20 are outside the 20 rows every checkpoint of 'train' holds"):
        list(tmp_store.scan_rows("train", ["epoch-1", "epoch-2"], "sign1", [5, 20]))


def test_a_snapshot_keeps_scan_views_in_place_while_a_writer_rewrites_their_blocks(tmp_path):
    # The executor scores a scan's last blocks after the scan's generator has ended; without a
    # held read transaction LMDB hands their pages to the next write (here: rows refilled the
    # partial last block, and the following writes reused the freed pages).
    store = gradstore.create(tmp_path / "s", dim=DIM, map_size=64 << 20, block_bytes=64)
    store.add_checkpoint("epoch-1", lr=2e-5, step=10, epoch=1)
    store.write("train", "epoch-1", rand(30), [f"r{i}" for i in range(30)], encodings=("f32",))
    reader = gradstore.open(tmp_path / "s")
    with reader.snapshot() as snap:
        views = [b.payload for _, (b,), _ in reader.scan("train", ["epoch-1"], "f32", snapshot=snap)]
        stored = np.concatenate(views)  # a copy, taken before any write
        for k in range(20):
            store.write("train", "epoch-1", rand(7, seed=k + 1), [f"q{k}-{i}" for i in range(7)],
                        encodings=("f32",))
        assert reader.n_rows("train") == 30 + 20 * 7  # reads beside the snapshot see the writes
        np.testing.assert_array_equal(np.concatenate(views), stored)
    reader.close()
    store.close()


def test_a_write_that_must_grow_the_map_under_an_open_snapshot_is_refused(tmp_store):
    tmp_store.write("train", "epoch-1", rand(4), ["a", "b", "c", "d"], encodings=("f32",))
    stored = tmp_store.read("train", "epoch-1", "f32").payload
    big = rand(2000, seed=3)
    with tmp_store.snapshot() as snap:
        (b,) = next(tmp_store.scan("train", ["epoch-1"], "f32", snapshot=snap))[1]
        with pytest.raises(gradstore.GradstoreError, match="map must grow .* a scan or snapshot of it is open"):
            tmp_store.write("train", "epoch-1", big, [f"x{i}" for i in range(2000)], encodings=("f32",))
        np.testing.assert_array_equal(b.payload, stored[: len(b.payload)])
    assert tmp_store.n_rows("train") == 4  # nothing was written
    tmp_store.write("train", "epoch-1", big, [f"x{i}" for i in range(2000)], encodings=("f32",))
    assert tmp_store.n_rows("train") == 2004
