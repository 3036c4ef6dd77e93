"""Ingest on a tiny random LLaMA: vectors equal the direct computation; resume; shards; refusals."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import gradstore
from gradstore.errors import SchemaMismatchError
from qless.checkpoint import Checkpoint
from qless.config import IngestConfig
from qless.data import Example
from qless.gradients import GradientComputer
from qless.ingest import ingest, parse_shard, shard_slice
from qless.model import ModelSource, attach_lora, load_adapter, load_model
from qless.optimizer_state import load_optimizer_state, save_optimizer_state
from qless.projection import make_projection


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny LLaMA and two LoRA checkpoints with real AdamW state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    model = attach_lora(load_model(root / "model", dtype="fp32"), r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ckpts = []
    for epoch in (1, 2):
        for step in range(3):
            ids = torch.randint(0, 128, (1, 12))
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        path = root / f"epoch-{epoch}"
        model.save_pretrained(path)
        save_optimizer_state(path, model, opt)
        ckpts.append(Checkpoint(f"epoch-{epoch}", str(path), lr=1e-2 / epoch, step=3 * epoch, epoch=epoch))
    return root / "model", ckpts


def fp32(model_dir) -> ModelSource:
    return ModelSource(str(model_dir), "fp32")


def examples(n, seed=0, prefix="ex"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(0, 128, 10).tolist()
        labels = [-100] * 5 + ids[5:]
        out.append(Example(f"{prefix}{i}", ids, labels, "/data/pool.jsonl", 100 * i, i + 1,
                           f"s{i % 3}" if prefix == "v" else None, {"source": "toy", "tokens": 10}))
    return out


def test_vectors_equal_the_direct_computation(tiny, tmp_path):
    model_dir, ckpts = tiny
    pool = examples(7)
    report = ingest(tmp_path / "s", pool, "train", ckpts, fp32(model_dir),
                    IngestConfig(encodings=("f32", "sign1"), dim=64, batch_size=3), progress=False)
    assert report.written == 14 and report.no_response == 0
    with gradstore.open(tmp_path / "s") as store:
        assert store.ids("train") == [e.id for e in pool]
        assert [c["lr"] for c in store.checkpoints()] == [1e-2, 5e-3]
        assert store.rows("train")[2]["offset"] == 200 and store.rows("train")[2]["source"] == "toy"
        project = make_projection(store.meta["projection"])
        for ckpt in ckpts:
            model = load_adapter(load_model(model_dir, dtype="fp32"), ckpt.path)
            computer = GradientComputer(model, load_optimizer_state(ckpt.path, model), mode="adam")
            direct = np.stack([project.project(computer.gradient(e)[None])[0] for e in pool])  # batch 1
            # ingest's batched path, with the second checkpoint's adapter loaded into the same model
            np.testing.assert_allclose(store.vectors("train", ckpt.name, "f32"), direct, rtol=1e-5, atol=1e-5)
        assert store.meta["lora"]["r"] == 4 and store.meta["projection"]["dim"] == 64


def test_task_sets_get_plain_gradients_and_subtasks(tiny, tmp_path):
    model_dir, ckpts = tiny
    vals = examples(5, seed=1, prefix="v")
    ingest(tmp_path / "s", vals, "toy-task", ckpts[:1], fp32(model_dir),
           IngestConfig(encodings=("f32",), dim=64), kind="task", progress=False)
    with gradstore.open(tmp_path / "s") as store:
        assert store.set_info("toy-task")["subtasks"] == ["s0", "s1", "s2"]
        project = make_projection(store.meta["projection"])
        model = load_adapter(load_model(model_dir, dtype="fp32"), ckpts[0].path)
        g = GradientComputer(model, mode="sgd").gradient(vals[0])
        np.testing.assert_allclose(store.vectors("toy-task", "epoch-1", "f32")[0], project.project(g[None])[0],
                                   rtol=1e-5, atol=1e-6)


def test_killed_ingest_resumes_to_the_same_store(tiny, tmp_path, monkeypatch):
    model_dir, ckpts = tiny
    pool = examples(8)
    args = ("train", ckpts, fp32(model_dir), IngestConfig(encodings=("f32",), dim=64, batch_size=3))
    ingest(tmp_path / "full", pool, *args, progress=False)

    real_write = gradstore.Store.write
    calls = {"n": 0}

    def dying_write(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the first batch of the second checkpoint
            raise KeyboardInterrupt
        return real_write(self, *a, **k)

    monkeypatch.setattr(gradstore.Store, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "killed", pool, *args, progress=False)
    monkeypatch.setattr(gradstore.Store, "write", real_write)
    with gradstore.open(tmp_path / "killed") as store:
        assert store.n_rows("train", ["epoch-1"]) == 8 and store.n_rows("train", ["epoch-2"]) == 0
    report = ingest(tmp_path / "killed", pool, *args, progress=False)
    assert report.already_stored == 8 and report.written == 8
    with gradstore.open(tmp_path / "full") as a, gradstore.open(tmp_path / "killed") as b:
        for c in ("epoch-1", "epoch-2"):
            np.testing.assert_array_equal(a.vectors("train", c, "f32"), b.vectors("train", c, "f32"))


def test_no_response_examples_are_skipped_and_counted(tiny, tmp_path):
    model_dir, ckpts = tiny
    pool = examples(4)
    pool[1] = Example("empty", pool[1].input_ids, [-100] * 10, "/x", 0, 1, None, {})
    report = ingest(tmp_path / "s", pool, "train", ckpts[:1], fp32(model_dir),
                    IngestConfig(encodings=("sign1",), dim=64), progress=False)
    assert report.no_response == 1 and report.written == 3
    assert "1 skipped: no response tokens" in report.summary()


def test_a_different_projection_is_refused(tiny, tmp_path):
    model_dir, ckpts = tiny
    config = IngestConfig(encodings=("sign1",), dim=64)
    ingest(tmp_path / "s", examples(2), "train", ckpts[:1], fp32(model_dir), config, progress=False)
    with pytest.raises(SchemaMismatchError, match="the store's dim is 64, this ingest's is 128"):
        ingest(tmp_path / "s", examples(2), "train", ckpts[:1], fp32(model_dir), replace(config, dim=128),
               progress=False)


def test_ingest_into_an_open_store_leaves_it_open_and_equals_a_path_ingest(tiny, tmp_path):
    model_dir, ckpts = tiny
    pool = examples(5)
    args = ("train", ckpts, fp32(model_dir), IngestConfig(encodings=("f32",), dim=64))
    ingest(tmp_path / "by-path", pool, *args, progress=False)
    with gradstore.open(tmp_path / "by-path") as made:
        with gradstore.create(tmp_path / "open", dim=64, projection=made.meta["projection"],
                              model=made.meta["model"], lora=made.meta["lora"]) as store:
            report = ingest(store, pool, *args, progress=False)
            assert report.written == 10
            store.write("extra", "epoch-1", np.ones((1, 64), np.float32), ["x"], encodings=("f32",))
            for c in ckpts:  # still open, and the same vectors as the path ingest wrote
                np.testing.assert_array_equal(store.vectors("train", c.name, "f32"),
                                              made.vectors("train", c.name, "f32"))
    with gradstore.open(tmp_path / "by-path") as ro, pytest.raises(
            gradstore.ReadOnlyError, match="ingest needs the store open with readonly=False"):
        ingest(ro, pool, *args, progress=False)
    other = gradstore.create(tmp_path / "other", dim=64, projection={"kind": "sparse-rademacher", "seed": 9})
    with other, pytest.raises(SchemaMismatchError, match="the store's projection is"):
        ingest(other, pool, *args, progress=False)


def test_shards_are_contiguous_and_cover_everything(monkeypatch):
    items = list(range(10))
    parts = [shard_slice(items, (i, 3)) for i in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard(None) == (2, 8)
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        parse_shard("4/4")


def test_reload_adapter_loads_weights_in_place_and_refuses_other_settings(tiny, tmp_path):
    from qless.model import ModelLoadError, reload_adapter

    model_dir, ckpts = tiny
    model = load_adapter(load_model(model_dir, dtype="fp32"), ckpts[0].path)
    fresh = load_adapter(load_model(model_dir, dtype="fp32"), ckpts[1].path)
    assert reload_adapter(model, ckpts[1].path) is model
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    attach_lora(load_model(model_dir, dtype="fp32"), r=2, alpha=8).save_pretrained(tmp_path / "r2")
    with pytest.raises(ModelLoadError, match="LoRA r is 2, the loaded adapter's is 4"):
        reload_adapter(model, tmp_path / "r2")


@pytest.mark.slow
def test_ingest_on_two_ray_workers_equals_one_process_row_for_row(tiny, tmp_path):
    """A real local Ray cluster: two workers, each with its own model, each its own shard."""
    ray = pytest.importorskip("ray")
    from qless.ray_ingest import ingest_on_ray

    model_dir, ckpts = tiny
    pool = examples(9)
    args = ("train", ckpts, fp32(model_dir), IngestConfig(encodings=("f32", "sign1"), dim=64, batch_size=3))
    ingest(tmp_path / "one", pool, *args, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = ingest_on_ray(tmp_path / "shards", pool, *args, workers=2)
        assert report.written == 18 and report.already_stored == 0
        again = ingest_on_ray(tmp_path / "shards", pool, *args, workers=2)  # resumes: nothing to do
        assert again.written == 0 and again.already_stored == 18
    finally:
        ray.shutdown()
    manifest = tmp_path / "shards" / "manifest.json"
    assert [s["path"] for s in json.loads(manifest.read_text())["shards"]] == ["shard-0", "shard-1"]
    with gradstore.open_sharded(manifest) as sharded, gradstore.open(tmp_path / "one") as one:
        assert sharded.ids("train") == one.ids("train") == [e.id for e in pool]
        assert sharded.rows("train") == one.rows("train")
        assert [n for _, _, n in sharded._spans("train")] == [4, 5]  # shard_slice's split
        for c in ckpts:
            np.testing.assert_allclose(sharded.vectors("train", c.name, "f32"),
                                       one.vectors("train", c.name, "f32"), rtol=1e-5, atol=1e-6)
