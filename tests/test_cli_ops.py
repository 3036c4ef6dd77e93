"""CLI tests for merge, requantize, compare and check: exact output and exit codes."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gradstore_cli.main import cli

import gradstore
from gradstore.format import block_key
from gradstore.staging import Staging

PROJ = {"kind": "sparse-rademacher", "seed": 0}


def make(path, lo, hi, projection=PROJ):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64)).astype("f4")
    with gradstore.create(path, dim=64, projection=projection) as st:
        st.add_checkpoint("e1", lr=1e-5)
        st.write("train", "e1", x[lo:hi], [f"z{i}" for i in range(lo, hi)], encodings=["f16", "absmax8", "sign1"])
        if lo == 0:
            st.write("mmlu", "e1", rng.standard_normal((4, 64)).astype("f4"), list("abcd"), kind="task",
                     encodings=["f16", "absmax8", "sign1"], subtasks=["x", "x", "y", "z"])
    return str(path)


@pytest.fixture
def shards(tmp_path):
    return make(tmp_path / "a", 0, 25), make(tmp_path / "b", 25, 40)


@pytest.fixture
def merged(tmp_path, shards):
    assert run("merge", *shards, "-o", str(tmp_path / "m"), "-s").exit_code == 0
    return str(tmp_path / "m")


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_merge(tmp_path, shards):
    out = str(tmp_path / "m")
    result = run("merge", *shards, "-o", out, "-s")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == (
        '{"set": "train", "kind": "train", "rows": 40, "written": {"e1": 40},'
        ' "encodings": ["absmax8", "f16", "sign1"]}\n'
        '{"set": "mmlu", "kind": "task", "rows": 4, "written": {"e1": 4},'
        ' "encodings": ["absmax8", "f16", "sign1"]}\n')
    with gradstore.open(out) as st:
        assert st.ids("train") == [f"z{i}" for i in range(40)]
    again = run("merge", *shards, "-o", out)
    assert again.exit_code == 1
    assert again.stderr.endswith(f"Error: {out}: already exists; merge writes a new store\n")


def test_merge_refuses_a_different_projection(tmp_path, shards):
    other = make(tmp_path / "c", 25, 40, projection={"kind": "dense-rademacher", "seed": 0})
    result = run("merge", shards[0], other, "-o", str(tmp_path / "m"), "-s")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: cannot merge: projection differs: {shards[0]} has {PROJ!r},"
        f" {other} has {{'kind': 'dense-rademacher', 'seed': 0}}\n")
    assert not (tmp_path / "m").exists()


def test_requantize_table_and_info_shows_the_scale(merged):
    result = run("requantize", "--store", merged, "--to", "absmax4,absmax8-global", "--set", "train",
                 "--table", "-s")
    assert result.exit_code == 0, result.output
    with gradstore.open(merged) as st:
        s = st.set_info("train")["scales"]["absmax8-global"]["e1"]
    assert result.stdout.splitlines() == [
        "set    encoding        from  rows  replaced  scales",
        "-----  --------------  ----  ----  --------  " + "-" * len(json.dumps({"e1": s})),
        "train  absmax4         f16   40    False",
        f"train  absmax8-global  f16   40    False     {json.dumps({'e1': s})}",
    ]
    info = json.loads(run("info", "--store", merged).stdout)
    assert info["sets"]["train"]["scales"] == {"absmax8-global": {"e1": s}}
    again = run("requantize", "--store", merged, "--to", "absmax4", "--set", "train")
    assert again.exit_code == 1
    assert again.stderr == "Error: set 'train' already holds absmax4; replace it to rebuild it\n"
    assert run("requantize", "--store", merged, "--to", "absmax4", "--replace", "-s").exit_code == 0


def test_requantize_refuses_a_lossy_source(merged):
    result = run("requantize", "--store", merged, "--to", "sign1", "--from", "absmax8")
    assert result.exit_code == 1
    assert result.stderr == ("Error: set 'train': absmax8 is quantized; deriving from it compounds the"
                             " error (allow lossy to do it anyway)\n")


def test_compare_encodings_and_queries(merged):
    same = run("compare", "--store", merged, "-t", "mmlu", "--a", "absmax8", "--b", "absmax8", "--k", "10%")
    assert same.exit_code == 0
    assert same.stdout == ('{"a": "SCORE FROM train BY mmlu ENCODING absmax8", "b": "SCORE FROM train BY'
                           ' mmlu ENCODING absmax8", "rows": 40, "spearman": 1.0, "k": 4, "overlap": 1.0}\n')
    text = run("compare", "--store", merged, "TOP 5 FROM train BY mmlu ENCODING sign1",
               "SCORE FROM train BY mmlu ENCODING absmax8", "--k", "4", "--csv")
    flags = run("compare", "--store", merged, "-t", "mmlu", "--a", "sign1", "--b", "absmax8", "--k", "4", "--csv")
    assert text.exit_code == 0 and text.stdout == flags.stdout
    assert text.stdout.splitlines()[0] == "a,b,rows,spearman,k,overlap"


@pytest.mark.parametrize("args,message", [
    (["--a", "sign1", "--b", "f16"], "Error: give two QUERY strings, or --task with --a and --b\n"),
    (["SCORE FROM train BY mmlu"], "Error: give two QUERY strings, not 1\n"),
    (["A", "B", "-t", "mmlu"], "Error: give either two QUERY strings or --task with --a and --b, not both\n"),
])
def test_compare_usage_errors(merged, args, message):
    result = run("compare", "--store", merged, *args)
    assert result.exit_code == 2 and result.stderr.endswith(message)


def test_check_and_fix(merged):
    result = run("check", "--store", merged)
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith("\rcheck:") and result.stderr.endswith("\rok: 6 blocks verified\n")
    with gradstore.open(merged, readonly=False) as st:
        set_id = st.set_info("train")["id"]

        staging = Staging(st, write=True)

        def corrupt(txn):
            key = block_key(set_id, 0, "sign1", 0)
            value = bytearray(txn.get(key, db=staging.dbs["blocks"]))
            value[20] ^= 1
            txn.put(key, bytes(value), db=staging.dbs["blocks"])

        staging.write(corrupt)
    result = run("check", "--store", merged, "-s")
    assert result.exit_code == 1
    assert result.stdout == "set 'train' checkpoint 'e1' encoding sign1 block 0: block checksum mismatch\n"
    assert result.stderr == ("Error: 1 problem found; `gradstore check --fix` drops what cannot be"
                             " trusted\n")
    fixed = run("check", "--store", merged, "--fix", "-s")
    assert fixed.exit_code == 0
    assert fixed.stdout == (
        "set 'train' checkpoint 'e1' encoding sign1 block 0: block checksum mismatch\n"
        "fixed: set 'train' checkpoint 'e1': rows 0..39 dropped (40 rows; a resumed ingest recomputes them)\n")
    assert fixed.stderr == ""
    assert run("check", "--store", merged, "-s").exit_code == 0


def test_requantize_compacts_the_store_and_compact_says_what_it_did(merged):
    import os
    import re

    data = os.path.join(merged, "data.mdb")
    assert run("requantize", "--store", merged, "--to", "absmax4", "-s").exit_code == 0
    # --replace rewrites absmax4's blocks, leaving their old pages free in the file
    result = run("requantize", "--store", merged, "--to", "absmax4", "--replace")
    assert result.exit_code == 0
    *_, derived, compacted = result.stderr.splitlines()
    before, after = (int(x.replace(",", "")) for x in re.fullmatch(
        rf"compacted {re.escape(merged)}: ([\d,]+) -> ([\d,]+) bytes", compacted).groups())
    assert derived == "derived 2 encodings" and after == os.path.getsize(data) < before
    again = run("compact", "--store", merged)
    assert again.exit_code == 0 and again.stderr == f"{merged}: no free pages\n"
    with gradstore.open(merged) as st:
        assert "absmax4" in st.set_info("train")["encodings"]
        held = run("compact", "--store", merged)
    assert held.exit_code == 1
    assert held.stderr == f"Error: {merged}: this process has the store open; close it before compacting\n"
