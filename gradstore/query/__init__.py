"""The query language: parse -> plan -> execute (docs/query.md is the reference)."""

from __future__ import annotations


def run(store, text: str):
    """Parse, plan and execute one query; EXPLAIN returns the plan without scanning."""
    from .executor import execute
    from .parser import parse
    from .planner import plan

    query = parse(text)
    the_plan = plan(store, query)
    if query.explain:
        return the_plan
    return execute(store, the_plan)
