"""Reliability: SIGKILLed writers, merges and requantizes; concurrent readers and writers;
hostile input; a full disk. Nothing committed may be lost, nothing half-made may look whole.

The child processes run tests/crash_writer.py, whose data are a pure function of a seed, so
the parent checks every row against the same generator. (The query parser's fuzzing lives in
test_query_parser.py.)
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import crash_writer as cw
import lmdb
import numpy as np
import pytest

import gradstore
from gradstore import InvalidVectorError, StoreNotFoundError, ops, quant
from gradstore.errors import GradstoreError
from gradstore.staging import Staging

WRITER = Path(__file__).with_name("crash_writer.py")
SEED = 7


class Child:
    """A crash_writer.py process whose stdout lines are collected as they come."""

    def __init__(self, tmp_path: Path, *args):
        self.err = open(tmp_path / f"child-{time.monotonic_ns()}.err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, str(WRITER), *map(str, args)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.lines: list[list[str]] = []
        self.cond = threading.Condition()
        self.eof = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # torn by the kill: not a report
            with self.cond:
                self.lines.append(line.split())
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def count(self, word: str) -> int:
        return sum(1 for line in self.lines if line and line[0] == word)

    def wait_for(self, word: str, n: int = 1, timeout: float = 60) -> bool:
        """Until `n` lines starting with `word` came (True) or the child closed stdout (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.count(word) >= n or self.eof, timeout) and \
                self.count(word) >= n

    def kill(self) -> int:
        self.proc.kill()  # SIGKILL: no cleanup, no atexit, no finally
        return self._end(60)

    def finish(self, timeout: float = 120) -> int:
        return self._end(timeout)

    def _end(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.thread.join(timeout)
        self.err.seek(0)
        self.stderr = self.err.read()
        self.err.close()
        return rc


def digest(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


def new_store(path: Path, ckpts=cw.CKPTS) -> Path:
    with gradstore.create(path, dim=cw.DIM, projection={"kind": "sparse-rademacher", "seed": 0},
                          map_size=cw.TINY_MAP, block_bytes=200) as st:
        for c, lr in ckpts:
            st.add_checkpoint(c, lr=lr)
    return path


# ---- a writer SIGKILLed 20 times, then resumed ------------------------------------------

N_ROWS = 4000
KILLS = 20


def verify_whole_batches(path: Path, xs, want, bounds, reported) -> int:
    """Every row present is whole and in order, check passes; returns rows reported but missing."""
    with gradstore.open(path) as st:
        report = ops.check(st)
        assert report.ok, report.findings
        if "train" not in st.sets():
            return sum(reported.values())
        info = st.set_info("train")
        n = info["n_rows"]
        assert st.ids("train") == cw.row_ids(0, n)  # a prefix: none duplicated, none skipped
        assert [r["n"] for r in st.rows("train")] == list(range(n))
        assert n == max(info["written"].values())  # each batch goes to e1 first
        lost = 0
        for i, (c, _) in enumerate(cw.CKPTS):
            w = info["written"].get(c, 0)
            assert w in bounds, f"{c}: {w} rows written is not a batch boundary"
            lost += max(0, reported[c] - w)
            np.testing.assert_allclose(st.vectors("train", c, "f32"), xs[i][:w], rtol=1e-6, atol=1e-7)
            for enc in cw.ENCODINGS:  # exactly the generator's rows quantized, at every encoding
                got = st.read("train", c, enc)
                np.testing.assert_array_equal(got.payload, want[enc][i].payload[:w])
                np.testing.assert_array_equal(got.scale, want[enc][i].scale[:w])
    return lost


def test_writer_killed_20_times_loses_no_committed_row_and_resumes(tmp_path):
    path = new_store(tmp_path / "s")
    xs = [cw.vectors(SEED, N_ROWS, i) for i in range(len(cw.CKPTS))]
    want = {enc: [quant.quantize(x, enc) for x in xs] for enc in cw.ENCODINGS}
    bounds = {0} | {hi for _, hi in cw.batches(SEED, N_ROWS)}
    rng = np.random.default_rng(20240601)
    reported = {c: 0 for c, _ in cw.CKPTS}
    written = dict(reported)
    kills = lost = unreported = commits = 0
    maps = set()
    while kills < KILLS:
        child = Child(tmp_path, "write", path, SEED, N_ROWS)
        assert child.wait_for("READY"), child.finish()
        # a random number of commits, then a random moment (mid-quantize, mid-put, mid-commit)
        child.wait_for("COMMIT", int(rng.integers(0, 25)))
        time.sleep(rng.uniform(0, 0.004))
        rc = child.kill()
        assert rc == -9, f"the writer ended by itself ({rc}) before kill {kills + 1}: {child.stderr}"
        kills += 1
        for word, *rest in child.lines:
            if word == "COMMIT":
                commits += 1
                reported[rest[0]] = max(reported[rest[0]], int(rest[2]))
            elif word == "MAP":
                maps.add(int(rest[0]))
        lost += verify_whole_batches(path, xs, want, bounds, reported)
        with gradstore.open(path) as st:  # killed between a commit and the line reporting it
            now = st.set_info("train")["written"] if "train" in st.sets() else {}
            unreported += any(now.get(c, 0) > max(written[c], reported[c]) for c in written)
            written.update(now)
    assert lost == 0
    child = Child(tmp_path, "write", path, SEED, N_ROWS)
    assert child.finish() == 0, child.stderr
    assert child.lines[-1] == ["DONE"]
    assert verify_whole_batches(path, xs, want, bounds, {c: N_ROWS for c, _ in cw.CKPTS}) == 0
    with gradstore.open(path) as st:
        assert st.set_info("train")["written"] == {c: N_ROWS for c, _ in cw.CKPTS}
        assert len(set(st.ids("train"))) == N_ROWS
    assert len(maps) >= 3 and max(maps) >= 16 * cw.TINY_MAP  # the map grew, kills and all
    print(f"\n{kills} kills survived after {commits} reported commits; rows lost: {lost};"
          f" {unreported} kills fell between a commit and its report; the map grew to {max(maps)}")


def test_a_killed_create_is_not_left_half_made(tmp_path):
    """create() killed before its first commit must not leave a directory that blocks a retry."""
    rng = np.random.default_rng(3)
    code = ("import gradstore, sys; print('GO', flush=True);"
            " gradstore.create(sys.argv[1], dim=8).close(); print('DONE', flush=True)")
    for trial in range(3):
        path = tmp_path / f"c{trial}"
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "GO"
        time.sleep(rng.uniform(0, 0.003))
        proc.kill()
        proc.wait()
        try:
            gradstore.open(path).close()  # it finished: a whole store
        except StoreNotFoundError:
            gradstore.create(path, dim=8).close()  # else a retry must work
        with gradstore.open(path) as st:
            assert st.dim == 8 and ops.check(st).ok


# ---- merge and requantize SIGKILLed mid-way -------------------------------------------------

def build_shards(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    x = [cw.vectors(SEED, 1200, i) for i in range(len(cw.CKPTS))]
    paths = []
    for name, lo, hi in (("a", 0, 600), ("b", 600, 1200)):
        path = new_store(tmp_path / name)
        with gradstore.open(path, readonly=False) as st:
            for i, (c, _) in enumerate(cw.CKPTS):
                for b in range(lo, hi, 150):
                    st.write("train", c, x[i][b:b + 150], cw.row_ids(b, b + 150),
                             encodings=("f32", "absmax8", "sign1"))
        paths.append(path)
    return paths[0], paths[1], x


def test_merge_killed_midway_leaves_sources_byte_identical_and_no_output(tmp_path):
    a, b, x = build_shards(tmp_path)
    before = digest(a), digest(b)
    out = tmp_path / "m"
    rng = np.random.default_rng(11)
    killed_mid = 0
    for _ in range(4):
        child = Child(tmp_path, "merge", out, a, b)
        assert child.wait_for("READY"), child.finish()
        assert child.wait_for("PROGRESS", int(rng.integers(1, 60))), child.finish()
        assert child.kill() == -9
        killed_mid += 1
        assert (digest(a), digest(b)) == before  # sources byte for byte
        assert not out.exists()  # nothing at out, so nothing half-made looks complete
        with pytest.raises(StoreNotFoundError):
            gradstore.open(out)
    leftovers = list(tmp_path.glob(".m.*.merging"))  # the killed runs' temporaries, apart from out
    ops.merge([a, b], out)
    assert (digest(a), digest(b)) == before
    with gradstore.open(out) as m:
        assert ops.check(m).ok
        assert m.ids("train") == cw.row_ids(0, 1200)
        for i, (c, _) in enumerate(cw.CKPTS):
            np.testing.assert_allclose(m.vectors("train", c, "f32"), x[i], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(m.read("train", c, "sign1").payload,
                                          quant.quantize(x[i], "sign1").payload)
    print(f"\nmerge: {killed_mid} kills mid-way, sources untouched, {len(leftovers)} temporaries left"
          " beside out (never at out)")


def snapshot(st) -> dict:
    """Everything a reader can see of the store's records and rows."""
    out = {"sets": Staging(st).set_records(), "ckpts": st.checkpoints(), "rows": st.rows("train")}
    for c in st.checkpoint_names():
        for enc in st.set_info("train")["encodings"]:
            r = st.read("train", c, enc)
            out[c, enc] = hashlib.sha256(r.payload.tobytes() + r.scale.tobytes() + r.norm.tobytes()).hexdigest()
    return out


def test_requantize_killed_midway_leaves_the_store_as_it_was(tmp_path):
    a, _, x = build_shards(tmp_path)
    targets = ("absmax4", "absmean2-global")
    with gradstore.open(a) as st:
        before = snapshot(st)
    rng = np.random.default_rng(12)
    kills = 0
    for _ in range(3):
        child = Child(tmp_path, "requantize", a, *targets)
        assert child.wait_for("READY"), child.finish()
        assert child.wait_for("PROGRESS", int(rng.integers(1, 40))), child.finish()
        assert child.kill() == -9
        kills += 1
        with gradstore.open(a) as st:
            assert snapshot(st) == before  # no new encoding visible, every row as it was
            report = ops.check(st)
            # only the staged blocks of the killed run, which nothing points at (a re-run or
            # check --fix removes them)
            assert all("orphan blocks" in f.problem for f in report.findings), report.findings
    with gradstore.open(a, readonly=False) as st:
        done = ops.requantize(st, "train", to=targets)
        assert [d["encoding"] for d in done] == list(targets)
        assert ops.check(st).ok  # the re-run overwrote or cleared every staged block
        for i, (c, _) in enumerate(cw.CKPTS):
            np.testing.assert_array_equal(st.read("train", c, "absmax4").payload,
                                          quant.quantize(x[i][:600], "absmax4").payload)
    print(f"\nrequantize: {kills} kills mid-way, store unchanged each time, re-run ok")


# ---- concurrency ------------------------------------------------------------------------

def test_queries_see_one_committed_snapshot_while_a_writer_appends(tmp_path):
    n = 1500
    path = new_store(tmp_path / "s")
    rng = np.random.default_rng(5)
    v = [rng.standard_normal((5, cw.DIM)).astype(np.float32) for _ in cw.CKPTS]
    with gradstore.open(path, readonly=False) as st:
        for i, (c, _) in enumerate(cw.CKPTS):
            st.write("mmlu", c, v[i], list("abcde"), kind="task", encodings=("f32",), subtasks=["s"] * 5)
    xs = [cw.vectors(SEED, n, i).astype(np.float64) for i in range(len(cw.CKPTS))]
    lr = np.array([lr for _, lr in cw.CKPTS])
    cos = [((x / np.linalg.norm(x, axis=1)[:, None])
            @ (vv / np.linalg.norm(vv, axis=1)[:, None]).T.astype(np.float64)).mean(axis=1)
           for x, vv in zip(xs, v)]
    # DESIGN's score at the checkpoints the snapshot holds (the default: those with rows)
    ref = {("e1",): cos[0], ("e1", "e2"): (lr[0] * cos[0] + lr[1] * cos[1]) / lr.sum()}
    bounds = {0} | {hi for _, hi in cw.batches(SEED, n)}
    # a long-lived reader with a small map: the writer grows the map under it
    reader = gradstore.open(path, map_size=cw.TINY_MAP)
    child = Child(tmp_path, "write", path, SEED, n)
    assert child.wait_for("COMMIT"), child.finish()  # the train set exists
    seen = []
    try:
        while child.proc.poll() is None or not seen:
            r = reader.query("SCORE FROM train BY mmlu ENCODING f32")
            seen.append((r.plan.n_rows, r.ids, r.scores, r.plan.checkpoints))
        assert child.finish() == 0, child.stderr
        final = reader.query("SCORE FROM train BY mmlu ENCODING f32")
    finally:
        reader.close()
    assert final.plan.n_rows == n
    for rows, got_ids, scores, ckpts in seen:
        assert rows in bounds  # a committed batch boundary, never half a batch
        assert got_ids == cw.row_ids(0, rows)
        np.testing.assert_allclose(scores, ref[ckpts][:rows], rtol=2e-5, atol=2e-6)
        if ckpts == final.plan.checkpoints:
            np.testing.assert_array_equal(scores, final.scores[:rows])  # recomputed at that size
    sizes = {rows for rows, *_ in seen}
    assert len(sizes) >= 3, sizes  # queries really ran while rows arrived
    print(f"\n{len(seen)} queries during the write saw {len(sizes)} distinct snapshots, each whole")


def _worker_ids(path: str):
    with gradstore.open(path) as st:
        return st.readonly, st.ids("train")


def test_two_writer_processes_and_spawned_readers(tmp_path):
    path = new_store(tmp_path / "s", ckpts=(("e1", 1e-5),))
    k = 25
    children = {tag: Child(tmp_path, "append", path, tag, seed, k) for tag, seed in (("p", 1), ("q", 2))}
    for child in children.values():
        assert child.wait_for("READY"), child.finish()
    for child in children.values():  # go: both contend for the write lock and both grow the map
        child.proc.stdin.write("go\n")
        child.proc.stdin.flush()
    for tag, child in children.items():
        assert child.finish() == 0, f"writer {tag}: {child.stderr}"
    with gradstore.open(path) as st:
        assert ops.check(st).ok
        ids = st.ids("train")
        where = {row_id: i for i, row_id in enumerate(ids)}
        assert len(where) == len(ids)
        x = st.vectors("train", "e1", "f32")
        switches = sum(a[0] != b[0] for a, b in itertools.pairwise(ids))
        for tag, seed in (("p", 1), ("q", 2)):
            committed = [(int(lo), int(hi)) for word, lo, hi in
                         (line for line in children[tag].lines if line[0] == "COMMIT")]
            assert len(committed) == k
            want = cw.vectors(seed, committed[-1][1])
            for lo, hi in committed:  # every batch present, whole and contiguous
                rows = [where[i] for i in cw.row_ids(lo, hi, tag)]
                assert rows == list(range(rows[0], rows[0] + hi - lo))
                np.testing.assert_allclose(x[rows], want[lo:hi], rtol=1e-6, atol=1e-7)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        for readonly, got in pool.map(_worker_ids, [str(path)] * 2):
            assert readonly and got == ids
    print(f"\ntwo writers: {len(ids)} rows, {2 * k} batches all present, {switches} switches between writers")


# ---- hostile and bad input ----------------------------------------------------------------

class CharTokenizer:
    """One token per character; enough for qless.data's reader (tulu format)."""

    eos_token = "</s>"
    chat_template = None

    def __call__(self, text, max_length=None, truncation=False, add_special_tokens=True):
        text = text[:max_length] if truncation and max_length else text
        return {"input_ids": [ord(ch) for ch in text]}


def test_malformed_jsonl_names_file_and_line_or_is_skipped(tmp_path):
    from qless.data import DataError, read_pool

    good = json.dumps({"prompt": "Q: 1+1?", "completion": "2"}).encode()
    bad = {
        2: (b'{"prompt": "x", "completion": ', "invalid JSON"),
        3: (b'{"prompt": "caf\xe9", "completion": "y"}', "not valid UTF-8"),
        4: (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "  "}]}).encode(), "empty response"),
        5: (json.dumps({"prompt": "p", "completion": ""}).encode(), "empty response"),
        6: (b'{"prompt": "' + b"a" * (5 << 20) + b'"', "invalid JSON"),  # 5 MB, unterminated
        7: (json.dumps({"prompt": "b" * (5 << 20), "completion": "c"}).encode(), "no response tokens"),
    }
    lines = [good] + [bad[i][0] for i in sorted(bad)] + [json.dumps({"prompt": "z", "completion": "w"}).encode()]
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    tok = CharTokenizer()
    for line_no in sorted(bad):  # strict: the first bad line is the error, one short line
        if line_no == 7:  # valid, only truncated to no response: skipped and listed unasked
            continue
        body = [good] + [json.dumps({"prompt": f"q{i}", "completion": "a"}).encode() for i in range(2, line_no)]
        one = tmp_path / f"bad{line_no}.jsonl"
        one.write_bytes(b"\n".join(body + [bad[line_no][0]]) + b"\n")
        with pytest.raises(DataError) as err:
            read_pool([one], tok, max_length=64)
        msg = str(err.value)
        assert msg.startswith(f"{one}:{line_no}: ") and bad[line_no][1] in msg, msg
        assert "\n" not in msg and len(msg) < 300, msg[:300]
    examples, report = read_pool([path], tok, max_length=64, skip_invalid=True)
    assert [e.line for e in examples] == [1, 8]
    assert [(s.line, bad[s.line][1] in s.reason) for s in report.skipped] == [(i, True) for i in sorted(bad)]
    assert all(len(str(s)) < 300 for s in report.skipped)
    with pytest.raises(DataError) as err:  # without skip_invalid the first malformed line stops
        read_pool([path], tok, max_length=64)
    assert str(err.value).startswith(f"{path}:2: invalid JSON")
    print(f"\nmalformed JSONL: {len(bad)} bad lines, each named by file:line, skipped with a report")


