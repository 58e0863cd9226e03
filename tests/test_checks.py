"""Deterministic graders: the string functions and the reward factories built on them.

Tests that need an optional dependency of the ``rewards`` extra (math-verify, jsonschema,
sqlglot) are skipped when it is not installed."""

import asyncio
import sqlite3
import threading

import pytest

from rlft.rewards import Reward, score_group
from rlft.rewards import checks as C
from rlft.rewards.checks import answers
from rlft.types import Rollout, Termination


def ro(text="", tool_calls=None, mask=None, **example):
    msg = {"role": "assistant", "content": text}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return Rollout(example={"prompt": "q", **example}, messages=[{"role": "user", "content": "q"}, msg],
                   mask=mask or [], termination=Termination.FINISHED)


# -- answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,method,want", [
    ("think... <answer> 42 </answer>", "tag", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "tag", "2"),
    ("no tag", "tag", None),
    (r"so $\boxed{\frac{1}{2}}$.", "boxed", r"\frac{1}{2}"),
    (r"\boxed{a} and \boxed{\{1, 2\}}", "boxed", r"\{1, 2\}"),
    (r"\boxed 7.", "boxed", "7"),
    ("I have 3 apples and 1,250.5 pears", "last_number", "1,250.5"),
    ("none here", "last_number", None),
    ("<answer>Paris</answer> \\boxed{Rome}", "auto", "Paris"),
    (r"work \boxed{12}", "auto", "12"),
    ("steps\n#### 1,000\n", "auto", "1,000"),
    ("So the final answer is 17.", "auto", "17"),
    ("Answer: blue", "auto", "blue"),
    ("  just text  ", "auto", "just text"),
    ("", "auto", None),
])
def test_extract_answer_by_method(text, method, want):
    assert C.extract_answer(text, method) == want


def test_extract_answer_rejects_unknown_method():
    with pytest.raises(ValueError):
        C.extract_answer("x", "magic")


def test_normalize_ignores_case_punctuation_articles_and_spaces():
    assert C.normalize("  The  Eiffel-Tower!! ") == C.normalize("eiffel tower")
    assert C.normalize(r"\text{Paris}") == "paris"


@pytest.mark.parametrize("text,value", [
    ("42", 42.0), ("-3.5", -3.5), ("1,234,567", 1234567.0), ("$12.50", 12.5), ("50%", 50.0), ("3/4", 0.75),
    (r"\frac{3}{4}", 0.75), (r"-\frac{1}{2}", None), ("1e-3", 0.001), (r"5 \text{ cm}", 5.0), ("abc", None),
    ("1/0", None), (7, 7.0), (True, None), (None, None),
])
def test_parse_number(text, value):
    assert C.parse_number(text) == value


def test_numbers_equal_with_tolerances():
    assert C.numbers_equal("1,000", 1000) and C.numbers_equal("0.3333333", "1/3", rel_tol=1e-6)
    assert not C.numbers_equal("1.01", "1") and C.numbers_equal("1.01", "1", abs_tol=0.02)
    assert not C.numbers_equal("x", "1")


def test_math_equal_symbolic_and_numeric():
    pytest.importorskip("math_verify")
    assert C.math_equal(r"\frac{1}{2}", "0.5")
    assert C.math_equal("(x+1)^2", "x^2+2x+1")
    assert C.math_equal(r"\{1, 2\}", r"\{2, 1\}")
    assert not C.math_equal("3", "4")
    assert C.math_equal("The answer is 12", "12")


def test_math_equal_works_off_the_main_thread():  # rewards run in worker threads
    pytest.importorskip("math_verify")
    out = {}
    th = threading.Thread(target=lambda: out.update(v=C.math_equal(r"\sqrt{4}", "2")))
    th.start()
    th.join()
    assert out["v"] is True


def test_math_equal_falls_back_without_math_verify(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mv(name, *a, **k):
        if name == "math_verify":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mv)
    monkeypatch.setattr(answers, "_mv_warned", False)  # the warn-once flag lives beside math_equal
    with pytest.warns(UserWarning, match="math-verify"):
        assert C.math_equal("1/2", "0.5")
    assert not C.math_equal("x+1", "1+x")  # symbolic equivalence needs math-verify
    assert C.math_equal("Blue", "blue")


