"""The query language's parser and syntax tree: examples, exact errors, round trips, fuzzing."""

import itertools
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradstore.encodings import all_names
from gradstore.errors import GradstoreError, QuerySyntaxError
from gradstore.query.ast import (
    KEYWORDS,
    And,
    Compare,
    InList,
    IsNull,
    Like,
    Not,
    Or,
    Query,
    compile_like,
)
from gradstore.query.parser import MAX_DEPTH, parse, parse_condition, tokenize


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def same(a, b) -> bool:
    """Strict AST equality: == alone says 1 == 1.0 == True; repr tells them apart."""
    return a == b and repr(a) == repr(b)


def Q(**kw) -> Query:
    kw.setdefault("set_name", "train")
    kw.setdefault("tasks", ("mmlu",))
    return Query(**kw)


# -- DESIGN.md's sketch, verbatim ---------------------------------------------------------

DESIGN_SKETCH = [
    ("TOP 5% FROM train BY mmlu", Q(top_percent=5.0)),
    ("TOP 1000 FROM train BY mmlu, bbh COMBINE mean WHERE source = 'dolly' AND tokens < 1024",
     Q(top_k=1000, tasks=("mmlu", "bbh"), combine="mean",
       where=And(Compare("source", "=", "dolly"), Compare("tokens", "<", 1024)))),
    ("SCORE FROM train BY tydiqa AGG max OVER subtasks CHECKPOINTS 1,2 WEIGHT uniform",
     Q(tasks=("tydiqa",), agg="max", checkpoints=("1", "2"), weight="uniform")),
    ("TOP 5% FROM train BY bbh ENCODING sign1          -- score at another precision",
     Q(top_percent=5.0, tasks=("bbh",), encoding="sign1")),
    ("EXPLAIN TOP 5% FROM train BY mmlu                 -- the plan, no scan",
     Q(explain=True, top_percent=5.0)),
]


@pytest.mark.parametrize("text,expected", DESIGN_SKETCH)
def test_design_sketch_queries(text, expected):
    assert same(parse(text), expected)


# -- more exact examples ------------------------------------------------------------------

EXAMPLES = [
    ("top 10 from train by mmlu", Q(top_k=10)),
    ("Top 10 From train By mmlu", Q(top_k=10)),
    ("TOP 5 % FROM train BY mmlu", Q(top_percent=5.0)),
    ("TOP 0.5% FROM train BY mmlu", Q(top_percent=0.5)),
    ("TOP 100% FROM train BY mmlu", Q(top_percent=100.0)),
    ("TOP .5% FROM train BY mmlu", Q(top_percent=0.5)),
    ("TOP 1e1% FROM train BY mmlu", Q(top_percent=10.0)),
    ("SCORE FROM train BY mmlu", Q()),
    ("EXPLAIN SCORE FROM train BY mmlu", Q(explain=True)),
    ("TOP 3 FROM train BY mmlu,bbh,tydiqa", Q(top_k=3, tasks=("mmlu", "bbh", "tydiqa"))),
    ("TOP 3 FROM train BY mmlu COMBINE max", Q(top_k=3, combine="max")),
    ("TOP 3 FROM train BY mmlu COMBINE SUM", Q(top_k=3, combine="sum")),
    ("TOP 3 FROM train BY mmlu AGG mean", Q(top_k=3, agg="mean")),
    ("TOP 3 FROM train BY mmlu AGG Mean over SUBTASKS", Q(top_k=3, agg="mean")),
    ("TOP 3 FROM train BY mmlu CHECKPOINTS all", Q(top_k=3)),
    ("TOP 3 FROM train BY mmlu CHECKPOINTS ALL", Q(top_k=3)),
    ("TOP 3 FROM train BY mmlu CHECKPOINTS \"all\"", Q(top_k=3, checkpoints=("all",))),
    ("TOP 3 FROM train BY mmlu CHECKPOINTS epoch-1, epoch-4",
     Q(top_k=3, checkpoints=("epoch-1", "epoch-4"))),
    ("TOP 3 FROM train BY mmlu CHECKPOINTS 'step 105'", Q(top_k=3, checkpoints=("step 105",))),
    ("TOP 3 FROM train BY mmlu WEIGHT lr", Q(top_k=3)),
    ("TOP 3 FROM train BY mmlu ENCODING absmax8-global", Q(top_k=3, encoding="absmax8-global")),
    ("TOP 3 FROM train BY mmlu ENCODING ABSMEAN4", Q(top_k=3, encoding="absmean4")),
    ("TOP 3 FROM train BY mmlu ENCODING f16", Q(top_k=3, encoding="f16")),
    ("TOP 3 FROM train BY mmlu MODE symmetric", Q(top_k=3, mode="symmetric")),
    ("TOP 3 FROM train BY mmlu MODE Asymmetric", Q(top_k=3, mode="asymmetric")),
    ("TOP 3 FROM train BY mmlu RERANK absmax8", Q(top_k=3, rerank="absmax8")),
    ("TOP 3% FROM train BY mmlu ENCODING sign1 rerank F16 oversample 2.5",
     Q(top_percent=3.0, encoding="sign1", rerank="f16", oversample=2.5)),
    ("TOP 3 FROM train BY mmlu RERANK absmax8-centered OVERSAMPLE 8 WHERE x = 1",
     Q(top_k=3, rerank="absmax8-centered", oversample=8.0, where=Compare("x", "=", 1))),
    ("TOP 3 FROM pool.v2 BY task_a", Q(top_k=3, set_name="pool.v2", tasks=("task_a",))),
    ('TOP 3 FROM "my set" BY "where", \'by\'',
     Q(top_k=3, set_name="my set", tasks=("where", "by"))),
    ('TOP 3 FROM "say ""hi""" BY mmlu', Q(top_k=3, set_name='say "hi"')),
    ("TOP 3 FROM 2024 BY mmlu", Q(top_k=3, set_name="2024")),
    # clauses in any order
    (("SCORE FROM train BY mmlu WHERE x = 1 MODE asymmetric WEIGHT uniform COMBINE sum "
     "AGG mean ENCODING sign1 CHECKPOINTS a"),
     Q(where=Compare("x", "=", 1), mode="asymmetric", weight="uniform", combine="sum",
       agg="mean", encoding="sign1", checkpoints=("a",))),
    # comments and line breaks
    ("-- pick data\nTOP 7 -- seven rows\nFROM train\n  BY mmlu -- done", Q(top_k=7)),
    ("TOP 7 FROM train BY mmlu--comment right after a name", Q(top_k=7)),
    ("\tTOP\r\n7\fFROM\vtrain BY mmlu\n", Q(top_k=7)),
]


