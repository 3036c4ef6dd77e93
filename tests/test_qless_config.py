"""qless.config: each stage's settings, their checks, and one path from CLI options to them."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from gradstore_cli.main import cli

import qless.evaluate
import qless.ingest
import qless.train
import qless.warmup
from qless.config import ConfigError, EvalConfig, IngestConfig, LoraConfig, ReadConfig, WarmupConfig
from qless.model import ModelSource

# The Python path's defaults, read before the `calls` fixture stands in for these functions.
PYTHON = {stage: {name: p.default for name, p in inspect.signature(fn).parameters.items()
                  if p.default is not inspect.Parameter.empty}
          for stage, fn in (("warmup", qless.warmup.warmup_files), ("train", qless.train.train_files),
                            ("ingest", qless.ingest.ingest_files), ("eval", qless.evaluate.evaluate_files))}


@pytest.mark.parametrize(("make", "message"), [
    (lambda: IngestConfig(token_budget=0), "IngestConfig.token_budget must be >= 1, got 0"),
    (lambda: IngestConfig(dim=2.5), "IngestConfig.dim must be an integer, got 2.5"),
    (lambda: IngestConfig(projection="gaussian"),
     "IngestConfig.projection must be one of sparse-rademacher, dense-rademacher, got 'gaussian'"),
    (lambda: IngestConfig(encodings="f16"),
     "IngestConfig.encodings must be a non-empty sequence of encoding names, got 'f16'"),
    (lambda: IngestConfig(encodings=["f16", "absmean3"]),
     ("IngestConfig.encodings must be known encodings (unknown encoding 'absmean3': expected one of f32,"
      " f16, absmax8, absmax4, absmax2, absmean8, absmean4, absmean2, sign1 (quantized ones may add -global"
      " and/or -centered)), got ['f16', 'absmean3']")),
    (lambda: WarmupConfig(epochs=0), "WarmupConfig.epochs must be >= 1, got 0"),
    (lambda: WarmupConfig(epochs=True), "WarmupConfig.epochs must be an integer, got True"),
    (lambda: WarmupConfig(lr=0), "WarmupConfig.lr must be > 0, got 0"),
    (lambda: WarmupConfig(lr=float("nan")), "WarmupConfig.lr must be > 0, got nan"),
    (lambda: WarmupConfig(warmup_ratio=1), "WarmupConfig.warmup_ratio must be in [0, 1), got 1"),
    (lambda: WarmupConfig(scheduler="step"),
     "WarmupConfig.scheduler must be one of linear, cosine, constant, got 'step'"),
    (lambda: WarmupConfig(max_steps=0), "WarmupConfig.max_steps must be >= 1, got 0"),
    (lambda: WarmupConfig(max_steps="3"), "WarmupConfig.max_steps must be an integer or None, got '3'"),
    (lambda: WarmupConfig(max_grad_norm=-1.0), "WarmupConfig.max_grad_norm must be >= 0, got -1.0"),
    (lambda: LoraConfig(alpha=0), "LoraConfig.alpha must be > 0, got 0"),
    (lambda: LoraConfig(dropout=1.0), "LoraConfig.dropout must be in [0, 1), got 1.0"),
    (lambda: ReadConfig(chat_format="auto"), "ReadConfig.chat_format must be one of tulu, template, got 'auto'"),
    (lambda: ReadConfig(skip_invalid=1), "ReadConfig.skip_invalid must be True or False, got 1"),
    (lambda: EvalConfig(k_shot=-1), "EvalConfig.k_shot must be >= 0, got -1"),
    (lambda: EvalConfig(subtasks="law"), "EvalConfig.subtasks must be a sequence of subtask names, got 'law'"),
])
def test_a_bad_setting_is_one_line_naming_the_field(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)  # the CLI maps the library's ValueErrors


def test_settings_are_normalized_to_one_spelling():
    assert WarmupConfig(max_grad_norm=0).max_grad_norm is None  # "no clipping", as None spells it
    assert IngestConfig(encodings=["F16", " sign1-Centered"]).encodings == ("f16", "sign1-centered")
    assert EvalConfig(subtasks=["a", "b"]).subtasks == ("a", "b")
    numpy = WarmupConfig(epochs=np.int64(2), lr=np.float32(0.5))  # plain numbers: the record is JSON
    assert (numpy.epochs, numpy.lr) == (2, 0.5) and (type(numpy.epochs), type(numpy.lr)) == (int, float)
    assert hash(IngestConfig()) == hash(IngestConfig(encodings=list(IngestConfig.encodings)))


def test_the_configs_lists_match_their_users():
    from qless.config import PROJECTIONS, STAGE_CHAT_FORMATS
    from qless.data import CHAT_FORMATS
    from qless.model import attach_lora
    from qless.projection import _KINDS
    from qless.tasks import TASK_CHAT_FORMATS

    assert set(PROJECTIONS) == set(_KINDS)
    assert set(STAGE_CHAT_FORMATS) == set(CHAT_FORMATS) & set(TASK_CHAT_FORMATS)
    defaults = inspect.signature(attach_lora).parameters
    assert LoraConfig() == LoraConfig(*(defaults[f].default for f in ("r", "alpha", "dropout")))


# ---- the CLI builds the same settings as the Python path -----------------------------------------


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Each stage function the CLI calls records its arguments instead of running."""
    import gradstore

    seen: dict = {}
    report = SimpleNamespace(summary=lambda: "ok")

    def fake(name, result):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result
        return record

    monkeypatch.setattr(qless.warmup, "warmup_files", fake("warmup", (report, [])))
    monkeypatch.setattr(qless.train, "train_files", fake("train", (report, [])))
    monkeypatch.setattr(qless.ingest, "ingest_files", fake("ingest", (None, report)))
    monkeypatch.setattr(qless.evaluate, "evaluate_files", fake("eval", ([], [])))
    monkeypatch.setattr(gradstore, "compact", lambda *a, **k: None)
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "ckpt").mkdir()
    return seen


