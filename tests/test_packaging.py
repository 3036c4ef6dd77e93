"""`pip install gradstore` is the engine alone: no torch side, no plotting, and it works."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "gguf", "safetensors", "matplotlib", "ray")

QUERY = """
import importlib.util, sys
import numpy as np
import gradstore

assert [m for m in {heavy!r} if importlib.util.find_spec(m)] == []
rng = np.random.default_rng(0)
with gradstore.create(sys.argv[1], dim=64) as st:
    st.add_checkpoint("e1", lr=1e-5)
    st.write("train", "e1", rng.standard_normal((10, 64)).astype("f4"), [f"z{{i}}" for i in range(10)],
             encodings=["f16", "sign1"])
    st.write("t", "e1", rng.standard_normal((2, 64)).astype("f4"), ["a", "b"], kind="task",
             encodings=["f16", "sign1"], subtasks=["x", "y"])
    print(len(st.query("TOP 3 FROM train BY t ENCODING sign1")))
assert "torch" not in sys.modules
"""


@pytest.mark.slow  # a fresh venv and a pip install from the local index: ~20 s
def test_the_engine_installs_and_runs_without_torch(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for package in ("gradstore", "qless", "cli"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, src / file)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "-c", ROOT / "constraints.txt", src], capture_output=True, text=True, check=False)
    assert pip.returncode == 0, pip.stderr

    store = tmp_path / "st"
    query = subprocess.run([venv / "bin/python", "-c", QUERY.format(heavy=HEAVY), store],
                           capture_output=True, text=True, check=False)
    assert query.returncode == 0, query.stderr
    assert query.stdout == "3\n"

    def cli(*args):
        return subprocess.run([venv / "bin/gradstore", *args], capture_output=True, text=True, check=False)

    info = cli("query", "--store", store, "-t", "t", "--k", "2", "--csv")
    assert info.returncode == 0 and len(info.stdout.splitlines()) == 3
    ingest = cli("ingest", "--data", ROOT / "README.md", "--checkpoint", tmp_path, "--store", store)
    assert ingest.returncode == 1
    assert ingest.stderr == "Error: torch is not installed; this command needs pip install 'gradstore[qless]'\n"
    plot = cli("plot", "-t", "t", "--store", store)
    assert plot.returncode == 1
    assert plot.stderr == "Error: matplotlib is not installed; this command needs pip install 'gradstore[plot]'\n"
    version = subprocess.run([venv / "bin/python", "-m", "gradstore_cli", "--version"], capture_output=True,
                             text=True, check=False)
    assert version.stdout == "gradstore, version 0.1.0\n"