@pytest.mark.parametrize("text,expected", EXAMPLES)
def test_examples(text, expected):
    assert same(parse(text), expected)


def W(cond: str):
    return parse("SCORE FROM train BY mmlu WHERE " + cond).where


CONDITIONS = [
    ("source = 'dolly'", Compare("source", "=", "dolly")),
    ("source != 'dolly'", Compare("source", "!=", "dolly")),
    ("source <> 'dolly'", Compare("source", "!=", "dolly")),
    ("tokens<1024", Compare("tokens", "<", 1024)),
    ("tokens <= 1024.0", Compare("tokens", "<=", 1024.0)),
    ("tokens > -3", Compare("tokens", ">", -3)),
    ("tokens >= 1e3", Compare("tokens", ">=", 1000.0)),
    ("tokens >= -.5", Compare("tokens", ">=", -0.5)),
    ("flag = TRUE", Compare("flag", "=", True)),
    ("flag = false", Compare("flag", "=", False)),
    ("flag = NULL", Compare("flag", "=", None)),
    ("name = 'it''s'", Compare("name", "=", "it's")),
    ("name = ''", Compare("name", "=", "")),
    ("name = '-- not a comment'", Compare("name", "=", "-- not a comment")),
    ("meta.source = 'x'", Compare("meta.source", "=", "x")),
    ('"mode" = \'x\'', Compare("mode", "=", "x")),
    ("source IN ('dolly', 'oasst1', 3, NULL)", InList("source", ("dolly", "oasst1", 3, None))),
    ("source not in ('dolly')", InList("source", ("dolly",), True)),
    ("id LIKE 'cot_%'", Like("id", "cot_%")),
    ("id NOT LIKE '%\\_x'", Like("id", "%\\_x", True)),
    ("subtask IS NULL", IsNull("subtask")),
    ("subtask is not null", IsNull("subtask", True)),
    ("NOT a = 1", Not(Compare("a", "=", 1))),
    ("NOT NOT a = 1", Not(Not(Compare("a", "=", 1)))),
    ("a = 1 AND b = 2 AND c = 3",
     And(And(Compare("a", "=", 1), Compare("b", "=", 2)), Compare("c", "=", 3))),
    ("a = 1 OR b = 2 AND c = 3",
     Or(Compare("a", "=", 1), And(Compare("b", "=", 2), Compare("c", "=", 3)))),
    ("(a = 1 OR b = 2) AND c = 3",
     And(Or(Compare("a", "=", 1), Compare("b", "=", 2)), Compare("c", "=", 3))),
    ("NOT a = 1 AND b = 2", And(Not(Compare("a", "=", 1)), Compare("b", "=", 2))),
    ("NOT (a = 1 AND b = 2)", Not(And(Compare("a", "=", 1), Compare("b", "=", 2)))),
    ("a = 1 AND NOT b IN (1, 2) OR c IS NULL",
     Or(And(Compare("a", "=", 1), Not(InList("b", (1, 2)))), IsNull("c"))),
    ("((((a = 1))))", Compare("a", "=", 1)),
]


@pytest.mark.parametrize("text,expected", CONDITIONS)
def test_conditions(text, expected):
    assert same(W(text), expected)
    assert same(parse_condition(text), expected)


# -- canonical text -----------------------------------------------------------------------