def test_nan_and_inf_rows_are_refused_and_nothing_is_written(tmp_path):
    path = new_store(tmp_path / "s")
    x = cw.vectors(SEED, 10)
    with gradstore.open(path, readonly=False) as st:
        st.write("train", "e1", x[:4], cw.row_ids(0, 4))
        before = digest(path), Staging(st).set_records()
        for bad, row in ((np.nan, 3), (np.inf, 0), (-np.inf, 5)):
            y = x[4:].copy()
            y[row, 7] = bad
            with pytest.raises(InvalidVectorError, match=rf"row {row} \(id 'z{4 + row}'\) holds NaN or inf;"
                                                         " nothing written"):
                st.write("train", "e1", y, cw.row_ids(4, 10))
            assert (digest(path), Staging(st).set_records()) == before
        assert ops.check(st).ok and st.n_rows("train") == 4


def test_row_paths_in_store_metadata_never_direct_a_write(tmp_path):
    from qless.data import line_sha1
    from qless.selection import SourceChangedError, write_selected

    src = tmp_path / "data" / "pool.jsonl"
    src.parent.mkdir()
    line = json.dumps({"id": "r1", "prompt": "p", "completion": "c"}).encode() + b"\n"
    src.write_bytes(line)
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"id": "v", "prompt": "keep", "completion": "me"}\n')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = new_store(tmp_path / "s")
    traversal = str(out_dir / ".." / "data" / ".." / "data" / "pool.jsonl")  # resolves to src
    rows = [{"source_file": traversal, "offset": 0, "line": 1, "line_sha1": line_sha1(line)},
            {"source_file": str(out_dir / ".." / "victim.jsonl"), "offset": 0, "line": 1,
             "line_sha1": "0" * 40},
            {"source_file": "../../../../../../../tmp/x/../../etc/passwd", "offset": 0, "line": 1}]
    with gradstore.open(path, readonly=False) as st:
        st.write("train", "e1", cw.vectors(SEED, 3), ["r1", "v", "p"], metadata=rows)

    def tree():
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and path not in p.parents}

    before = tree()
    with gradstore.open(path) as st:
        stored = st.rows("train")
    for bad in stored[1:]:  # a changed or foreign line is refused, and nothing is written
        with pytest.raises((SourceChangedError, OSError)):
            write_selected([stored[0], bad], out_dir / "sel.jsonl")
        assert tree() == before
    assert write_selected(stored[:1], out_dir / "sel.jsonl") == 1
    after = tree()
    assert set(after) - set(before) == {out_dir / "sel.jsonl"}  # the one output, nothing else
    assert all(after[p] == before[p] for p in before)
    assert (out_dir / "sel.jsonl").read_bytes() == line


