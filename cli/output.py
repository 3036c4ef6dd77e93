"""Shared option bundles and output formatting: JSON lines by default, --table, --csv."""

from __future__ import annotations

import csv
import functools
import json
import sys

import click


def store_option(manifest: bool = False):
    """--store PATH, from $GRADSTORE_PATH, else ./gradstore; `manifest`: or a shard manifest file."""
    return click.option(
        "--store", "store_path", envvar="GRADSTORE_PATH", default="./gradstore", show_default=True,
        type=click.Path(file_okay=manifest),
        help="Store directory, or a shard manifest (JSON) (env: GRADSTORE_PATH)." if manifest
        else "Store directory (env: GRADSTORE_PATH).",
    )


def output_options(fn):
    """--table / --csv / --json (JSON lines, the default)."""

    @click.option("--table", "fmt", flag_value="table", help="Aligned text table.")
    @click.option("--csv", "fmt", flag_value="csv", help="CSV with a header row.")
    @click.option("--json", "fmt", flag_value="json", default=True, help="JSON lines (default).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def silent_option(fn):
    return click.option("-s", "--silent", is_flag=True, help="No progress bars or notes on stderr.")(fn)


def emit(rows: list[dict], fmt: str, columns: list[str] | None = None) -> None:
    """Write rows to stdout in the chosen format."""
    columns = columns or _columns(rows)
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    else:
        click.echo(table(rows, columns))


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def note(message: str, silent: bool = False) -> None:
    """A log line on stderr (results stay alone on stdout)."""
    if not silent:
        click.echo(message, err=True)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