CANONICAL = [
    ("top 5 % from train by mmlu", "TOP 5% FROM train BY mmlu"),
    ("TOP 2.5% FROM train BY mmlu", "TOP 2.5% FROM train BY mmlu"),
    ("SCORE FROM train BY mmlu COMBINE mean AGG max WEIGHT lr CHECKPOINTS all",
     "SCORE FROM train BY mmlu"),
    ("explain score from t by a where \"mode\" = 1 mode symmetric agg mean over subtasks",
     'EXPLAIN SCORE FROM t BY a AGG mean MODE symmetric WHERE "mode" = 1'),
    ("SCORE FROM 'my set' BY \"select\", \"Where\", b CHECKPOINTS 'ALL', 3",
     'SCORE FROM "my set" BY select, "Where", b CHECKPOINTS "ALL", 3'),
    ("SCORE FROM t BY a WHERE a = 1 AND (b = 2 AND c = 3)",
     "SCORE FROM t BY a WHERE a = 1 AND (b = 2 AND c = 3)"),
    ("SCORE FROM t BY a WHERE (a = 1 AND b = 2) AND c = 3",
     "SCORE FROM t BY a WHERE a = 1 AND b = 2 AND c = 3"),
    ("SCORE FROM t BY a WHERE NOT (a IS NULL) OR (b LIKE 'x%')",
     "SCORE FROM t BY a WHERE NOT a IS NULL OR b LIKE 'x%'"),
    ("SCORE FROM t BY a WHERE NOT (a = 1 OR b = 'it''s')",
     "SCORE FROM t BY a WHERE NOT (a = 1 OR b = 'it''s')"),
    ("SCORE FROM t BY a WHERE \"123\" = 1.50", 'SCORE FROM t BY a WHERE "123" = 1.5'),
]


@pytest.mark.parametrize("text,canonical", CANONICAL)
def test_canonical_text(text, canonical):
    query = parse(text)
    assert query.to_text() == canonical
    assert str(query) == canonical
    assert same(parse(canonical), query)


# -- exact error messages -----------------------------------------------------------------

