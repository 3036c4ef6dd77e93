"""The settings of qless's stages: one frozen dataclass each, owning the defaults and the checks.

- `ReadConfig`: how pool and task records become examples (warmup, train, ingest, eval);
- `LoraConfig`: the adapters a warmup or train attaches;
- `WarmupConfig`: the training loop (LESS's Trainer settings), recorded in every checkpoint
  so a resume in the same folder is checked against it; `train` runs the same loop;
- `IngestConfig`: how gradients are projected, encoded and written;
- `EvalConfig`: the prompts and generations of an evaluation.

The data a stage works on (files, examples, checkpoints, the store, the model's `ModelSource`)
are its functions' positional arguments; the settings are these objects. A bad value raises
`ConfigError` naming the field (`IngestConfig.token_budget must be >= 1, got 0`); the CLI turns
it into a usage error naming the option. No torch here: the CLI reads the defaults on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

from gradstore.encodings import DEFAULT_ENCODINGS, parse_encoding
from gradstore.errors import GradstoreError

# The prompt formats a pool and its tasks can share (the pool readers also take "auto", the task
# builders "plain"; a stage needs one format that both sides take).
STAGE_CHAT_FORMATS = ("tulu", "template")
SCHEDULERS = ("linear", "cosine", "constant")
WARMUP_PERCENTAGE = 0.05  # LESS warms up on a 5% random sample of the pool
PROJECTIONS = ("sparse-rademacher", "dense-rademacher")


class ConfigError(ValueError):
    "A stage setting is out of range or of the wrong type (the message names the field)."

    def __init__(self, config: object, field: str, problem: str, value: object):
        super().__init__(f"{type(config).__name__}.{field} {problem}, got {value!r}")
        self.field = field  # the CLI names the option it came from


class _Checked:
    """Field checks for the frozen configs below, run from their `__post_init__`."""

    def _int(self, name: str, low: int, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(self, name, "must be an integer" + (" or None" if optional else ""), value)
        if value < low:
            raise ConfigError(self, name, f"must be >= {low}", value)
        self._set(name, int(value))  # a numpy integer too becomes a plain one (the records are JSON)

    def _number(self, name: str, low: float, high: float | None = None, low_open: bool = False) -> None:
        """`value >= low` (`> low` when low_open), and `< high` when high is given."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ConfigError(self, name, "must be a number", value)
        if high is not None and not low <= value < high:
            raise ConfigError(self, name, f"must be in [{low}, {high})", value)
        if not (value > low if low_open else value >= low):  # written so that NaN fails too
            raise ConfigError(self, name, f"must be {'>' if low_open else '>='} {low}", value)
        if not isinstance(value, (int, float)):
            self._set(name, float(value))

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(self, name, f"must be one of {', '.join(choices)}", value)

    def _bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ConfigError(self, name, "must be True or False", getattr(self, name))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # a normalized value, while the frozen config is built


@dataclass(frozen=True)
class ReadConfig(_Checked):
    """How pool and task records become examples; every stage that reads records takes one, so
    a pool and its tasks get one prompt format (gradients in two formats are not comparable)."""

    # LESS's max_seq_length: training rows are truncated to it, eval examples longer are left out.
    max_length: int = 2048
    chat_format: str = "tulu"  # LESS's; or "template", the tokenizer's chat template
    skip_invalid: bool = False  # skip malformed lines (listed in the report) instead of stopping

    def __post_init__(self):
        self._int("max_length", 1)
        self._choice("chat_format", STAGE_CHAT_FORMATS)
        self._bool("skip_invalid")


@dataclass(frozen=True)
class LoraConfig(_Checked):
    """The LoRA adapters a warmup or train attaches to q, k, v, o (LESS's r=128, alpha=512)."""

    r: int = 128
    alpha: float = 512.0
    dropout: float = 0.1

    def __post_init__(self):
        self._int("r", 1)
        self._number("alpha", 0, low_open=True)
        self._number("dropout", 0, 1)


@dataclass(frozen=True)
class WarmupConfig(_Checked):
    """The training loop's settings: LESS's Trainer arguments (`base_training_args.sh`).

    A checkpoint records them (`dataclasses.asdict`), and a re-run in the same folder resumes
    only with the same ones. `max_steps` (as the Trainer's) sets the total number of optimizer
    steps instead of `epochs`. `seed` fixes the data order and dropout (and, from files, the
    sample and the LoRA initialization). `max_grad_norm` None or 0 turns clipping off.
    """

    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    scheduler: str = "linear"
    batch_size: int = 1  # examples per forward/backward pass
    grad_accum: int = 32  # passes per optimizer step
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        self._int("epochs", 1)
        self._number("lr", 0, low_open=True)
        self._number("warmup_ratio", 0, 1)
        self._choice("scheduler", SCHEDULERS)
        self._int("batch_size", 1)
        self._int("grad_accum", 1)
        self._number("weight_decay", 0)
        if self.max_grad_norm is not None:
            self._number("max_grad_norm", 0)
            if not self.max_grad_norm:
                self._set("max_grad_norm", None)  # one spelling of "no clipping" in the record
        self._int("max_steps", 1, optional=True)
        self._int("seed", 0)


@dataclass(frozen=True)
class IngestConfig(_Checked):
    """How gradients become stored rows: the projection (fixed for a store at its creation),
    the encodings written, and the batching."""

    encodings: tuple[str, ...] = DEFAULT_ENCODINGS
    dim: int = 8192  # the projection's output dimension
    projection: str = "sparse-rademacher"
    seed: int = 0  # the projection's
    batch_size: int = 32  # rows per store transaction
    # Tokens per forward/backward (packed; padded where the model cannot be packed): bergson's
    # default; 1-2k was fastest on a 2-core CPU (benchmarks/bench_ingest.py); raise it on a GPU.
    token_budget: int = 2048

    def __post_init__(self):
        if isinstance(self.encodings, str) or not self.encodings:
            raise ConfigError(self, "encodings", "must be a non-empty sequence of encoding names",
                              self.encodings)
        try:
            self._set("encodings", tuple(parse_encoding(name).name for name in self.encodings))
        except GradstoreError as e:  # "unknown encoding 'x': expected one of ..."
            raise ConfigError(self, "encodings", f"must be known encodings ({e})", self.encodings) from None
        self._int("dim", 1)
        self._choice("projection", PROJECTIONS)
        self._int("seed", 0)
        self._int("batch_size", 1)
        self._int("token_budget", 1)


@dataclass(frozen=True)
class EvalConfig(_Checked):
    """What an evaluation asks and of which examples."""

    k_shot: int = 5  # MMLU demonstrations from the subject's dev split (open-instruct's --ntrain)
    max_new_tokens: int = 256  # generation length for exact match (0: no generation, NLL only)
    subtasks: tuple[str, ...] = ()  # only these subtasks (empty: all)
    limit: int | None = None  # at most this many examples, round robin over the subtasks

    def __post_init__(self):
        self._int("k_shot", 0)
        self._int("max_new_tokens", 0)
        if isinstance(self.subtasks, str):
            raise ConfigError(self, "subtasks", "must be a sequence of subtask names", self.subtasks)
        self._set("subtasks", tuple(self.subtasks))
        self._int("limit", 1, optional=True)
