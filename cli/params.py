"""Option value types, and the import guard of the optional parts (qless, plot).

A bad option value is a usage error (exit 2) that names the option and what it takes.

Each type checks its value with the library function that owns the format, so the CLI states
no grammar of its own; without them a bad `--k 5%x` surfaced as a position in a query the
user never wrote (issue 14).
"""

from __future__ import annotations

import contextlib

import click

from gradstore.encodings import parse_encoding
from gradstore.errors import GradstoreError
from gradstore.query import parse_condition, parse_size


@contextlib.contextmanager
def requires(extra: str):
    """Imports of an optional part: a missing package is a one-line error naming the extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"{exc.name} is not installed; this command needs pip install 'gradstore[{extra}]'") from None


class SelectionSize(click.ParamType):
    """`--k`: a row count (100) or a percentage (5%), as TOP takes it; passed on as text."""

    name = "COUNT|PERCENT%"

    def convert(self, value, param, ctx):
        try:
            parse_size(value)
        except GradstoreError:
            self.fail(f"expected a positive count (such as 100) or a percentage greater than 0 and"
                      f" at most 100 (such as 5%), not {value!r}", param, ctx)
        return value.strip()


class EncodingName(click.ParamType):
    """An encoding name (absmax8, sign1-centered, ...), normalized."""

    name = "ENCODING"

    def convert(self, value, param, ctx):
        try:
            return parse_encoding(value).name
        except GradstoreError as exc:
            self.fail(str(exc), param, ctx)


class EncodingList(click.ParamType):
    """Comma-separated encoding names, normalized, as a list."""

    name = "ENC,ENC,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):  # click may convert a value twice
            return value
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names:
            self.fail("expected at least one encoding name", param, ctx)
        return [ENCODING.convert(n, param, ctx) for n in names]


class Name(click.ParamType):
    """A set, task or checkpoint name: not empty."""

    name = "NAME"

    def convert(self, value, param, ctx):
        if not value.strip():
            self.fail("expected a name, not an empty string", param, ctx)
        return value.strip()


class NameList(click.ParamType):
    """Comma-separated names, none empty; passed on as "a,b" text."""

    name = "NAME,NAME,..."

    def convert(self, value, param, ctx):
        names = [v.strip() for v in value.split(",")]
        if not all(names):
            self.fail(f"expected comma-separated names, not {value!r}", param, ctx)
        return ",".join(names)


class FloatList(click.ParamType):
    """Comma-separated numbers, as a list of floats."""

    name = "X,X,..."

    def convert(self, value, param, ctx):
        try:
            return [float(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"expected comma-separated numbers such as 2e-5,1e-5, not {value!r}", param, ctx)


class Condition(click.ParamType):
    """A WHERE condition; its errors give a column of the option's own text."""

    name = "CONDITION"

    def convert(self, value, param, ctx):
        try:
            parse_condition(value)
        except GradstoreError as exc:
            self.fail(str(exc), param, ctx)
        return value


class Shard(click.ParamType):
    """`--shard i/n` -> (i, n)."""

    name = "i/n"

    def convert(self, value, param, ctx):
        with requires("qless"):
            from qless.ingest import parse_shard

        try:
            return parse_shard(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SELECTION_SIZE = SelectionSize()
ENCODING = EncodingName()
ENCODINGS = EncodingList()
NAME = Name()
NAMES = NameList()
FLOATS = FloatList()
CONDITION = Condition()
SHARD = Shard()