ERRORS = [
    ("SCORE FROM t BY m RERANK absmax8", 18,
     "column 19: expected ',' or a clause (COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or"
     " WHERE) or end of query, found RERANK after SCORE (a rerank needs TOP: SCORE returns every row)"),
    ("TOP 5 FROM t BY m RERANK abs9", 25,
     "column 26: expected an encoding after RERANK (f32, f16, absmax8, absmax4, absmax2, absmean8,"
     " absmean4, absmean2, sign1; quantized ones may add -global and/or -centered), found name abs9"),
    ("TOP 5 FROM t BY m RERANK f16 OVERSAMPLE 0.5", 40,
     "column 41: expected a number from 1 to 1,000,000 after OVERSAMPLE (the shortlist is that many"
     " times k), found number 0.5"),
    ("TOP 5 FROM t BY m RERANK f16 OVERSAMPLE x", 40,
     "column 41: expected a number from 1 to 1,000,000 after OVERSAMPLE (the shortlist is that many"
     " times k), found name x"),
    ("TOP 5 FROM t BY m OVERSAMPLE 2", 18,
     "column 19: expected ',' or a clause (COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or"
     " WHERE) or end of query, found keyword OVERSAMPLE"),
    ("TOP 5 FROM t BY m RERANK f16 MODE symmetric OVERSAMPLE 2", 44,
     "column 45: expected a clause (COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or"
     " WHERE) or end of query, found keyword OVERSAMPLE"),
    ("TOP 5 FROM train BY", 19, "column 20: expected a task name after BY, found end of query"),
    ("", 0, "column 1: expected EXPLAIN, TOP or SCORE, found end of query"),
    ("SELECT * FROM train", 0, "column 1: expected EXPLAIN, TOP or SCORE, found name SELECT"),
    ("EXPLAIN FROM train BY mmlu", 8,
     "column 9: expected TOP or SCORE after EXPLAIN, found keyword FROM"),
    ("TOP FROM train BY mmlu", 4,
     "column 5: expected a row count or a percentage after TOP, found keyword FROM"),
    ("TOP 0 FROM train BY mmlu", 4,
     "column 5: expected a positive row count after TOP, found number 0"),
    ("TOP -1 FROM train BY mmlu", 4,
     "column 5: expected a positive row count after TOP, found number -1"),
    ("TOP 0% FROM train BY mmlu", 4, ("column 5: expected a percentage greater than 0 and at most "
     "100 after TOP, found 0%")),
    ("TOP 100.5 % FROM train BY mmlu", 4, ("column 5: expected a percentage greater than 0 and at "
     "most 100 after TOP, found 100.5%")),
    ("TOP 2.5 FROM train BY mmlu", 4, ("column 5: expected a whole number of rows (or a percentage "
     "such as 5%) after TOP, found number 2.5")),
    ("TOP 5 train BY mmlu", 6, "column 7: expected FROM, found name train"),
    ("TOP 5 FROM BY mmlu", 11, "column 12: expected a set name after FROM, found keyword BY"),
    ("TOP 5 FROM train mmlu", 17, "column 18: expected BY after the set name, found name mmlu"),
    ("TOP 5 FROM train BY mmlu,", 25,
     "column 26: expected a task name after ',', found end of query"),
    ("TOP 5 FROM train BY mmlu, mmlu", 26, ("column 27: expected each task once, found name mmlu "
     "again")),
    ("TOP 5 FROM train BY mmlu bbh", 25, ("column 26: expected ',' or a clause (COMBINE, AGG, "
     "CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or WHERE) or end of query, found name bbh")),
    ("TOP 5 FROM train BY mmlu COMBINE max COMBINE sum", 37, ("column 38: expected at most one "
     "COMBINE clause, found a second COMBINE (the first is at column 26)")),
    ("TOP 5 FROM train BY mmlu COMBINE median", 33,
     "column 34: expected mean, max or sum after COMBINE, found name median"),
    ("TOP 5 FROM train BY mmlu AGG sum", 29,
     "column 30: expected max or mean after AGG, found name sum"),
    ("TOP 5 FROM train BY mmlu AGG max OVER tasks", 38,
     "column 39: expected subtasks after OVER, found name tasks"),
    ("TOP 5 FROM train BY mmlu AGG max subtasks", 33, ("column 34: expected OVER, a clause "
     "(COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or WHERE) or end of query, found name "
     "subtasks")),
    ("TOP 5 FROM train BY mmlu CHECKPOINTS", 36, ("column 37: expected a checkpoint name or all "
     "after CHECKPOINTS, found end of query")),
    ("TOP 5 FROM train BY mmlu CHECKPOINTS all, e1", 40, ("column 41: expected a clause (COMBINE, "
     "AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or WHERE) or end of query after CHECKPOINTS all "
     "(double-quote a checkpoint named \"all\"), found ','")),
    ("TOP 5 FROM train BY mmlu WEIGHT lr2", 32,
     "column 33: expected lr or uniform after WEIGHT, found name lr2"),
    ("TOP 5 FROM train BY mmlu ENCODING sign2", 34, ("column 35: expected an encoding after "
     "ENCODING (f32, f16, absmax8, absmax4, absmax2, absmean8, absmean4, absmean2, sign1; "
     "quantized ones may add -global and/or -centered), found name sign2")),
    ("TOP 5 FROM train BY mmlu MODE fast", 30,
     "column 31: expected symmetric or asymmetric after MODE, found name fast"),
    ("TOP 5 FROM train BY mmlu WHERE", 30, ("column 31: expected a condition (a field name, NOT "
     "or '(') after WHERE, found end of query")),
    ("TOP 5 FROM train BY mmlu WHERE source = dolly", 40, ("column 41: expected a value ('string', "
     "number, TRUE, FALSE or NULL) after =, found name dolly")),
    ("TOP 5 FROM train BY mmlu WHERE source == 'dolly'", 39, ("column 40: expected a value "
     "('string', number, TRUE, FALSE or NULL) after =, found '='")),
    ("TOP 5 FROM train BY mmlu WHERE source 'dolly'", 38, ("column 39: expected an operator (=, !=,"
     " <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE or IS) after source, found string 'dolly'")),
    ("TOP 5 FROM train BY mmlu WHERE a = 1 AND", 40, ("column 41: expected a condition (a field "
     "name, NOT or '(') after AND, found end of query")),
    ("TOP 5 FROM train BY mmlu WHERE (a = 1 OR b = 2", 46,
     "column 47: expected ')' to close the '(' at column 32, found end of query"),
    ("TOP 5 FROM train BY mmlu WHERE a = 1)", 36, ("column 37: expected AND, OR, a clause "
     "(COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or WHERE) or end of query, found ')'")),
    ("TOP 5 FROM train BY mmlu WHERE a IN ()", 37, ("column 38: expected a value ('string', "
     "number, TRUE, FALSE or NULL) after '(', found ')'")),
    ("TOP 5 FROM train BY mmlu WHERE a IN (1 2)", 39,
     "column 40: expected ',' or ')' in the IN list, found number 2"),
    ("TOP 5 FROM train BY mmlu WHERE a IN 1", 36,
     "column 37: expected '(' after IN, found number 1"),
    ("TOP 5 FROM train BY mmlu WHERE a LIKE x", 38,
     "column 39: expected a 'pattern' string after LIKE, found name x"),
    ("TOP 5 FROM train BY mmlu WHERE a LIKE 'x\\'", 38, ("column 39: expected a LIKE pattern that "
     "does not end in a lone backslash, found string 'x\\'")),
    ("TOP 5 FROM train BY mmlu WHERE a IS 1", 36,
     "column 37: expected NULL or NOT NULL after IS, found number 1"),
    ("TOP 5 FROM train BY mmlu WHERE a IS NOT TRUE", 40,
     "column 41: expected NULL after IS NOT, found keyword TRUE"),
    ("TOP 5 FROM train BY mmlu WHERE a NOT = 1", 37,
     "column 38: expected IN or LIKE after NOT, found '='"),
    ("TOP 5 FROM train BY mmlu WHERE source = 'dolly", 40, ("column 41: expected a closing ' for "
     "the string that starts here, found end of query")),
    ('TOP 5 FROM "train BY mmlu', 11,
     'column 12: expected a closing " for the name that starts here, found end of query'),
    ('TOP 5 FROM "" BY mmlu', 11,
     'column 12: expected a name inside the double quotes, found empty name ""'),
    ("TOP 5 FROM train BY mmlu WHERE a = 1 & b = 2", 37, ("column 38: expected a query token "
     "(double-quote names that hold other characters), found character '&'")),
    ("TOP 5 FROM train BY m\u00e9lange", 21, ("column 22: expected a query token (double-quote "
     "names that hold other characters), found character '\u00e9'")),
    ("TOP 5 FROM train\x00 BY mmlu", 16, ("column 17: expected a query token (double-quote names "
     "that hold other characters), found character U+0000")),
    ("TOP 5 FROM 1b-pool BY mmlu", 11, ("column 12: expected a number (double-quote names that "
     "start with a digit), found '1b-pool'")),
    ("TOP 5 FROM train BY mmlu WHERE t < 1e999", 35,
     "column 36: expected a number within the range of a double, found number 1e999"),
    ("TOP 5\nFROM train\nBY", 19,
     "line 3, column 3: expected a task name after BY, found end of query"),
    ("TOP 5 FROM train BY mmlu WHERE 'source' = 'x'", 31, ("column 32: expected a condition (a "
     "field name, NOT or '(') after WHERE, found string 'source'")),
    ("TOP 5 FROM train BY mmlu WHERE a = 1 WHERE b = 2", 37, ("column 38: expected at most one "
     "WHERE clause, found a second WHERE (the first is at column 26)")),
]


