"""Deterministic graders: pure functions on strings, and reward factories built on them.

Pure functions (strings in, values out; no rollout):
  extract_answer(text, method)     final answer: <answer> tag, \\boxed{}, "#### x", "answer: x", or last number
  normalize(text)                  lowercase, no punctuation/articles/extra spaces (SQuAD-style)
  parse_number(text)               "1,234.5", "$12", "3/4", "\\frac{3}{4}", "50%" (-> 50) -> float, else None
  numbers_equal(a, b, ...)         numeric equality within rel_tol/abs_tol (strings are parsed)
  math_equal(pred, gold)           symbolic equivalence with math-verify; else numeric/normalized compare
  json_parse(text)                 the JSON value in text (a ```json block, raw, or the first {...}/[...])
  json_schema_errors(obj, schema)  list of "path: message" (jsonschema); [] when valid
  sql_parses(sql, dialect)         True if sqlglot parses the statement
  sql_result_match(pred, gold, db) 1.0 if both queries return the same rows on a read-only SQLite db
  word_count(text), sentence_count(text), char count is len(text)
  citations(text)                  ids cited as [doc-12], [12], [1, 3] (markdown links excluded)
  citation_precision_recall(c, r)  (precision, recall) of cited ids against relevant ids

Reward factories (each returns a plain function of a Rollout, named after the factory; expected
values come from ``rollout.ground_truth`` or the named field of ``rollout.example``):
  exact_match(field, normalize, method)   1 if the extracted answer equals the expected one (or any in a list)
  numeric_match(field, rel_tol, abs_tol)  1 if the extracted number equals the expected number
  math_match(field)                       1 if the answer is mathematically equivalent (math_equal)
  tag_format(tag, strict)                 1 if the completion has exactly one non-empty <tag>...</tag>
  regex_match(pattern, field)             1 if the pattern (or the example's field) is found in the completion
  json_valid()                            1 if the completion contains parseable JSON
  json_schema(schema, field)              1 if that JSON validates against the schema
  json_fields_match(fields, field)        fraction of the expected object's fields (dotted paths) matched
  sql_match(db_field, field)              sql_result_match of the completion's SQL vs the expected SQL
  word_limit / sentence_limit / char_limit(max_, min_)  1 inside the limits, decreasing linearly outside
  required_phrases(phrases, field)        fraction of the phrases present
  forbidden_phrases(phrases, field)       1 if none of the phrases is present, else 0
  citation_f1(field, as_dict)             F1 (or precision/recall/F1 components) of the citations
  tool_usage(min_calls, max_calls, required_tools)  calls within bounds x fraction of required tools used
  length_penalty(target_tokens, buffer_tokens)      0 up to target, down to -1 at target+buffer (DAPO)

Optional dependencies (extra ``rewards``): math-verify, jsonschema, sqlglot. They are imported
inside the functions that need them.

By kind, one module each (import them all from here, ``rlft.rewards.checks``): ``answers.py``
(final answers, numbers, math, tag format), ``structured.py`` (JSON and SQL), ``text.py``
(length, phrases, regex, citations), ``usage.py`` (tool calls, sampled length); ``common.py``
holds what they share (the expected value from the rollout, naming, optional imports).
"""

from rlft.rewards.checks.answers import (
    exact_match,
    extract_answer,
    last_number,
    math_equal,
    math_match,
    normalize,
    numbers_equal,
    numeric_match,
    parse_number,
    tag_format,
)
from rlft.rewards.checks.common import Check as Check  # the type of what a factory returns
from rlft.rewards.checks.structured import (
    json_fields_match,
    json_parse,
    json_schema,
    json_schema_errors,
    json_valid,
    sql_match,
)
from rlft.rewards.checks.text import (
    char_limit,
    citation_f1,
    citation_precision_recall,
    citations,
    forbidden_phrases,
    regex_match,
    required_phrases,
    sentence_count,
    sentence_limit,
    word_count,
    word_limit,
)
from rlft.rewards.checks.usage import length_penalty, tool_usage
from rlft.rewards.sql import extract_sql, sql_parses, sql_result_match  # the SQL graders live there

__all__ = [
    "extract_answer", "last_number", "normalize", "parse_number", "numbers_equal", "math_equal", "json_parse",
    "json_schema_errors", "sql_parses", "sql_result_match", "extract_sql", "word_count", "sentence_count",
    "citations", "citation_precision_recall", "exact_match", "numeric_match", "math_match", "tag_format",
    "regex_match", "json_valid", "json_schema", "json_fields_match", "sql_match", "word_limit", "sentence_limit",
    "char_limit", "required_phrases", "forbidden_phrases", "citation_f1", "tool_usage", "length_penalty",
]