# -- JSON ---------------------------------------------------------------------------------------
def test_json_parse_accepts_fenced_raw_and_embedded():
    assert C.json_parse('```json\n{"a": 1}\n```') == {"a": 1}
    assert C.json_parse('[1, 2]') == [1, 2]
    assert C.json_parse('Sure! Here it is: {"a": {"b": [1]}} hope it helps') == {"a": {"b": [1]}}
    with pytest.raises(ValueError):
        C.json_parse("no json {here")


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_json_schema_errors_name_the_path():
    pytest.importorskip("jsonschema")
    assert C.json_schema_errors({"name": "a", "age": 3}, SCHEMA) == []
    errs = C.json_schema_errors({"name": "a", "age": "3"}, SCHEMA)
    assert len(errs) == 1 and errs[0].startswith("age:")
    assert any("required" in e for e in C.json_schema_errors({}, SCHEMA))


# -- SQL ----------------------------------------------------------------------------------------
@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "shop.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL);
        INSERT INTO items(name, price) VALUES ('apple', 1.5), ('pear', 2.0), ('fig', 3.25), ('kiwi', 2.0);
    """)
    con.commit()
    con.close()
    return str(path)


def test_sql_parses():
    pytest.importorskip("sqlglot")
    assert C.sql_parses("SELECT a FROM t WHERE b > 1")
    assert not C.sql_parses("SELEC a FROM")
    assert not C.sql_parses("SELECT (a FROM t")


def test_sql_result_match_ignores_row_order_unless_gold_orders(db):
    gold = "SELECT name FROM items WHERE price = 2.0"
    assert C.sql_result_match("SELECT name FROM items WHERE price > 1.9 AND price < 2.1", gold, db) == 1.0
    assert C.sql_result_match("SELECT name FROM items WHERE price = 2.0 ORDER BY name DESC", gold, db) == 1.0
    assert C.sql_result_match("SELECT name FROM items", gold, db) == 0.0
    ordered = "SELECT name FROM items ORDER BY price, name"
    assert C.sql_result_match("SELECT name FROM items ORDER BY price ASC, name ASC", ordered, db) == 1.0
    assert C.sql_result_match("SELECT name FROM items ORDER BY price DESC, name", ordered, db) == 0.0


def test_sql_result_match_compares_multisets(db):
    gold = "SELECT price FROM items"
    assert C.sql_result_match("SELECT DISTINCT price FROM items", gold, db) == 0.0


def test_sql_result_match_failing_prediction_scores_zero_and_gold_failure_raises(db):
    assert C.sql_result_match("SELECT nope FROM items", "SELECT name FROM items", db) == 0.0
    assert C.sql_result_match("not sql at all", "SELECT name FROM items", db) == 0.0
    with pytest.raises(ValueError, match="gold SQL failed"):
        C.sql_result_match("SELECT 1", "SELECT nope FROM items", db)


def test_sql_result_match_cannot_write_or_attach(db, tmp_path):
    gold = "SELECT count(*) FROM items"
    for bad in ["DELETE FROM items", "DROP TABLE items", "INSERT INTO items(name) VALUES ('x')",
                f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS x", "PRAGMA writable_schema = 1"]:
        assert C.sql_result_match(bad, gold, db) == 0.0
    assert not (tmp_path / "new.db").exists()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM items").fetchone() == (4,)


def test_sql_result_match_times_out_runaway_queries(db):
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    import time
    t0 = time.monotonic()
    assert C.sql_result_match(runaway, "SELECT 1", db, timeout=0.3) == 0.0
    assert time.monotonic() - t0 < 3


# -- text ---------------------------------------------------------------------------------------
def test_word_and_sentence_counts():
    assert C.word_count("It's a well-known fact, isn't it?") == 6
    assert C.word_count("") == 0
    assert C.sentence_count("Dr. Smith went home. He slept! Pi is 3.14 (roughly). Really?") == 4
    assert C.sentence_count("One line without a stop") == 1
    assert C.sentence_count("First para\n\nSecond para") == 2
    assert C.sentence_count("   ") == 0


def test_citations_and_precision_recall():
    text = "As shown [doc-12], and [3, 5]; see [a link](http://x) and [doc-12] again. [not an id here]"
    assert C.citations(text) == ["doc-12", "3", "5"]
    p, r = C.citation_precision_recall(["doc-12", "3", "5"], ["doc-12", "7"])
    assert p == pytest.approx(1 / 3) and r == 0.5
    assert C.citation_precision_recall([], []) == (1.0, 1.0)
    assert C.citation_precision_recall([], ["1"]) == (0.0, 0.0)
    assert C.citation_precision_recall(["1"], "1, 2") == (1.0, 0.5)


# -- reward factories -----------------------------------------------------------------------------
def test_factories_have_sensible_names():
    made = [C.exact_match(), C.numeric_match(), C.math_match(), C.tag_format(), C.regex_match("x"), C.json_valid(),
            C.json_schema(SCHEMA), C.json_fields_match(), C.sql_match(), C.word_limit(10), C.sentence_limit(2),
            C.char_limit(5), C.required_phrases(["a"]), C.forbidden_phrases(["a"]), C.citation_f1(), C.tool_usage(),
            C.length_penalty(10)]
    names = [f.__name__ for f in made]
    assert names == ["exact_match", "numeric_match", "math_match", "tag_format", "regex_match", "json_valid",
                     "json_schema", "json_fields_match", "sql_match", "word_limit", "sentence_limit", "char_limit",
                     "required_phrases", "forbidden_phrases", "citation_f1", "tool_usage", "length_penalty"]
    assert Reward(made[0]).name == "exact_match"


def test_exact_match_reads_ground_truth_or_a_field():
    f = C.exact_match()
    assert f(ro("<answer>The Paris.</answer>", ground_truth="paris")) == 1.0
    assert f(ro("<answer>Lyon</answer>", ground_truth=["Paris", "Lyon"])) == 1.0  # any alias
    assert f(ro("<answer>Rome</answer>", ground_truth="Paris")) == 0.0
    assert C.exact_match(normalize=False)(ro("<answer>paris</answer>", ground_truth="Paris")) == 0.0
    assert C.exact_match(field="city")(ro("Answer: Oslo", city="oslo")) == 1.0
    with pytest.raises(KeyError, match="no field 'city'"):
        C.exact_match(field="city")(ro("x"))


def test_numeric_match():
    f = C.numeric_match()
    assert f(ro("so we get\n#### 1,200", ground_truth="1200")) == 1.0
    assert f(ro(r"\boxed{0.5}", ground_truth="1/2")) == 1.0
    assert f(ro("The answer is 41 apples.", ground_truth=42)) == 0.0
    assert f(ro("The answer is 41.99 apples.", ground_truth=42)) == 0.0
    assert C.numeric_match(abs_tol=0.1)(ro("The answer is 41.95 apples.", ground_truth=42)) == 1.0
    assert f(ro("no idea", ground_truth=42)) == 0.0


def test_math_match():
    pytest.importorskip("math_verify")
    f = C.math_match()
    assert f(ro(r"so $\boxed{\frac{2}{4}}$", ground_truth="0.5")) == 1.0
    assert f(ro(r"\boxed{x^2+2x+1}", ground_truth="(x+1)^2")) == 1.0
    assert f(ro(r"\boxed{3}", ground_truth="4")) == 0.0


def test_tag_format():
    f, strict = C.tag_format(), C.tag_format(strict=True)
    assert f(ro("blah <answer>4</answer>")) == 1.0
    assert f(ro("<answer> </answer>")) == 0.0
    assert f(ro("<answer>1</answer><answer>2</answer>")) == 0.0
    assert f(ro("<answer>1")) == 0.0
    assert strict(ro("<think>hmm</think>\n<answer>4</answer>\n")) == 1.0
    assert strict(ro("blah <answer>4</answer>")) == 0.0


def test_regex_match():
    assert C.regex_match(r"\bdef \w+\(")(ro("def f(x): pass")) == 1.0
    assert C.regex_match(r"^yes$", flags=0)(ro("no")) == 0.0
    assert C.regex_match(field="pattern")(ro("code 123", pattern=r"\d{3}")) == 1.0


def test_json_valid_and_schema():
    pytest.importorskip("jsonschema")
    assert C.json_valid()(ro('```json\n{"a": 1}\n```')) == 1.0
    assert C.json_valid()(ro("{nope")) == 0.0
    f = C.json_schema(SCHEMA)
    assert f(ro('{"name": "Ann", "age": 30}')) == 1.0
    assert f(ro('{"name": "Ann", "age": "30"}')) == 0.0
    assert f(ro("not json")) == 0.0
    assert C.json_schema()(ro('{"x": 1}', schema='{"type": "object", "required": ["x"]}')) == 1.0


def test_json_fields_match_gives_partial_credit():
    gold = {"name": "Ann", "age": 30, "address": {"city": "Oslo"}}
    f = C.json_fields_match()
    assert f(ro('{"name": "ann", "age": 30.0, "address": {"city": "Oslo"}, "extra": 1}', ground_truth=gold)) == 1.0
    assert f(ro('{"name": "Ann", "age": 31}', ground_truth=gold)) == pytest.approx(1 / 3)
    assert f(ro("no json", ground_truth=gold)) == 0.0
    g = C.json_fields_match(fields=["name", "address.city"], field="target")
    target = '{"name": "Ann", "address": {"city": "oslo"}}'  # a JSON string is decoded
    assert g(ro('{"name": "Bob", "address": {"city": "Oslo"}}', target=target)) == 0.5


def test_sql_match_reads_the_sql_block_and_db_field(db):
    f = C.sql_match()
    text = "Here you go:\n```sql\nSELECT name FROM items WHERE price < 2;\n```"
    assert f(ro(text, ground_truth="SELECT name FROM items WHERE name = 'apple'", db_path=db)) == 1.0
    assert f(ro("SELECT name FROM items", ground_truth="SELECT name FROM items WHERE id = 1", db_path=db)) == 0.0


def test_length_limits_give_partial_credit_outside():
    text = " ".join(["word"] * 15)
    assert C.word_limit(max_words=20)(ro(text)) == 1.0
    assert C.word_limit(max_words=10)(ro(text)) == 0.5
    assert C.word_limit(max_words=5)(ro(text)) == 0.0
    assert C.word_limit(min_words=30)(ro(text)) == 0.5
    assert C.sentence_limit(max_sentences=2)(ro("One. Two. Three. Four.")) == 0.0
    assert C.sentence_limit(max_sentences=3)(ro("One. Two. Three. Four.")) == pytest.approx(2 / 3)
    assert C.char_limit(max_chars=10)(ro("x" * 12)) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        C.word_limit()


def test_required_and_forbidden_phrases():
    text = "Thank you for asking. As an AI, I think the answer is blue."
    assert C.required_phrases(["thank you", "blue", "green"])(ro(text)) == pytest.approx(2 / 3)
    assert C.required_phrases(field="must")(ro(text, must=["BLUE"])) == 1.0
    assert C.required_phrases(["BLUE"], case_sensitive=True)(ro(text)) == 0.0
    assert C.forbidden_phrases(["as an ai"])(ro(text)) == 0.0
    assert C.forbidden_phrases(["red", "green"])(ro(text)) == 1.0
    assert C.forbidden_phrases(field="banned")(ro(text, banned="I think")) == 0.0


def test_citation_f1_score_and_components():
    text = "Cats sleep a lot [doc-1][doc-2]. Dogs bark [doc-9]."
    assert C.citation_f1()(ro(text, relevant_ids=["doc-1", "doc-2"])) == pytest.approx(0.8)
    comps = C.citation_f1(as_dict=True)(ro(text, relevant_ids=["doc-1", "doc-2"]))
    assert comps == pytest.approx({"citation_precision": 2 / 3, "citation_recall": 1.0, "citation_f1": 0.8})


def _call(name):
    return {"id": name, "type": "function", "function": {"name": name, "arguments": {}}}


def test_tool_usage_reads_assistant_tool_calls():
    r = ro("done", tool_calls=[_call("search"), _call("search"), _call("open")])
    assert C.tool_usage(min_calls=1, max_calls=3, required_tools=["search", "open"])(r) == 1.0
    assert C.tool_usage(max_calls=2)(r) == 0.0
    assert C.tool_usage(required_tools=["search", "calc"])(r) == 0.5
    assert C.tool_usage(min_calls=1)(ro("no tools")) == 0.0
    multi = Rollout(example={}, messages=[{"role": "assistant", "content": "", "tool_calls": [_call("a")]},
                                          {"role": "tool", "content": "1"},
                                          {"role": "assistant", "content": "", "tool_calls": [_call("b")]},
                                          {"role": "tool", "content": "2"}, {"role": "assistant", "content": "ok"}])
    assert C.tool_usage(min_calls=2, required_tools=["a", "b"])(multi) == 1.0


def test_length_penalty_is_soft_overlong_punishment():
    f = C.length_penalty(100, buffer_tokens=50)
    assert f(ro(mask=[1] * 80 + [0] * 500)) == 0.0  # tool/prompt tokens do not count
    assert f(ro(mask=[1] * 125)) == pytest.approx(-0.5)
    assert f(ro(mask=[1] * 400)) == -1.0


def test_checks_score_through_the_reward_pipeline(db):
    rollouts = [ro("<answer>4</answer>", ground_truth="4"), ro("<answer>5</answer>", ground_truth="4"),
                ro("<answer>4</answer>")]  # no ground truth: that component errors and scores 0
    rewards = [Reward(C.numeric_match()), Reward(C.tag_format(), weight=0.5)]
    asyncio.run(score_group(rollouts, rewards))
    assert [r.rewards for r in rollouts] == [{"numeric_match": 1.0, "tag_format": 1.0},
                                             {"numeric_match": 0.0, "tag_format": 1.0},
                                             {"numeric_match": 0.0, "tag_format": 1.0}]
    assert [r.reward for r in rollouts] == [1.5, 0.5, 0.5]
    assert rollouts[2].errors and "ground_truth" in rollouts[2].errors[0].message


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_jsonschema(name, *a, **k):
        if name == "jsonschema":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    with pytest.raises(ImportError, match=r"rlft\[rewards\]"):
        C.json_schema_errors({}, SCHEMA)