@pytest.mark.parametrize("text,position,message", ERRORS)
def test_error_messages(text, position, message):
    with pytest.raises(QuerySyntaxError) as info:
        parse(text)
    assert str(info.value) == message
    assert info.value.position == position
    assert info.value.query == text
    assert info.value.expected and info.value.expected in message


def test_long_tokens_are_shortened_in_messages():
    with pytest.raises(QuerySyntaxError) as info:
        parse("TOP 5 FROM train BY mmlu WHERE a = 1 'a very long string value that goes on'")
    assert str(info.value).endswith("found string 'a very long string value tha...")


def test_error_is_a_gradstore_error_and_a_value_error():
    with pytest.raises(GradstoreError):
        parse("TOP")
    with pytest.raises(ValueError):
        parse("TOP")


def test_non_string_input():
    with pytest.raises(QuerySyntaxError, match="must be a string"):
        parse(None)  # type: ignore[arg-type]
    with pytest.raises(QuerySyntaxError, match="must be a string"):
        parse(b"TOP 5 FROM t BY a")  # type: ignore[arg-type]


def test_parse_condition_rejects_trailing_tokens():
    with pytest.raises(QuerySyntaxError, match=r"^column 7: expected AND, OR or end of "
                                               r"condition, found name b$"):
        parse_condition("a = 1 b")


# -- limits: depth, size, numbers ---------------------------------------------------------

def test_parentheses_up_to_the_limit_parse():
    cond = "(" * MAX_DEPTH + "a = 1" + ")" * MAX_DEPTH
    assert same(W(cond), Compare("a", "=", 1))


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deep_parentheses_are_a_syntax_error(depth):
    text = "SCORE FROM t BY a WHERE " + "(" * depth + "a = 1" + ")" * depth
    with pytest.raises(QuerySyntaxError, match="expected at most 100 nested parentheses"):
        parse(text)


def test_long_and_chains_and_not_chains_are_capped():
    ok = " AND ".join(["a = 1"] * MAX_DEPTH)
    assert parse_condition(ok).to_text() == ok
    for text in (" AND ".join(["a = 1"] * (MAX_DEPTH + 1)), " OR ".join(["a = 1"] * 5000),
                 "NOT " * 100_000 + "a = 1", "NOT (" * 5000 + "a = 1" + ")" * 5000):
        with pytest.raises(QuerySyntaxError, match="levels deep|nested parentheses"):
            parse("SCORE FROM t BY a WHERE " + text)


def test_huge_inputs():
    with pytest.raises(QuerySyntaxError, match="at most 4300 digits"):
        parse("TOP " + "9" * 10_000 + " FROM t BY a")
    with pytest.raises(QuerySyntaxError, match="greater than 0 and at most 100"):
        parse("TOP " + "9" * 400 + "% FROM t BY a")
    big = parse("TOP " + "9" * 400 + " FROM t BY a")
    assert big.top_k == int("9" * 400)
    tasks = [f"t{i}" for i in range(20_000)]
    assert parse("SCORE FROM t BY " + ", ".join(tasks)).tasks == tuple(tasks)
    values = ", ".join(str(i) for i in range(20_000))
    assert len(W(f"a IN ({values})").values) == 20_000
    with pytest.raises(QuerySyntaxError):
        parse("TOP 5 FROM t BY a " + "-- x\n" * 100_000 + "WHERE")


# -- round trip: AST -> to_text -> parse ----------------------------------------------------

IDENT_FIRST = string.ascii_letters + "_"
IDENT_REST = string.ascii_letters + string.digits + "_.-"
idents = st.builds(lambda a, b: a + b, st.sampled_from(IDENT_FIRST),
                   st.text(IDENT_REST, max_size=8))
names = st.one_of(idents, st.sampled_from(sorted(KEYWORDS) + ["all", "ALL", "mean", "a--b"]),
                  st.from_regex(r"[0-9]{1,4}", fullmatch=True), st.text(min_size=1, max_size=10))
values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
fields = names
like_patterns = st.text(alphabet="ab%_\\'x", max_size=8).filter(
    lambda p: (len(p) - len(p.rstrip("\\"))) % 2 == 0)
leaves = st.one_of(
    st.builds(Compare, fields, st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), values),
    st.builds(InList, fields, st.lists(values, min_size=1, max_size=4).map(tuple), st.booleans()),
    st.builds(Like, fields, like_patterns, st.booleans()),
    st.builds(IsNull, fields, st.booleans()),
)
exprs = st.recursive(leaves, lambda kids: st.one_of(
    st.builds(And, kids, kids), st.builds(Or, kids, kids), st.builds(Not, kids)), max_leaves=12)
encodings = st.sampled_from(all_names() + ["absmax8-global", "absmean4-centered",
                                           "absmax2-global-centered", "sign1-centered"])