def test_a_pickle_that_runs_code_is_refused_as_an_optimizer_state(tmp_path):
    torch = pytest.importorskip("torch")
    from qless.optimizer_state import OptimizerStateError, load_optimizer_state

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # runs at unpickling time

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"state": {0: {"exp_avg": Payload()}}, "param_groups": [{"params": [0]}]},
               ckpt / "optimizer.pt")
    model = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(OptimizerStateError) as err:
        load_optimizer_state(ckpt, model)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt / 'optimizer.pt'}: cannot read: ") and "\n" not in msg, msg
    assert not marker.exists()
    torch.load(ckpt / "optimizer.pt", weights_only=False)  # the payload is live: what was refused
    assert marker.exists()


# ---- a full disk --------------------------------------------------------------------------

class FullDisk:
    """Wraps an lmdb.Environment: its next write transaction fails as a full disk would."""

    def __init__(self, env, exc: Exception, at_put: int | None):
        self.env, self.exc, self.at_put, self.puts, self.failed = env, exc, at_put, 0, False

    def __getattr__(self, name):
        return getattr(self.env, name)

    def begin(self, write=False, **kw):
        txn = self.env.begin(write=write, **kw)
        return _FullTxn(txn, self) if write else txn


class _FullTxn:
    def __init__(self, txn, disk: FullDisk):
        self.txn, self.disk = txn, disk

    def __getattr__(self, name):
        return getattr(self.txn, name)

    def __enter__(self):
        return self

    def put(self, *args, **kwargs):
        self.disk.puts += 1
        if not self.disk.failed and self.disk.puts == self.disk.at_put:
            self.disk.failed = True
            raise self.disk.exc
        return self.txn.put(*args, **kwargs)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.disk.at_put is None and not self.disk.failed:
            self.disk.failed = True
            self.txn.abort()  # the commit's write() hit ENOSPC
            raise self.disk.exc
        return self.txn.__exit__(exc_type, exc, tb)


