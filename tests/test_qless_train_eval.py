"""qless.train and qless.evaluate (`gradstore train` / `gradstore eval`) on tiny random LLaMAs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from gradstore_cli.main import cli
from safetensors.torch import load_file
from test_qless_warmup import _one_thread, tiny_base  # noqa: F401 (_one_thread: autouse)

from qless.config import EvalConfig, ReadConfig
from qless.data import DataError
from qless.evaluate import (
    EvalError,
    EvalExample,
    evaluate,
    exact_match,
    extract_answer,
    load_eval_task,
    score,
    summarize,
)
from qless.model import load_tokenizer
from qless.tasks import TaskDataError

SUBJECT = "toy_subject"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tok):
    """A 2-layer random LLaMA saved with SmolLM2's tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ---- metrics by hand -----------------------------------------------------------------------------


def test_nll_and_accuracy_equal_the_hand_computed_values():
    model = tiny_base()  # vocab 64
    prompt = [1, 17, 33, 40, 9]
    with torch.no_grad():
        last = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    choices = (11, 12, 13, 14)
    best = max(choices, key=lambda c: float(last[c]))
    worst = min(choices, key=lambda c: float(last[c]))
    right = EvalExample("a", "s1", prompt + [best], len(prompt), "x", choices)
    wrong = EvalExample("b", "s1", prompt + [worst], len(prompt), "x", choices)
    answer = [20, 21, 22]
    multi = EvalExample("c", "s2", prompt + answer, len(prompt))

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    by_hand = -sum(float(torch.log_softmax(logits[len(prompt) - 1 + j].float(), -1)[t])
                   for j, t in enumerate(answer)) / len(answer)
    logp_last = torch.log_softmax(last.float(), -1)

    s_right, s_wrong, s_multi = score(model, right), score(model, wrong), score(model, multi)
    assert s_right["correct"] is True and s_wrong["correct"] is False
    assert s_right["nll"] == pytest.approx(-float(logp_last[best]), rel=1e-6)
    assert s_wrong["nll"] == pytest.approx(-float(logp_last[worst]), rel=1e-6)
    assert s_multi["nll"] == pytest.approx(by_hand, rel=1e-6)
    assert s_multi["n_answer_tokens"] == 3 and "correct" not in s_multi

    records = list(evaluate(model, [right, wrong, multi], progress=False))
    assert [r["id"] for r in records] == ["a", "b", "c"]
    rows = summarize(records[:2], "toy")  # one subtask, half right
    assert rows == [
        {"task": "toy", "subtask": "s1", "n": 2, "nll": pytest.approx((s_right["nll"] + s_wrong["nll"]) / 2),
         "accuracy": 0.5},
        {"task": "toy", "subtask": "overall", "n": 2, "nll": pytest.approx((s_right["nll"] + s_wrong["nll"]) / 2),
         "accuracy": 0.5},
    ]


@pytest.mark.parametrize(("generated", "target", "extracted", "match"), [
    ("Let's think step by step.\nA is left of B. So the answer is (A).", "(A)", "(A)", True),
    ("so the answer is (a). Then the answer is (B).", "(A)", "(a)", True),  # the first one, any case
    ("We count 3 + 4 = 7. So the answer is 7.", "7", "7", True),
    ("The answer is  Yes .", "yes", "Yes", True),
    ("not ( True ) is False. So the answer is True.", "False", "True", False),
    ("  False  ", "False", "False", True),  # no "the answer is": the whole text
    ("(B)", "(A)", "(B)", False),
])
def test_bbh_answers_are_extracted_and_matched(generated, target, extracted, match):
    assert extract_answer(generated) == extracted
    assert exact_match(generated, target) is match


# ---- the tasks' examples -------------------------------------------------------------------------