@st.composite
def queries(draw):
    head = draw(st.sampled_from(["k", "p", "score"]))
    return Query(
        explain=draw(st.booleans()),
        top_k=draw(st.integers(1, 10**12)) if head == "k" else None,
        top_percent=draw(st.floats(0, 100, exclude_min=True)) if head == "p" else None,
        set_name=draw(names),
        tasks=tuple(draw(st.lists(names, min_size=1, max_size=4, unique=True))),
        combine=draw(st.sampled_from(["mean", "max", "sum"])),
        agg=draw(st.sampled_from(["max", "mean"])),
        checkpoints=draw(st.none() | st.lists(names, min_size=1, max_size=4, unique=True)
                         .map(tuple)),
        weight=draw(st.sampled_from(["lr", "uniform"])),
        encoding=draw(st.none() | encodings),
        mode=draw(st.sampled_from([None, "symmetric", "asymmetric"])),
        rerank=(rerank := None if head == "score" else draw(st.none() | encodings)),
        oversample=None if rerank is None else draw(st.none() | st.floats(1, 10**6)),
        where=draw(st.none() | exprs),
    )


@fuzz(800)
@given(queries())
def test_round_trip_query(query):
    text = query.to_text()
    again = parse(text)
    assert same(again, query), text
    assert again.to_text() == text


@fuzz(1000)
@given(exprs)
def test_round_trip_condition(expr):
    assert same(parse_condition(expr.to_text()), expr)


@fuzz(150)
@given(queries(), st.randoms(use_true_random=False))
def test_round_trip_survives_case_and_whitespace_changes(query, rnd):
    """Re-case keywords and re-space tokens: the query means the same thing."""
    text = query.to_text()
    pieces = []
    for tok in tokenize(text)[:-1]:
        piece = tok.text
        if tok.kind == "keyword":
            piece = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in piece)
        pieces.append(piece)
    seps = [" ", "\n", "\t", "  ", " -- note\n"]
    spaced = "".join(p + rnd.choice(seps) for p in pieces)
    assert same(parse(spaced), query)


# -- fuzzing: nothing but QuerySyntaxError escapes ----------------------------------------

def check_parse(text):
    try:
        query = parse(text)
    except QuerySyntaxError as e:
        assert 0 <= e.position <= len(text)
        assert e.expected
        assert "\n" not in str(e)
        assert str(e).startswith(("column ", "line "))
        return None
    # whatever parses must print back to text that parses to the same query
    assert same(parse(query.to_text()), query)
    return query


QUERYISH = ("TOP SCORE EXPLAIN FROM BY COMBINE AGG OVER CHECKPOINTS WEIGHT ENCODING MODE RERANK OVERSAMPLE "
            "WHERE AND OR NOT IN LIKE IS NULL TRUE FALSE mean max sum all lr uniform subtasks "
            "symmetric asymmetric sign1 absmax8-global train mmlu epoch-1 x 5 -1 0 2.5 1e3 "
            "101 % , ( ) = != <> < <= > >= 'a' 'it''s' '' \"q\" \"\" -- \n ' \" . - @ é \x00 \\")
fragments = st.sampled_from(QUERYISH.split(" ") + [" ", "\n", "--", "'", '"'])
queryish_text = st.lists(fragments, max_size=30).map(lambda parts: " ".join(parts))
glued_text = st.lists(fragments, max_size=30).map(lambda parts: "".join(parts))


@fuzz(7000)
@given(st.text(max_size=60))
def test_fuzz_arbitrary_text(text):
    check_parse(text)


@fuzz(4000)
@given(st.one_of(queryish_text, glued_text))
def test_fuzz_query_like_text(text):
    check_parse(text)


@fuzz(1000)
@given(st.text(alphabet=st.characters(), max_size=400), st.integers(0, 3))
def test_fuzz_any_code_point_including_surrogates(text, where):
    prefix = ["", "TOP 5 FROM t BY a WHERE x = '", "SCORE FROM \"", "TOP 5 FROM t BY a "][where]
    check_parse(prefix + text)


@st.composite
def mutated_queries(draw):
    text = draw(queries()).to_text()
    toks = [t.text for t in tokenize(text)[:-1]]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "insert", "swap", "duplicate", "replace"]))
        i = draw(st.integers(0, len(toks) - 1))
        if op == "delete" and len(toks) > 1:
            del toks[i]
        elif op == "insert":
            toks.insert(i, draw(fragments))
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        else:
            toks[i] = draw(fragments)
    return draw(st.sampled_from([" ", ""])).join(toks)


@fuzz(2500)
@given(mutated_queries())
def test_fuzz_mutated_valid_queries(text):
    check_parse(text)


@fuzz(300)
@given(queries(), st.data())
def test_fuzz_every_prefix_of_a_valid_query(query, data):
    text = query.to_text()
    cut = data.draw(st.integers(0, len(text)))
    check_parse(text[:cut])


# -- evaluate(): truth tables against Python ------------------------------------------------

NUMS = [None, -1, 0, 1, 2.5]
STRS = [None, "", "a", "b", "ab"]
MISSING = object()


def row_of(**kw):
    return {k: v for k, v in kw.items() if v is not MISSING}


PY_OPS = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
          "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


@pytest.mark.parametrize("op", list(PY_OPS))
def test_compare_truth_table_numbers_and_strings(op):
    for domain in (NUMS, STRS):
        for a, b in itertools.product(domain + [MISSING], domain):
            expr = W(f"x {op} {Compare('x', op, b).to_text().split(' ', 2)[2]}")
            got = expr.evaluate(row_of(x=a))
            want = a is not MISSING and a is not None and b is not None and PY_OPS[op](a, b)
            assert got == want, (a, op, b)
            # NOT (x op v) holds exactly when both sides are known and x op v does not
            assert Not(expr).evaluate(row_of(x=a)) == (
                a is not MISSING and a is not None and b is not None and not PY_OPS[op](a, b))


