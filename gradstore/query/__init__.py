"""The query language: parse -> plan -> execute (docs/query.md is the reference)."""

from __future__ import annotations

from .ast import And, Compare, Expr, InList, IsNull, Like, Not, Or, Query, compile_like
from .parser import parse, parse_condition, parse_size


def run(store, text: str, execute=None):
    """Parse, plan and execute one query; EXPLAIN returns the plan without scanning.

    `execute(store, plan)` runs the plan (default: the executor's; a sharded store fans it out).
    """
    from .planner import plan

    query = parse(text)
    the_plan = plan(store, query)
    if query.explain:
        return the_plan
    if execute is None:
        from .executor import execute
    return execute(store, the_plan)


def default_train_set(store) -> str:
    """The store's only train set (what `--set` defaults to)."""
    train = [s for s in store.sets() if store.set_info(s)["kind"] == "train"]
    if len(train) != 1:
        from ..errors import UnknownNameError

        raise UnknownNameError(
            f"the store has {len(train)} train sets ({', '.join(train) or 'none'}); name one with --set")
    return train[0]


def compose(store, tasks, k: str, set_name=None, encoding=None, mode=None, agg=None, combine=None,
            checkpoints=None, weight=None, where=None, rerank=None, oversample=None) -> str:
    """Query text for the CLI's flags (`--task mmlu --k 5%` -> `TOP 5% FROM train BY mmlu`)."""
    from ..encodings import parse_encoding
    from .ast import quote_name

    # checked here so the error names the flag's value, not a column of made-up text
    encoding, rerank = (parse_encoding(e).name if e else None for e in (encoding, rerank))
    parts = [f"TOP {k.strip()}", "FROM", quote_name(set_name or default_train_set(store)),
             "BY", ", ".join(quote_name(t) for t in tasks)]
    for keyword, value in (("COMBINE", combine), ("AGG", agg), ("WEIGHT", weight),
                           ("ENCODING", encoding), ("MODE", mode)):
        if value:
            parts += [keyword, value]
    if rerank:
        parts += ["RERANK", rerank] + (["OVERSAMPLE", f"{oversample:g}"] if oversample else [])
    if checkpoints:
        parts += ["CHECKPOINTS", ", ".join(quote_name(c.strip()) for c in checkpoints.split(","))]
    if where:
        parts += ["WHERE", where]
    return " ".join(parts)
