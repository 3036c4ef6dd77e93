"""The whole pipeline through the CLI on a tiny random LLaMA with SmolLM2's tokenizer (slow)."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import gradstore
from gradstore_cli.main import cli
from qless.config import IngestConfig, LoraConfig, ReadConfig
from qless.demo import DemoSettings, run_demo
from qless.model import ModelSource
from qless.tasks import DEMO_POOL_FILE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer random LLaMA saved with the built-in model's tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qless.model import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_warmup_ingest_query_through_the_cli(tiny_model, tmp_path):
    run = CliRunner().invoke
    common = ["--model", tiny_model, "--dtype", "fp32", "--max-length", "256", "-s"]
    result = run(cli, ["warmup", "--data", str(DEMO_POOL_FILE), "--out", str(tmp_path / "w"), "--percentage", "0.05",
                       "--epochs", "2", "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "16", "--grad-accum", "4",
                       *common])
    assert result.exit_code == 0, result.output
    ckpts = ["--checkpoint", str(tmp_path / "w" / "epoch-1"), "--checkpoint", str(tmp_path / "w" / "epoch-2")]
    store = ["--store", str(tmp_path / "s")]
    result = run(cli, ["ingest", "--data", str(DEMO_POOL_FILE), *ckpts, *store, "--dim", "256",
                       "--encodings", "f16,absmax8,sign1,sign1-centered", *common])
    assert result.exit_code == 0, result.output
    result = run(cli, ["ingest", "--task", "demo-bbh", *ckpts, *store, "--dim", "256",
                       "--encodings", "f16,absmax8,sign1,sign1-centered", *common])
    assert result.exit_code == 0, result.output
    out = tmp_path / "selected.jsonl"
    result = run(cli, ["query", "--task", "demo-bbh", "--k", "5%", *store, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 15  # 5% of 300
    pool_lines = {json.loads(line)["id"]: line for line in DEMO_POOL_FILE.read_text().splitlines(keepends=True)}
    assert out.read_text() == "".join(pool_lines[r["id"]] for r in rows)  # byte-identical records
    with gradstore.open(tmp_path / "s") as st:
        info = st.info()
        assert [c["lr"] for c in info["checkpoints"]] == [c["lr"] for c in
                                                           (json.loads((tmp_path / "w" / e / "qless_checkpoint.json").read_text())
                                                            for e in ("epoch-1", "epoch-2"))]
        assert info["sets"]["train"]["rows"] == 300 and info["sets"]["demo-bbh"]["subtasks"] == 2


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tiny_model, tmp_path):
    lines = []
    settings = DemoSettings(source=ModelSource(tiny_model), read=ReadConfig(max_length=256),
                            lora=LoraConfig(r=4, alpha=16), warmup=replace(DemoSettings().warmup, epochs=1),
                            ingest=IngestConfig(dim=256))
    reports = run_demo(tmp_path / "demo", settings, echo=lines.append, progress=False)
    assert [r.task for r in reports] == ["demo-mmlu", "demo-bbh", "demo-tydiqa"]
    for rep in reports:
        assert rep.selected == 15 and 0 <= rep.skill_share <= 1
        assert set(rep.agreement) == {"absmax8", "sign1-centered"}
        assert -1 <= rep.agreement["sign1-centered"]["spearman"] <= 1
    assert any("done in" in line for line in lines)
    with gradstore.open(tmp_path / "demo") as st:
        assert st.sets() == ["train", "demo-mmlu", "demo-bbh", "demo-tydiqa"]
