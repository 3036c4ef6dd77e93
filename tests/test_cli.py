"""CLI tests: exact messages and exit codes (CliRunner), every command documented."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gradstore_cli.main import cli

import gradstore


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "st"
    rng = np.random.default_rng(0)
    with gradstore.create(path, dim=64) as st:
        st.add_checkpoint("e1", lr=1e-5)
        st.write("train", "e1", rng.standard_normal((40, 64)).astype("f4"), [f"z{i}" for i in range(40)],
                 encodings=["f16", "absmax8", "sign1"],
                 metadata=[{"source": "dolly" if i % 2 else "flan", "category": "qa"} for i in range(40)])
        st.write("mmlu", "e1", rng.standard_normal((4, 64)).astype("f4"), list("abcd"), kind="task",
                 encodings=["f16", "absmax8", "sign1"], subtasks=["x", "x", "y", "z"])
    return str(path)


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_every_command_has_help_with_an_example():
    for name, command in cli.commands.items():
        result = run(name, "-h")
        assert result.exit_code == 0, name
        assert "Example:" in result.output, f"`gradstore {name}` has no Example: block"


def test_query_flags_form_matches_the_query_string_form(store_path):
    flags = run("query", "--store", store_path, "--task", "mmlu", "--k", "5%")
    text = run("query", "--store", store_path, "TOP 5% FROM train BY mmlu")
    assert flags.exit_code == 0 and text.exit_code == 0
    assert flags.stdout == text.stdout
    rows = [json.loads(line) for line in flags.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2]  # floor(40 * 5%) = 2
    with gradstore.open(store_path) as st:
        assert [r["id"] for r in rows] == st.query("TOP 2 FROM train BY mmlu").ids


def test_store_comes_from_the_environment(store_path):
    result = run("query", "--task", "mmlu", "--k", "3", "--csv", env={"GRADSTORE_PATH": store_path})
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "rank,id,score,row,category,source,subtask"
    assert len(result.stdout.splitlines()) == 4


def test_where_and_table(store_path):
    result = run("query", "--store", store_path, "-t", "mmlu", "--k", "3", "--where", "source = 'dolly'", "--table")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "source", "category", "subtask"]
    assert all(line.split()[3] == "dolly" for line in lines[2:]) and len(lines) == 5


def test_explain_prints_the_plan(store_path):
    result = run("query", "--store", store_path, "-t", "mmlu", "--encoding", "sign1", "--explain")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:3] == [
        "QUERY      EXPLAIN TOP 5% FROM train BY mmlu ENCODING sign1",
        "SCAN       train: 40 rows in blocks, top 2 by a bounded heap",
        "ENCODING   sign1 (symmetric)",
    ]


def test_rerank_flags_compile_to_the_clause(store_path):
    result = run("query", "--store", store_path, "-t", "mmlu", "--k", "2", "--rerank", "f16",
                 "--oversample", "3", "--explain")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "QUERY      EXPLAIN TOP 2 FROM train BY mmlu RERANK f16 OVERSAMPLE 3"
    assert lines[1] == "SCAN       train: 40 rows in blocks, a shortlist of 6 (3 x k) by a bounded heap"
    assert "ENCODING   f16 (asymmetric)" in lines


@pytest.mark.parametrize("args,code,message", [
    (["query", "-t", "mmlu", "--oversample", "2"], 2,
     "Error: --oversample sizes the shortlist of --rerank; give --rerank too\n"),
    (["query", "-t", "bbh"], 1, "Error: unknown task 'bbh'; the store has: mmlu\n"),
    (["query", "TOP 5 FROM train BY"], 1, "Error: column 20: expected a task name after BY, found end of query\n"),
    # a bad option value is a usage error naming the option and what it takes (issue 14)
    (["query", "-t", "mmlu", "--encoding", "absmax3"], 2,
     ("Error: Invalid value for '--encoding': unknown encoding 'absmax3': expected one of f32, f16, absmax8,"
     " absmax4, absmax2, absmean8, absmean4, absmean2, sign1 (quantized ones may add -global and/or"
     " -centered)\n")),
    (["query", "-t", "mmlu", "--rerank", "f8"], 2,
     "Error: Invalid value for '--rerank': unknown encoding 'f8': expected one of f32, f16, absmax8, absmax4,"
     " absmax2, absmean8, absmean4, absmean2, sign1 (quantized ones may add -global and/or -centered)\n"),
    (["query", "-t", "mmlu", "--k", "5%x"], 2,
     ("Error: Invalid value for '--k': expected a positive count (such as 100) or a percentage greater"
     " than 0 and at most 100 (such as 5%), not '5%x'\n")),
    (["query", "-t", "mmlu", "--k", "150%"], 2,
     ("Error: Invalid value for '--k': expected a positive count (such as 100) or a percentage greater"
     " than 0 and at most 100 (such as 5%), not '150%'\n")),
    (["query", "-t", "mmlu", "--where", "source = "], 2,
     ("Error: Invalid value for '--where': column 9: expected a value ('string', number, TRUE, FALSE or"
     " NULL) after =, found end of query\n")),
    (["query", "-t", "mmlu", "--checkpoints", "e1,"], 2,
     "Error: Invalid value for '--checkpoints': expected comma-separated names, not 'e1,'\n"),
    (["query", "-t", " "], 2, "Error: Invalid value for '--task' / '-t': expected a name, not an empty string\n"),
    (["compare", "-t", "mmlu", "--a", "f16", "--b", "sign1", "--k", "0"], 2,
     ("Error: Invalid value for '--k': expected a positive count (such as 100) or a percentage greater"
     " than 0 and at most 100 (such as 5%), not '0'\n")),
    (["requantize", "--to", "absmax4,sign9"], 2,
     ("Error: Invalid value for '--to': unknown encoding 'sign9': expected one of f32, f16, absmax8,"
     " absmax4, absmax2, absmean8, absmean4, absmean2, sign1 (quantized ones may add -global and/or"
     " -centered)\n")),
    (["query"], 2, "Error: give a QUERY string or at least one --task\n"),
    (["query", "TOP 5 FROM train BY mmlu", "-t", "mmlu"], 2,
     "Error: give either a QUERY string or --task and other flags, not both\n"),
])
def test_errors_are_one_line_with_exit_codes(store_path, args, code, message):
    result = run(*args, "--store", store_path)
    assert result.exit_code == code
    assert result.stderr.endswith(message)


@pytest.mark.parametrize("args,message", [
    (["--lr", "2e-5,x"], ("Error: Invalid value for '--lr': expected comma-separated numbers such as"
                         " 2e-5,1e-5, not '2e-5,x'\n")),
    (["--shard", "3"], "Error: Invalid value for '--shard': --shard must look like i/n (e.g. 0/4), got '3'\n"),
    (["--encodings", "f16,absmean3"], ("Error: Invalid value for '--encodings': unknown encoding 'absmean3':"
     " expected one of f32, f16, absmax8, absmax4, absmax2, absmean8, absmean4, absmean2, sign1"
     " (quantized ones may add -global and/or -centered)\n")),
])
def test_ingest_option_values_are_checked_before_any_work(tmp_path, args, message):
    result = run("ingest", "--data", __file__, "--checkpoint", str(tmp_path), *args,
                 "--store", str(tmp_path / "st"))
    assert result.exit_code == 2 and result.stderr.endswith(message)
    assert not (tmp_path / "st").exists()


def test_all_zero_learning_rates_weight_uniformly_with_a_note(tmp_path):
    # A warmup of one optimizer step records lr 0 (the schedule's first step) for its only
    # checkpoint; the query must still run, and with one checkpoint the weights cannot matter.
    path = str(tmp_path / "st")
    rng = np.random.default_rng(1)
    with gradstore.create(path, dim=64) as st:
        st.add_checkpoint("epoch-1", lr=0.0)
        st.write("train", "epoch-1", rng.standard_normal((20, 64)).astype("f4"),
                 [f"z{i}" for i in range(20)], encodings=["f16"])
        st.write("mmlu", "epoch-1", rng.standard_normal((3, 64)).astype("f4"), list("abc"), kind="task",
                 encodings=["f16"], subtasks=["x", "x", "y"])
    result = run("query", "--store", path, "-t", "mmlu", "--k", "4")
    assert result.exit_code == 0
    assert result.stderr == ("WEIGHT lr: the learning rates of epoch-1 sum to 0; weighting uniformly\n"
                             "4 rows selected by: TOP 4 FROM train BY mmlu\n")
    uniform = run("query", "--store", path, "-t", "mmlu", "--k", "4", "--weight", "uniform")
    assert uniform.stderr == "4 rows selected by: TOP 4 FROM train BY mmlu WEIGHT uniform\n"
    assert result.stdout == uniform.stdout and len(result.stdout.splitlines()) == 4
    explain = run("query", "--store", path, "-t", "mmlu", "--explain")
    assert "WEIGHTS    lr: epoch-1=1\n" in explain.stdout
    assert explain.stdout.endswith("NOTE       WEIGHT lr: the learning rates of epoch-1 sum to 0;"
                                   " weighting uniformly\n")


def test_missing_store(tmp_path):
    result = run("info", "--store", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'nope'}: not a gradstore store (no data.mdb)\n"


def test_info(store_path):
    result = run("info", "--store", store_path)
    summary = json.loads(result.stdout)
    assert summary["dim"] == 64 and [c["name"] for c in summary["checkpoints"]] == ["e1"]
    assert summary["sets"]["mmlu"]["subtasks"] == 3 and summary["sets"]["train"]["rows"] == 40
    sign1 = summary["sets"]["train"]["encodings"]["sign1"]
    assert 40 * 8 <= sign1 <= 40 * 8 + 40 * 8 + 64  # packed bits + scale/norm + header


def test_plot_writes_a_png_with_the_selection_shares(store_path, tmp_path):
    out = tmp_path / "p.png"
    result = run("plot", "--store", store_path, "-t", "mmlu", "--k", "10", "--by", "source", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from gradstore_cli.plot import plot_selection

    with gradstore.open(store_path) as st:
        numbers = plot_selection(st, tmp_path / "q.png", ["mmlu"], ["f16", "sign1"], k="10", field="source")
        top = st.query("TOP 10 FROM train BY mmlu ENCODING f16")
    assert numbers["pool_share"] == {"dolly": 0.5, "flan": 0.5}
    dolly = sum(r["source"] == "dolly" for r in top.records) / 10
    assert numbers["selection_share"]["dolly"] == pytest.approx(dolly)