@pytest.mark.parametrize("exc", [lmdb.DiskError("mdb_txn_commit: No space left on device"),
                                 OSError(errno.ENOSPC, "No space left on device")], ids=["DiskError", "ENOSPC"])
@pytest.mark.parametrize("at_put", [3, None], ids=["at-put", "at-commit"])
def test_a_full_disk_keeps_earlier_batches_and_says_what_to_do(tmp_path, exc, at_put):
    path = new_store(tmp_path / "s")
    x = cw.vectors(SEED, 40)
    with gradstore.open(path, readonly=False, map_size=cw.TINY_MAP) as st:
        for lo in range(0, 30, 10):  # the map grows across these writes
            st.write("train", "e1", x[lo:lo + 10], cw.row_ids(lo, lo + 10), encodings=cw.ENCODINGS)
        real = st._environment._env
        st._environment._env = FullDisk(real, exc, at_put)
        try:
            with pytest.raises(GradstoreError) as err:
                st.write("train", "e1", x[30:], cw.row_ids(30, 40), encodings=cw.ENCODINGS)
        finally:
            st._environment._env = real
        msg = str(err.value)
        assert isinstance(err.value, OSError) and "\n" not in msg
        assert "disk full" in msg and "free space and re-run" in msg and "every earlier batch" in msg, msg
        assert ops.check(st).ok and st.n_rows("train") == 30
        np.testing.assert_allclose(st.vectors("train", "e1", "f32"), x[:30], rtol=1e-6, atol=1e-7)
        st.write("train", "e1", x[30:], cw.row_ids(30, 40), encodings=cw.ENCODINGS)  # space freed
        np.testing.assert_allclose(st.vectors("train", "e1", "f32"), x, rtol=1e-6, atol=1e-7)
        assert ops.check(st).ok