def _run(tmp_path, *args):
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(cli, [*args, "-s"])
    assert result.exit_code == 0, result.output


def test_warmup_and_train_defaults_are_the_python_defaults(calls, tmp_path):
    from qless.config import WARMUP_PERCENTAGE

    _run(tmp_path, "warmup", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/w")
    _run(tmp_path, "train", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/t")
    for stage in ("warmup", "train"):
        (_, _, source, config), options = calls[stage]
        python = PYTHON[stage]
        assert (source, config) == (python["source"], python["config"]) == (ModelSource(), WarmupConfig())
        assert (options["lora"], options["read"]) == (python["lora"], python["read"]) == (LoraConfig(), ReadConfig())
    assert calls["warmup"][1]["percentage"] == PYTHON["warmup"]["percentage"] == WARMUP_PERCENTAGE


def test_warmup_options_become_the_configs(calls, tmp_path):
    _run(tmp_path, "warmup", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/w", "--epochs", "2", "--lr", "1e-4",
         "--grad-accum", "8", "--seed", "3", "--lora-r", "8", "--lora-alpha", "32", "--lora-dropout", "0",
         "--model", "{tmp}/m", "--dtype", "fp32", "--max-length", "512", "--chat-format", "template",
         "--skip-invalid", "--percentage", "0.5")
    (data, out, source, config), options = calls["warmup"]
    assert (data, out) == ((f"{tmp_path}/d.jsonl",), f"{tmp_path}/w")
    assert source == ModelSource(f"{tmp_path}/m", "fp32")
    assert config == WarmupConfig(epochs=2, lr=1e-4, grad_accum=8, seed=3)
    assert options == {"lora": LoraConfig(r=8, alpha=32, dropout=0), "percentage": 0.5, "progress": False,
                       "read": ReadConfig(max_length=512, chat_format="template", skip_invalid=True)}


def test_ingest_options_become_the_configs(calls, tmp_path):
    _run(tmp_path, "ingest", "--data", "{tmp}/d.jsonl", "--checkpoint", "{tmp}/ckpt", "--store", "{tmp}/s")
    (_, _, source, config), options = calls["ingest"]
    python = PYTHON["ingest"]
    assert (config, options["read"]) == (python["config"], python["read"]) == (IngestConfig(), ReadConfig())
    assert source == ModelSource()

    _run(tmp_path, "ingest", "--data", "{tmp}/d.jsonl", "--checkpoint", "{tmp}/ckpt", "--store", "{tmp}/s",
         "--encodings", "f32,sign1", "--dim", "64", "--projection", "dense-rademacher", "--seed", "2",
         "--batch-size", "3", "--token-budget", "4096", "--max-length", "128", "--shard", "1/2")
    (_, _, _, config), options = calls["ingest"]
    assert config == IngestConfig(encodings=("f32", "sign1"), dim=64, projection="dense-rademacher", seed=2,
                                  batch_size=3, token_budget=4096)
    assert options["read"] == ReadConfig(max_length=128) and options["shard"] == (1, 2)


def test_eval_options_become_the_configs(calls, tmp_path):
    _run(tmp_path, "eval", "--task", "{tmp}/d.jsonl")
    (_, _, _, config, read), _ = calls["eval"]
    python = PYTHON["eval"]
    assert (config, read) == (python["config"], python["read"]) == (EvalConfig(), ReadConfig())
    _run(tmp_path, "eval", "--task", "{tmp}/d.jsonl", "--k-shot", "0", "--limit", "3", "--subtask", "a",
         "--subtask", "b", "--max-new-tokens", "0", "--chat-format", "template")
    (_, _, _, config, read), _ = calls["eval"]
    assert config == EvalConfig(k_shot=0, max_new_tokens=0, subtasks=("a", "b"), limit=3)
    assert read == ReadConfig(chat_format="template")


@pytest.mark.parametrize(("args", "message"), [
    (["ingest", "--dim", "0"], "Invalid value for '--dim': IngestConfig.dim must be >= 1, got 0"),
    (["ingest", "--token-budget", "0"],
     "Invalid value for '--token-budget': IngestConfig.token_budget must be >= 1, got 0"),
    (["ingest", "--max-length", "0"], "Invalid value for '--max-length': ReadConfig.max_length must be >= 1, got 0"),
    (["warmup", "--lora-r", "0"], "Invalid value for '--lora-r': LoraConfig.r must be >= 1, got 0"),
    (["warmup", "--lr", "0"], "Invalid value for '--lr': WarmupConfig.lr must be > 0, got 0.0"),
    (["warmup", "--percentage", "0"], "Invalid value for '--percentage': 0.0 is not in the range 0<x<=1."),
    (["eval", "--k-shot", "-1"], "Invalid value for '--k-shot': EvalConfig.k_shot must be >= 0, got -1"),
])
def test_a_bad_option_is_a_usage_error_naming_option_and_field(calls, tmp_path, args, message):
    command, *rest = args
    where = {"ingest": ["--data", "{tmp}/d.jsonl", "--checkpoint", "{tmp}/ckpt", "--store", "{tmp}/s"],
             "warmup": ["--data", "{tmp}/d.jsonl", "--out", "{tmp}/w"], "eval": ["--task", "{tmp}/d.jsonl"]}
    result = CliRunner().invoke(cli, [command, *(a.format(tmp=tmp_path) for a in where[command]), *rest])
    assert result.exit_code == 2 and result.output.endswith(f"Error: {message}\n")
    assert calls == {}