@pytest.mark.parametrize("op", list(PY_OPS))
def test_mixed_kinds_compare_false_not_raise(op):
    for a, b in [(1, "1"), ("a", 0), (True, 1), (1, True), (1.0, "x"), ([1], 1), ({}, "a")]:
        assert Compare("x", op, b).evaluate({"x": a}) is False
        assert Not(Compare("x", op, b)).evaluate({"x": a}) is False


def test_booleans_compare_with_booleans():
    assert W("flag = TRUE").evaluate({"flag": True})
    assert not W("flag = TRUE").evaluate({"flag": False})
    assert W("flag != TRUE").evaluate({"flag": False})
    assert not W("flag = TRUE").evaluate({"flag": 1})


def test_int_and_float_compare():
    assert W("x = 1").evaluate({"x": 1.0})
    assert W("x < 1.5").evaluate({"x": 1})


@pytest.mark.parametrize("cond,py", [
    ("a = 1 AND b = 'x'", lambda a, b, c: a == 1 and b == "x"),
    ("a = 1 OR b = 'x'", lambda a, b, c: a == 1 or b == "x"),
    ("a = 1 OR b = 'x' AND c", lambda a, b, c: a == 1 or (b == "x" and c)),
    ("(a = 1 OR b = 'x') AND c", lambda a, b, c: (a == 1 or b == "x") and c),
    ("NOT a = 1 AND c", lambda a, b, c: (a != 1) and c),
    ("NOT (a = 1 AND c)", lambda a, b, c: not (a == 1 and c)),
    ("NOT NOT c OR a > 0", lambda a, b, c: c or a > 0),
    ("a IN (0, 2) OR b NOT IN ('x', 'y')", lambda a, b, c: a in (0, 2) or b not in ("x", "y")),
    ("b LIKE 'x%' AND NOT a <= 0", lambda a, b, c: b.startswith("x") and not a <= 0),
    ("a >= 1 AND a < 2 OR NOT (b != 'y' OR c)",
     lambda a, b, c: (a >= 1 and a < 2) or not (b != "y" or c)),
])
def test_two_valued_truth_tables_match_python(cond, py):
    """With every field present and of the right kind, conditions are plain boolean logic."""
    cond = cond.replace(" c", " c = TRUE").replace("(c", "(c = TRUE")
    expr = W(cond)
    for a, b, c in itertools.product([-1, 0, 1, 2, 1.5], ["x", "xy", "y", ""], [True, False]):
        assert expr.evaluate({"a": a, "b": b, "c": c}) == bool(py(a, b, c)), (cond, a, b, c)


def test_three_valued_logic_tables():
    t, f, u = W("k = 1"), W("k = 2"), W("missing = 1")
    row = {"k": 1}
    assert (t.truth(row), f.truth(row), u.truth(row)) == (True, False, None)
    table = {  # SQL's Kleene logic
        (True, True): (True, True), (True, False): (False, True), (True, None): (None, True),
        (False, False): (False, False), (False, None): (False, None), (None, None): (None, None),
    }
    nodes = {True: t, False: f, None: u}
    for (a, b), (and_, or_) in table.items():
        for x, y in ((a, b), (b, a)):
            assert And(nodes[x], nodes[y]).truth(row) is and_
            assert Or(nodes[x], nodes[y]).truth(row) is or_
    assert Not(u).truth(row) is None and not Not(u).evaluate(row)
    assert Or(u, t).evaluate(row) and not And(u, t).evaluate(row)


def test_in_list_semantics():
    assert W("x IN (1, 2)").evaluate({"x": 2})
    assert not W("x IN (1, 2)").evaluate({"x": 3})
    assert W("x NOT IN (1, 2)").evaluate({"x": 3})
    assert not W("x NOT IN (1, 2)").evaluate({})
    assert not W("x IN (1, 2)").evaluate({})
    assert W("x IN (1, NULL)").evaluate({"x": 1})
    assert W("x IN (1, NULL)").truth({"x": 3}) is None   # as in SQL
    assert not W("x NOT IN (1, NULL)").evaluate({"x": 3})
    assert not W("x IN ('1')").evaluate({"x": 1})


def test_is_null_semantics():
    for row, null in [({}, True), ({"x": None}, True), ({"x": 0}, False), ({"x": ""}, False)]:
        assert W("x IS NULL").evaluate(row) is null
        assert W("x IS NOT NULL").evaluate(row) is (not null)
        assert W("NOT x IS NULL").evaluate(row) is (not null)
    assert W("x = NULL").truth({"x": None}) is None


def test_dotted_fields_fall_back_to_nested_dicts():
    assert W("meta.source = 'a'").evaluate({"meta.source": "a"})
    assert W("meta.source = 'a'").evaluate({"meta": {"source": "a"}})
    assert not W("meta.source = 'a'").evaluate({"meta": "source"})
    assert W("meta.source IS NULL").evaluate({"meta": {}})


