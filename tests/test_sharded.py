"""Sharded stores: a query over shards in place equals the query over the store `merge` builds
from them in manifest order (ids, rows, scores, ties, plan), on the thread pool and on a real
local Ray cluster of two nodes (slow), where the driver opens no shard; manifest and
compatibility errors; the CLI."""

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from gradstore_cli.main import cli

import gradstore
from gradstore import ops
from gradstore.errors import DuplicateIdError, GradstoreError, SchemaMismatchError
from gradstore.sharded import ManifestError

DIM = 100
PLAIN = ("f32", "f16", "absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "sign1")
CENTERED = ("sign1-centered", "absmax8-centered", "absmax4-centered")
CKPTS = {"e1": 3e-5, "e2": 2e-5, "e3": 1e-5}
CUTS = (0, 20, 41, 57)  # three shards of the 57 train rows
MMLU = ["law", "art", "law", "bio", "law", "art"]  # split over shards 0 and 1
TYDIQA = ["en", "fi", "ko"]  # in shard 2 only


def _data(seed=7):
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(DIM)  # rows share a direction, as real gradients do
    out = {}
    for c in CKPTS:
        x = (rng.standard_normal((CUTS[-1], DIM)) + 0.5 * shared).astype(np.float32)
        x[30] = x[50] = x[5]  # equal rows in every shard: their scores tie exactly
        out[c] = {"train": x,
                  "mmlu": (rng.standard_normal((len(MMLU), DIM)) + 0.5 * shared).astype(np.float32),
                  "tydiqa": (rng.standard_normal((len(TYDIQA), DIM)) + 0.5 * shared).astype(np.float32)}
    return out


POOL = [json.dumps({"id": f"z{i}", "text": "x" * i}) + "\n" for i in range(CUTS[-1])]  # --out copies these


def meta(root, rows):
    offsets = np.cumsum([0] + [len(line) for line in POOL])
    return [{"source": "dolly" if i % 3 else "flan", "tokens": 10 * i,
             "source_file": str(root / "pool.jsonl"), "offset": int(offsets[i])} for i in rows]


def _write(path, data, rows, mmlu, tydiqa, encodings):
    """A store with train rows `rows`, mmlu rows `mmlu` (a range), and tydiqa when asked; centered
    encodings subtract the whole pool's mean, the same in every store."""
    with gradstore.create(path, dim=DIM, block_bytes=256) as st:
        for c, lr in CKPTS.items():
            st.add_checkpoint(c, lr=lr)
            x = data[c]["train"]
            for lo in range(rows.start, rows.stop, 8):
                hi = min(rows.stop, lo + 8)
                st.write("train", c, x[lo:hi], [f"z{i}" for i in range(lo, hi)], encodings=encodings,
                         centroid=x.mean(axis=0), metadata=meta(path.parent, range(lo, hi)))
            if len(mmlu):
                st.write("mmlu", c, data[c]["mmlu"][mmlu.start:mmlu.stop], [f"m{i}" for i in mmlu],
                         kind="task", encodings=PLAIN, subtasks=MMLU[mmlu.start:mmlu.stop])
            if tydiqa:
                st.write("tydiqa", c, data[c]["tydiqa"], list("abc"), kind="task", encodings=PLAIN,
                         subtasks=TYDIQA)
    return path


def build(root, encodings):
    """Three shards and their manifest; the reference is merge's store (one store written whole
    when the encodings are centered: merge cannot copy those)."""
    data = _data()
    (root / "pool.jsonl").write_text("".join(POOL))
    mmlu = (range(3), range(3, 6), range(0))
    shards = [_write(root / f"shard-{j}", data, range(CUTS[j], CUTS[j + 1]), mmlu[j], j == 2, encodings)
              for j in range(3)]
    (root / "shards.json").write_text(json.dumps({"shards": [{"path": f"shard-{j}"} for j in range(3)]}))
    if any(e.endswith("-centered") for e in encodings):
        # one store in the merged layout: train, mmlu, then tydiqa
        with gradstore.create(root / "whole", dim=DIM, block_bytes=256) as st:
            for c, lr in CKPTS.items():
                st.add_checkpoint(c, lr=lr)
                x = data[c]["train"]
                st.write("train", c, x, [f"z{i}" for i in range(len(x))], encodings=encodings,
                         centroid=x.mean(axis=0), metadata=meta(root, range(len(x))))
                st.write("mmlu", c, data[c]["mmlu"], [f"m{i}" for i in range(6)], kind="task",
                         encodings=PLAIN, subtasks=MMLU)
                st.write("tydiqa", c, data[c]["tydiqa"], list("abc"), kind="task", encodings=PLAIN,
                         subtasks=TYDIQA)
    else:
        ops.merge(shards, root / "whole")
    return root / "shards.json", root / "whole"


def queries(encodings):
    out = [f"TOP 7 FROM train BY mmlu ENCODING {e} MODE {m}" for e in encodings
           for m in ("symmetric", "asymmetric") if not (e in ("f32", "f16") and m == "symmetric")]
    return out + [
        "TOP 5% FROM train BY mmlu",  # the default plan: two stages
        "TOP 10% FROM train BY mmlu, tydiqa COMBINE max AGG mean",
        "TOP 20% FROM train BY tydiqa WHERE source = 'dolly'",  # 20% of the rows that pass
        "TOP 6 FROM train BY mmlu RERANK f16 OVERSAMPLE 2 WHERE tokens < 400",
        "SCORE FROM train BY mmlu, tydiqa CHECKPOINTS e1, e3 WEIGHT uniform",
        "SCORE FROM train BY mmlu ENCODING sign1 WHERE source = 'flan'",
    ]


def assert_same(got, want):
    assert got.ids == want.ids
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.records == want.records
    assert got.plan.to_dict() == want.plan.to_dict()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build(tmp_path_factory.mktemp("plain"), PLAIN)


@pytest.fixture(scope="module")
def centered(tmp_path_factory):
    return build(tmp_path_factory.mktemp("centered"), PLAIN + CENTERED)


@pytest.mark.parametrize("layout", ["plain", "centered"])
def test_sharded_queries_equal_the_merged_store(layout, request):
    manifest, whole = request.getfixturevalue(layout)
    encodings = PLAIN if layout == "plain" else PLAIN + CENTERED
    with gradstore.open_sharded(manifest) as sharded, gradstore.open(whole) as merged:
        assert sharded.ids("train") == merged.ids("train")
        for text in queries(encodings):
            assert_same(sharded.query(text), merged.query(text))
        two = sharded.query("TOP 5% FROM train BY mmlu")
        assert len(two.plan.stages) == 2 and two.plan.stages[0].keep == 6 * two.plan.k
        every = sharded.query("SCORE FROM train BY mmlu")
        assert every.scores[5] == every.scores[30] == every.scores[50]  # ties across shards
        assert str(sharded.query("EXPLAIN TOP 5% FROM train BY mmlu")) == \
            str(merged.query("EXPLAIN TOP 5% FROM train BY mmlu"))


def test_ties_across_shards_go_to_the_earlier_shard(plain):
    manifest, whole = plain
    with gradstore.open_sharded(manifest) as sharded, gradstore.open(whole) as merged:
        every = merged.query("SCORE FROM train BY mmlu ENCODING sign1")
        rank = int(np.sum(every.scores > every.scores[5]))  # rows 5, 30, 50 tie at this rank
        text = f"TOP {rank + 2} FROM train BY mmlu ENCODING sign1"
        got = sharded.query(text)
        assert_same(got, merged.query(text))
        assert list(got.rows[rank:]) == [5, 30]


def _manifest(tmp_path, doc, name="m.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_manifest_errors_name_the_file_and_field(tmp_path):
    cases = [
        ("{\"shards\": [", r"m.json: not JSON \(Expecting value: line 1 column 13"),
        ({"shard": []}, "m.json: expected an object whose \"shards\" is a non-empty list"),
        ({"shards": ["a"]}, r"m.json: shards\[0\]: expected an object with \"path\""),
        ({"shards": [{"path": 3}]}, r"m.json: shards\[0\].path: expected the shard store's path"),
        ({"shards": [{"path": "a", "host": "x"}]}, r"m.json: shards\[0\]: unknown field 'host'"),
        ({"shards": [{"path": "a", "node": 1}]}, r"m.json: shards\[0\].node: expected a Ray node id"),
        ({"shards": [{"path": "a"}, {"path": "./a"}]}, r"m.json: shards\[1\].path: the same store as shards\[0\]"),
    ]
    for doc, message in cases:
        with pytest.raises(ManifestError, match=message):
            gradstore.open_sharded(_manifest(tmp_path, doc))
    with pytest.raises(ManifestError, match="nope.json: no such manifest"):
        gradstore.open_sharded(tmp_path / "nope.json")


def test_incompatible_shards_are_refused_with_merges_messages(tmp_path):
    data = _data()
    a = _write(tmp_path / "a", data, range(10), range(6), True, ("f32", "sign1"))
    b = _write(tmp_path / "b", data, range(10, 20), range(0), False, ("f32", "sign1"))
    with gradstore.create(tmp_path / "d", dim=DIM + 1) as st:
        st.add_checkpoint("e1", lr=3e-5)
    dup = _write(tmp_path / "dup", data, range(5, 12), range(0), False, ("f32", "sign1"))
    other_enc = _write(tmp_path / "enc", data, range(10, 20), range(0), False, ("f32",))
    with gradstore.create(tmp_path / "ck", dim=DIM) as st:
        st.add_checkpoint("e1", lr=3e-5)
    cases = [
        ("d", SchemaMismatchError, f"cannot merge: dim differs: {a} has {DIM}, {tmp_path / 'd'} has {DIM + 1}"),
        ("dup", DuplicateIdError, f"cannot merge: id 'z5' of set 'train' checkpoint 'e1' is in both {a} and {dup}"),
        ("enc", SchemaMismatchError, f"cannot merge: set 'train' holds f32, sign1 in {a}, f32 in {other_enc}"),
        ("ck", SchemaMismatchError, f"cannot shard: checkpoints differ: {a} has e1, e2, e3, {tmp_path / 'ck'} has e1"),
    ]
    for other, error, message in cases:
        manifest = _manifest(tmp_path, {"shards": [{"path": "a"}, {"path": other}]})
        with pytest.raises(error) as info:
            gradstore.open_sharded(manifest)
        assert str(info.value) == message
    with gradstore.open_sharded(_manifest(tmp_path, {"shards": [{"path": "a"}, {"path": str(b)}]})) as s:
        assert s.n_rows("train") == 20


def test_an_id_two_shards_hold_at_different_checkpoints_is_refused(tmp_path):
    """merge would join such rows across checkpoints; shards must not share an id at all."""
    x = _data()["e1"]["train"]
    for name, checkpoint in (("first", "e1"), ("later", "e2")):
        with gradstore.create(tmp_path / name, dim=DIM) as st:
            for c, lr in CKPTS.items():
                st.add_checkpoint(c, lr=lr)
            st.write("train", checkpoint, x[:1], ["z0"], encodings=("f32",))
    manifest = _manifest(tmp_path, {"shards": [{"path": "first"}, {"path": "later"}]})
    with pytest.raises(DuplicateIdError) as info:
        gradstore.open_sharded(manifest)
    assert str(info.value) == (f"cannot shard: id 'z0' of set 'train' is in both {tmp_path / 'first'}"
                               f" and {tmp_path / 'later'}")


def test_without_ray_asking_for_it_is_one_clear_error(plain, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(GradstoreError, match=r"^ray is not installed; running shards on Ray needs"
                                             r" pip install 'gradstore\[ray\]'$"):
        gradstore.open_sharded(plain[0], ray=True)
    result = CliRunner().invoke(cli, ["query", "--store", str(plain[0]), "--task", "mmlu", "--ray"])
    assert result.exit_code == 1 and result.output.startswith("Error: ray is not installed")


def test_cli_queries_a_manifest_as_the_merged_store(plain, tmp_path):
    manifest, whole = plain
    run = CliRunner().invoke
    for args in (["--task", "mmlu", "--k", "5%"], ["TOP 9 FROM train BY mmlu, tydiqa WHERE source = 'dolly'"]):
        got = run(cli, ["query", "--store", str(manifest), *args, "--out", str(tmp_path / "a.jsonl")])
        want = run(cli, ["query", "--store", str(whole), *args, "--out", str(tmp_path / "b.jsonl")])
        assert got.exit_code == 0 and want.exit_code == 0, got.output
        assert got.stdout == want.stdout and got.stdout
        written = (tmp_path / "a.jsonl").read_text()
        assert written == (tmp_path / "b.jsonl").read_text()
        assert written == "".join(POOL[json.loads(line)["row"]] for line in got.stdout.splitlines())
    bad = run(cli, ["query", "--store", str(whole), "--task", "mmlu", "--ray"])
    assert bad.exit_code == 2 and "--ray runs the shards of a manifest" in bad.output
    both = run(cli, ["ingest", "--data", str(tmp_path / "b.jsonl"), "--checkpoint", str(tmp_path),
                     "--shard", "0/2", "--ray", "2"])
    assert both.exit_code == 2 and "give --shard or --ray, not both" in both.output
    broken = _manifest(tmp_path, "[1,", "broken.json")
    result = run(cli, ["query", "--store", str(broken), "--task", "mmlu"])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {broken}: not JSON")
    assert len(result.output.strip().splitlines()) == 1


# ---- on a real local Ray cluster -------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_nodes():
    """A real local Ray cluster of two nodes (two raylets on this machine, ~6 s to start):
    (ray, the id of the node that is not the driver's)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    far = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield ray, far.node_id
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(ray_nodes):
    return ray_nodes[0]


@pytest.mark.slow
def test_ray_sharded_queries_equal_the_merged_store(ray_cluster, centered):
    manifest, whole = centered
    with gradstore.open_sharded(manifest, ray=True) as sharded, gradstore.open(whole) as merged:
        pids = [pid for _, pid in ray_cluster.get([a.where.remote() for a in sharded._workers.actors])]
        assert len(set(pids)) == 3 and os.getpid() not in pids  # one actor process per shard
        for text in queries(PLAIN + CENTERED):
            assert_same(sharded.query(text), merged.query(text))


@pytest.mark.slow
def test_ray_worker_killed_mid_query_never_gives_a_wrong_answer(ray_cluster, tmp_path):
    manifest, whole = build(tmp_path, PLAIN)
    text = "TOP 5% FROM train BY mmlu, tydiqa"
    with gradstore.open_sharded(manifest, ray=True) as sharded, gradstore.open(whole) as merged:
        want = merged.query(text)
        assert_same(sharded.query(text), want)  # warm: the actors have compiled their kernels
        victim = sharded._workers.actors[1]
        outcomes = []
        for delay in (0.0, 0.02, 0.05):
            pid = ray_cluster.get(victim.where.remote())[1]
            killer = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
            killer.start()
            try:
                outcomes.append(sharded.query(text))
            except GradstoreError as exc:
                outcomes.append(str(exc))
            killer.join()
            deadline = time.monotonic() + 60
            while True:  # the actor restarts (its shard reopened)
                try:
                    assert ray_cluster.get(victim.where.remote(), timeout=30)[1] != pid
                    break
                except ray_cluster.exceptions.RayActorError:
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
        for got in outcomes:
            if isinstance(got, str):  # a clear error naming the shard
                assert str(tmp_path / "shard-1") in got and "run" in got and "\n" not in got
            else:
                assert_same(got, want)
        assert_same(sharded.query(text), want)  # and the next query is answered


@pytest.mark.slow
def test_on_ray_the_driver_opens_no_shard_and_node_hints_place_the_actors(ray_nodes, plain, tmp_path,
                                                                          monkeypatch):
    ray, far = ray_nodes
    manifest, whole = plain
    shards = {os.path.realpath(manifest.parent / f"shard-{j}") for j in range(3)}
    hinted = manifest.parent / "far.json"  # shard 2 on the other node
    hinted.write_text(json.dumps({"shards": [{"path": "shard-0"}, {"path": "shard-1"},
                                             {"path": "shard-2", "node": far}]}))
    lmdb_open = gradstore.env.lmdb.open

    def refuse_shards(path, **options):  # the driver's every LMDB open goes through here
        if os.path.realpath(path) in shards:
            raise PermissionError(f"{path}: the driver opened a shard")
        return lmdb_open(path, **options)

    monkeypatch.setattr(gradstore.env.lmdb, "open", refuse_shards)
    with pytest.raises(PermissionError, match="the driver opened a shard"):
        gradstore.open_sharded(hinted)  # the thread pool opens them here: the guard holds
    with gradstore.open_sharded(hinted, ray=True) as sharded, gradstore.open(whole) as merged:
        here = ray.get_runtime_context().get_node_id()
        placed = [node for node, _ in ray.get([a.where.remote() for a in sharded._workers.actors])]
        assert placed == [here, here, far] and here != far
        for text in ("TOP 5% FROM train BY mmlu", "TOP 20% FROM train BY tydiqa WHERE source = 'dolly'",
                     "SCORE FROM train BY mmlu, tydiqa CHECKPOINTS e1, e3 WEIGHT uniform"):
            assert_same(sharded.query(text), merged.query(text))
        assert str(sharded.query("EXPLAIN TOP 5% FROM train BY mmlu")) == \
            str(merged.query("EXPLAIN TOP 5% FROM train BY mmlu"))
        assert sharded.ids("train") == merged.ids("train")
        for name in ("train", "mmlu", "tydiqa"):
            assert sharded.rows(name) == merged.rows(name)
        assert sharded.rows_at("train", [56, 0, 20, 19]) == merged.rows_at("train", [56, 0, 20, 19])
        got, want = sharded.read("train", "e2", "absmax4"), merged.read("train", "e2", "absmax4")
        for field in ("payload", "scale", "norm"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        np.testing.assert_array_equal(sharded.vectors("train", "e3", "f16"),
                                      merged.vectors("train", "e3", "f16"))
        assert not any(gradstore.env._REGISTRY.holds(path) for path in shards)
    address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == far)
    for node, message in ((address, "2 alive Ray nodes have that address; name the node by its id"),
                          ("10.9.9.9", "no alive Ray node has that id or address")):
        bad = _manifest(tmp_path, {"shards": [{"path": str(manifest.parent / "shard-0"), "node": node}]})
        with pytest.raises(GradstoreError) as info:
            gradstore.open_sharded(bad, ray=True)
        assert str(info.value).startswith(f"{bad}: shards[0].node {node!r}: {message}")
    missing = _manifest(tmp_path, {"shards": [{"path": "shard-0"}]})  # no such store on its node
    with pytest.raises(gradstore.StoreNotFoundError) as info:  # raised by its actor, as itself
        gradstore.open_sharded(missing, ray=True)
    assert str(info.value) == f"{os.path.realpath(tmp_path / 'shard-0')}: not a gradstore store (no data.mdb)"
    run = CliRunner().invoke  # --out: the selected rows' records come from the actors
    args = ["--task", "mmlu", "--k", "10%"]
    got = run(cli, ["query", "--store", str(hinted), *args, "--ray", "--out", str(tmp_path / "a.jsonl")])
    want = run(cli, ["query", "--store", str(whole), *args, "--out", str(tmp_path / "b.jsonl")])
    assert got.exit_code == 0, got.output
    assert got.stdout == want.stdout and got.stdout
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text() != ""
