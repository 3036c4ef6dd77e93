"""A child process for tests/test_reliability.py: writes, merges or requantizes, then gets SIGKILLed.

Every line it prints on stdout is flushed at once and says what has *committed* (the parent
kills it at random moments and checks that everything reported is in the store):

    python crash_writer.py write PATH SEED N        COMMIT <ckpt> <lo> <hi> | MAP <bytes> | DONE
    python crash_writer.py append PATH TAG SEED K   COMMIT <lo> <hi> (TAG's rows) | DONE
                                                    (starts writing on a line on stdin)
    python crash_writer.py merge OUT SRC...         PROGRESS <rows> | DONE
    python crash_writer.py requantize PATH ENC...   PROGRESS <rows> | DONE

`write` resumes: for each checkpoint it skips the rows already written, so running it again
after a kill finishes exactly the rest. The data are a pure function of the seed (`vectors`,
`batches`), which the parent uses as the oracle.
"""

from __future__ import annotations

import sys

import numpy as np

DIM = 48
CKPTS = (("e1", 2e-5), ("e2", 1e-5))
ENCODINGS = ("f32", "f16", "absmax8", "absmean4", "sign1")
TINY_MAP = 64 << 10  # so the map really grows while we kill the writer


def vectors(seed: int, n: int, ckpt: int = 0) -> np.ndarray:
    """The gradients of rows 0..n-1 at checkpoint number `ckpt` (deterministic)."""
    return np.random.default_rng([seed, ckpt]).standard_normal((n, DIM)).astype(np.float32)


def batches(seed: int, n: int, most: int = 30) -> list[tuple[int, int]]:
    """The writer's batch boundaries: (lo, hi) pairs of random sizes 1..most covering 0..n."""
    rng = np.random.default_rng([seed, 99])
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + int(rng.integers(1, most + 1)))
        out.append((lo, hi))
        lo = hi
    return out


def row_ids(lo: int, hi: int, tag: str = "z") -> list[str]:
    return [f"{tag}{i}" for i in range(lo, hi)]


def say(*words) -> None:
    print(*words, flush=True)


def write(path: str, seed: int, n: int) -> None:
    import gradstore

    store = gradstore.open(path, readonly=False, map_size=TINY_MAP)
    xs = [vectors(seed, n, i) for i in range(len(CKPTS))]
    plan = batches(seed, n)
    written = store.set_info("train")["written"] if "train" in store.sets() else {}
    starts = {lo for lo, _ in plan} | {n}
    for c, _ in CKPTS:
        if written.get(c, 0) not in starts:  # would mean half a batch was committed
            say("ERROR", c, "written", written.get(c, 0), "is not a batch boundary")
            sys.exit(3)
    map_size = store.env.info()["map_size"]
    say("READY")
    for lo, hi in plan:
        for i, (c, _) in enumerate(CKPTS):
            if written.get(c, 0) >= hi:
                continue
            store.write("train", c, xs[i][lo:hi], row_ids(lo, hi), encodings=ENCODINGS,
                        metadata=[{"source": "crash", "n": j} for j in range(lo, hi)])
            say("COMMIT", c, lo, hi)
            if store.env.info()["map_size"] != map_size:
                map_size = store.env.info()["map_size"]
                say("MAP", map_size)
    store.close()
    say("DONE")


def append(path: str, tag: str, seed: int, k: int) -> None:
    """K batches of TAG's own rows, appended to set 'train' at checkpoint e1 (a second writer)."""
    import gradstore

    store = gradstore.open(path, readonly=False, map_size=TINY_MAP)
    plan = batches(seed, k * 12, most=24)[:k]
    x = vectors(seed, plan[-1][1])
    say("READY")
    sys.stdin.readline()  # the parent starts both writers at once
    for lo, hi in plan:
        store.write("train", "e1", x[lo:hi], row_ids(lo, hi, tag), encodings=("f32", "sign1"))
        say("COMMIT", lo, hi)
    store.close()
    say("DONE")


class _Progress:
    def __init__(self, total: int, desc: str):
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        say("PROGRESS", self.done)

    def close(self) -> None:
        pass


def main(argv: list[str]) -> None:
    mode, path, *rest = argv
    if mode == "write":
        write(path, int(rest[0]), int(rest[1]))
    elif mode == "append":
        append(path, rest[0], int(rest[1]), int(rest[2]))
    elif mode == "merge":
        from gradstore import ops

        say("READY")
        ops.merge(rest, path, batch_rows=16, progress=_Progress)
        say("DONE")
    elif mode == "requantize":
        import gradstore
        from gradstore import ops

        store = gradstore.open(path, readonly=False)
        say("READY")
        ops.requantize(store, "train", to=rest, batch_rows=16, progress=_Progress)
        store.close()
        say("DONE")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