@pytest.mark.parametrize("pattern,text,hit", [
    ("cot_%", "cot_1", True), ("cot_%", "cot_", True), ("cot_%", "cot", False),
    ("cot_%", "COT_1", False), ("%dolly%", "x-dolly-y", True), ("a_c", "abc", True),
    ("a_c", "abbc", False), ("a_c", "ac", False), ("%", "", True), ("", "", True),
    ("", "a", False), ("a", "ab", False), ("a", "ba", False), ("a.c", "abc", False),
    ("a.c", "a.c", True), ("100\\%", "100%", True), ("100\\%", "1000", False),
    ("a\\_b", "a_b", True), ("a\\_b", "axb", False), ("a\\\\b", "a\\b", True),
    ("(x)*[y]", "(x)*[y]", True), ("%\n%", "a\nb", True), ("_", "\n", True),
])
def test_like_patterns(pattern, text, hit):
    assert (compile_like(pattern).fullmatch(text) is not None) is hit
    assert Like("f", pattern).evaluate({"f": text}) is hit
    assert Like("f", pattern, True).evaluate({"f": text}) is (not hit)


def test_like_on_non_strings_is_unknown():
    assert Like("f", "1%").truth({"f": 12}) is None
    assert Like("f", "1%", True).truth({"f": 12}) is None
    with pytest.raises(ValueError):
        compile_like("x\\")


@fuzz(500)
@given(exprs, st.dictionaries(st.sampled_from(["a", "b", "all", "x"]), values, max_size=4))
def test_evaluate_never_raises_and_not_means_complement_when_known(expr, row):
    result = expr.truth(row)
    assert result in (True, False, None)
    assert expr.evaluate(row) is (result is True)
    negated = Not(expr).truth(row)
    assert negated is (None if result is None else not result)


@fuzz(500)
@given(st.sampled_from(["a", "b"]), values, values, st.lists(values, min_size=1, max_size=3))
def test_derived_forms_agree(field, value, cell, options):
    row = {field: cell}
    for op, neg in (("=", "!="), ("<", ">="), (">", "<=")):
        assert Not(Compare(field, op, value)).evaluate(row) == \
            Compare(field, neg, value).evaluate(row)
    in_list = InList(field, tuple(options))
    as_or = Compare(field, "=", options[0])
    for option in options[1:]:
        as_or = Or(as_or, Compare(field, "=", option))
    assert in_list.truth(row) is as_or.truth(row)
    assert InList(field, tuple(options), True).truth(row) is Not(as_or).truth(row)


# -- the AST itself -------------------------------------------------------------------------

def test_query_validates_its_fields():
    for bad in [{"top_k": 0}, {"top_k": 5, "top_percent": 5.0}, {"top_percent": 0.0},
                {"top_percent": 100.1}, {"set_name": ""}, {"tasks": ()},
                {"combine": "median"}, {"agg": "sum"}, {"weight": "x"}, {"mode": "fast"},
                {"checkpoints": ()}, {"top_k": True}, {"top_k": 2.0}]:
        with pytest.raises(ValueError, match="invalid Query"):
            Q(**bad)


def test_ast_nodes_are_frozen_hashable_and_coerce_lists():
    q = Q(top_k=1, tasks=["a", "b"], checkpoints=["e1"], where=InList("x", [1, 2]))
    assert q.tasks == ("a", "b") and q.checkpoints == ("e1",) and q.where.values == (1, 2)
    assert hash(q) == hash(parse(q.to_text()))
    with pytest.raises(AttributeError):
        q.top_k = 2  # type: ignore[misc]
    assert q.where.fields() == {"x"}
    assert W("a = 1 AND (b IS NULL OR NOT c LIKE 'x')").fields() == {"a", "b", "c"}
    assert not q.is_score and Q().is_score


def test_to_text_refuses_values_the_language_cannot_hold():
    with pytest.raises(ValueError):
        Compare("x", "=", float("nan")).to_text()
    with pytest.raises(TypeError):
        Compare("x", "=", [1]).to_text()  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Compare("x", "==", 1)
    with pytest.raises(ValueError):
        InList("x", ())


def test_odd_names_print_quoted():
    # every name, even a keyword, an empty-looking or a control-character one, prints quoted
    for name in ["WHERE", "all", "a--b", "x y", "\x00", "é", "1.5", "-1", '"']:
        q = Q(set_name=name, tasks=(name,), checkpoints=(name,),
              where=Compare(name, "=", name))
        assert same(parse(q.to_text()), q)


# -- the reference page's examples stay true ------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "query.md"


def doc_blocks(kind: str) -> list[str]:
    """The fenced blocks of docs/query.md whose fence names `kind` ("" for a bare fence)."""
    blocks, current, lang = [], None, ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```") and current is None:
            current, lang = [], line[3:].strip()
        elif line.startswith("```"):
            if lang == kind:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_doc_query_examples_parse():
    lines = [line for block in doc_blocks("sql") for line in block.splitlines() if line.strip()]
    assert len(lines) > 20
    for line in lines:
        if line.startswith("WHERE"):
            parse("SCORE FROM train BY mmlu " + line)
        else:
            parse(line)


def test_doc_error_examples_are_exact():
    (block,) = [b for b in doc_blocks("") if "column 20:" in b]
    pairs = [chunk.splitlines() for chunk in block.strip().split("\n\n")]
    assert len(pairs) >= 12
    for text, message in pairs:
        with pytest.raises(QuerySyntaxError) as info:
            parse(text)
        assert str(info.value) == message