def _mmlu_dir(root, n_test=3, other_subject=True):
    for split, n in (("dev", 5), ("test", n_test)):
        folder = root / "eval" / "mmlu" / split
        folder.mkdir(parents=True, exist_ok=True)
        subjects = [SUBJECT, "zz_other"] if other_subject else [SUBJECT]
        for subject in subjects:
            with open(folder / f"{subject}_{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                for i in range(n):
                    writer.writerow([f"{split} {subject} question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]])
    return root


def test_mmlu_is_the_test_split_with_k_dev_shots(tmp_path, tok):
    data = _mmlu_dir(tmp_path)
    examples, skipped = load_eval_task("mmlu", tok, data, EvalConfig(k_shot=2))
    assert not skipped
    # Round robin over the sorted subjects; test questions only, never dev ones.
    assert [e.id for e in examples] == ["mmlu/toy_subject/0", "mmlu/zz_other/0", "mmlu/toy_subject/1",
                                       "mmlu/zz_other/1", "mmlu/toy_subject/2", "mmlu/zz_other/2"]
    first = examples[0]
    query = ("<|user|>\nThe following are multiple choice questions (with answers) about  toy subject.\n\n"
             "dev toy_subject question 0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
             "dev toy_subject question 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
             "test toy_subject question 0?\nA. w\nB. x\nC. y\nD. z\nAnswer:\n<|assistant|>\nThe answer is:")
    assert first.input_ids[:first.n_prompt] == tok(query)["input_ids"]
    assert first.input_ids == tok(query + " A")["input_ids"]
    assert first.choices == tuple(tok.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD")
    assert first.input_ids[first.n_prompt] == first.choices[0]  # the answer is A
    assert examples[2].input_ids[examples[2].n_prompt] == first.choices[1]  # test question 1: B
    assert first.meta == {"k_shot": 2}

    limited, _ = load_eval_task("mmlu", tok, data, EvalConfig(k_shot=2, limit=3, subtasks=[SUBJECT]))
    assert [e.id for e in limited] == ["mmlu/toy_subject/0", "mmlu/toy_subject/1", "mmlu/toy_subject/2"]
    # Fewer shots when the prompt does not fit (open-instruct); none at all: left out and listed.
    zero_len, one_len = (len(load_eval_task("mmlu", tok, data, EvalConfig(k_shot=k, limit=1))[0][0].input_ids)
                         for k in (0, 1))
    five = EvalConfig(k_shot=5, limit=1)
    fit, _ = load_eval_task("mmlu", tok, data, five, ReadConfig(max_length=one_len))
    assert fit[0].meta == {"k_shot": 1}
    none, skipped = load_eval_task("mmlu", tok, data, five, ReadConfig(max_length=zero_len - 1))
    assert none == [] and skipped[0].endswith(f"longer than max_length {zero_len - 1} tokens")
    assert "toy_subject_test.csv:1" in skipped[0]

    with pytest.raises(EvalError, match="no subtask nope"):
        load_eval_task("mmlu", tok, data, EvalConfig(subtasks=["nope"]))
    with pytest.raises(TaskDataError, match="eval/mmlu/test"):
        load_eval_task("mmlu", tok, tmp_path / "missing")
    with pytest.raises(EvalError, match="tydiqa has no held-out split"):
        load_eval_task("tydiqa", tok, data)


def test_bbh_uses_the_cot_prompt_and_leaves_out_its_shots(tmp_path, tok):
    root = tmp_path / "eval" / "bbh"
    (root / "bbh").mkdir(parents=True)
    shots = [f"Q: is {i} even?\nA: Let's think step by step. So the answer is {'Yes' if i % 2 == 0 else 'No'}."
             for i in (2, 3, 4)]
    prompt = "Answer about numbers.\n\n" + "\n\n".join(shots)
    (root / "bbh-three-shot.json").write_text(json.dumps({"parity": prompt}))
    inputs = ["is 3 even?", "is 7 even?", "is 8 even?"]  # "is 3 even?" is a shot
    (root / "bbh" / "parity.json").write_text(json.dumps(
        {"examples": [{"input": q, "target": "No" if q != "is 8 even?" else "Yes"} for q in inputs]}))
    examples, skipped = load_eval_task("bbh", tok, tmp_path)
    assert not skipped
    assert [e.id for e in examples] == ["bbh/parity/1", "bbh/parity/2"]
    query = "<|user|>\n" + prompt + "\n\nQ: is 7 even?\n<|assistant|>\nA:"
    assert examples[0].input_ids == tok(query + " No")["input_ids"]
    assert examples[0].input_ids[:examples[0].n_prompt] == tok(query)["input_ids"]
    assert examples[0].target == "No" and examples[0].choices == ()


def test_jsonl_task_and_its_bad_lines(tmp_path, tok):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"prompt": "Two plus two?", "answer": "4", "subtask": "math"}) + "\n\n"
                    + json.dumps({"prompt": "Sky color?", "answer": "blue", "id": "sky"}) + "\n")
    examples, _ = load_eval_task(str(good), tok)
    assert [(e.subtask, e.target) for e in examples] == [("math", "4"), ("qa", "blue")]
    assert examples[1].id == "sky"
    assert examples[0].input_ids == tok("<|user|>\nTwo plus two?\n<|assistant|>\n4")["input_ids"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: expected a string 'prompt' and a non-empty string 'answer'$"):
        load_eval_task(str(bad), tok)
    kept, skipped = load_eval_task(str(bad), tok, read=ReadConfig(skip_invalid=True))
    assert len(kept) == 1 and skipped == [f"{bad}:2: expected a string 'prompt' and a non-empty string 'answer'"]
    result = CliRunner().invoke(cli, ["eval", "--task", str(bad), "-s"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {bad}:2: expected a string 'prompt' and a non-empty string 'answer'"]


# ---- train and eval through the CLI --------------------------------------------------------------

RECORDS = [{"messages": [{"role": "user", "content": f"Name three colors, list {i}."},
                         {"role": "assistant", "content": "red green blue red green blue"}]} for i in range(6)]


def _write_data(tmp_path):
    train = tmp_path / "selected.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    task = tmp_path / "same.jsonl"  # the training examples as an eval task: prompt and answer
    task.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"], "answer": r["messages"][1]["content"]})
                            + "\n" for r in RECORDS))
    return train, task


TRAIN_ARGS = ["--epochs", "3", "--lr", "2e-2", "--lora-r", "4", "--lora-alpha", "16", "--lora-dropout", "0.1",
              "--grad-accum", "2", "--dtype", "fp32", "-s"]


def test_train_then_eval_lowers_the_nll_of_the_training_data(tiny_model, tmp_path):
    train, task = _write_data(tmp_path)
    run = CliRunner().invoke
    result = run(cli, ["train", "--data", str(train), "--out", str(tmp_path / "run"), "--model", tiny_model,
                       *TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
    info = json.loads((tmp_path / "run" / "epoch-3" / "qless_checkpoint.json").read_text())
    assert info["n_examples"] == 6 and info["step"] == 9  # every example, 3 steps of 2 an epoch

    def nll(*extra):
        out = run(cli, ["eval", "--task", str(task), "--model", tiny_model, "--dtype", "fp32", "--max-new-tokens",
                        "0", "-s", *extra])
        assert out.exit_code == 0, out.output
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["subtask"], r["n"]) for r in rows] == [("same", 6), ("overall", 6)]
        return rows[-1]["nll"]

    base, trained = nll(), nll("--adapter", str(tmp_path / "run"))
    assert trained < 0.8 * base
    assert nll("--adapter", str(tmp_path / "run" / "epoch-3")) == trained  # a run stands for its last epoch
    assert base > nll("--adapter", str(tmp_path / "run" / "epoch-1")) > trained

    out = run(cli, ["eval", "--task", str(task), "--model", tiny_model, "--dtype", "fp32", "--max-new-tokens", "3",
                    "--limit", "2", "--table", "--predictions", str(tmp_path / "p.jsonl"), "-s"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["task", "subtask", "n", "nll", "exact_match"] and lines[-1].split()[1:3] == ["overall", "2"]
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 2
    assert all(p["exact_match"] == exact_match(p["prediction"], "red green blue red green blue") for p in preds)


def test_train_resumes_after_an_interruption(tiny_model, tmp_path, monkeypatch):
    import qless.warmup as W

    train, _ = _write_data(tmp_path)
    run = CliRunner().invoke
    args = ["train", "--data", str(train), "--model", tiny_model, *TRAIN_ARGS]
    assert run(cli, [*args, "--out", str(tmp_path / "ref")]).exit_code == 0

    real, calls = W.save_optimizer_state, []

    def dies_on_second(directory, model, optimizer):
        calls.append(directory)
        if len(calls) == 2:  # epoch 2's adapter is already in its temp folder
            raise KeyboardInterrupt
        return real(directory, model, optimizer)

    monkeypatch.setattr(W, "save_optimizer_state", dies_on_second)
    out = tmp_path / "run"
    assert run(cli, [*args, "--out", str(out)]).exit_code == 1  # click: Aborted!
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1"]
    monkeypatch.setattr(W, "save_optimizer_state", real)
    assert run(cli, [*args, "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
    ref = load_file(str(tmp_path / "ref" / "epoch-3" / "adapter_model.safetensors"))
    got = load_file(str(out / "epoch-3" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    other = run(cli, [*args[:-len(TRAIN_ARGS)], *TRAIN_ARGS[:1], "4", *TRAIN_ARGS[2:], "--out", str(out)])
    assert other.exit_code == 1 and "holds a different training run" in other.output


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--epochs", "0"],
     "Invalid value for '--epochs': WarmupConfig.epochs must be >= 1, got 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--lora-dropout", "1"],
     "Invalid value for '--lora-dropout': LoraConfig.dropout must be in [0, 1), got 1.0"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "Invalid value for '--lr'"),
    (["eval", "--task", "mmlu"], "--task mmlu needs --data-dir"),
    (["eval", "--task", "{data}", "--limit", "0"], "Invalid value for '--limit': EvalConfig.limit must be >= 1, got 0"),
    (["eval", "--task", "{data}", "--max-new-tokens", "-1"], "Invalid value for '--max-new-tokens'"),
    (["eval", "--task", "{data}", "--adapter", "{tmp}/none"], "Invalid value for '--adapter'"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    args = [a.format(data=data, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_eval_refuses_unknown_tasks_and_adapterless_folders(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--task", "tydiqa", "-s"])
    assert result.exit_code == 1 and "tydiqa has no held-out split" in result.output
    result = CliRunner().invoke(cli, ["eval", "--task", "nope", "-s"])
    assert result.exit_code == 1 and "unknown task 'nope'" in result.output
    from qless.train import final_adapter

    with pytest.raises(FileNotFoundError, match="no adapter_config.json and no finished epoch-N checkpoint"):
        final_adapter(tmp_path)
