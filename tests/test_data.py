"""rlft.data: every format loads, every bad row is reported precisely, splits and batches are
deterministic, and resuming at step k yields the data an uninterrupted run would have seen."""

from __future__ import annotations

import csv
import json

import pytest

from rlft.data import Dataset, DatasetError, initial_messages, load_dataset

ROWS = [
    {"prompt": "What is 2+2?", "ground_truth": 4, "topic": "math"},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
     "ground_truth": {"answer": "Paris", "aliases": ["paris"]}, "topic": "geo"},
    {"prompt": "Say hi", "topic": None},
]


def _ids(examples):
    return [ex["example_id"] for ex in examples]


def _strip_ids(examples):
    return [{k: v for k, v in ex.items() if k != "example_id"} for ex in examples]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(source, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(source, **kw)
    return str(info.value)


# -- every format loads, keeping extra fields and ground_truth --------------------------------


def test_jsonl_loads_all_rows_with_extra_fields_and_ground_truth(tmp_path):
    ds = load_dataset(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert len(ds) == 3 and _ids(ds) == [0, 1, 2]
    assert _strip_ids(ds.examples) == ROWS


def test_json_loads_a_list_or_an_object_with_data_or_rows(tmp_path):
    for i, payload in enumerate([ROWS, {"data": ROWS}, {"rows": ROWS, "meta": 1}]):
        path = tmp_path / f"d{i}.json"
        path.write_text(json.dumps(payload))
        assert _strip_ids(load_dataset(path).examples) == ROWS


def test_csv_decodes_messages_keeps_other_cells_as_strings_and_empty_cells_as_none(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "messages", "ground_truth", "note"])
        w.writerow(["What is 2+2?", "", "4", "a, b"])
        w.writerow(["", json.dumps([{"role": "user", "content": "hi"}]), "", ""])
    ds = load_dataset(path)
    assert ds[0] == {"prompt": "What is 2+2?", "messages": None, "ground_truth": "4", "note": "a, b", "example_id": 0}
    assert ds[1]["messages"] == [{"role": "user", "content": "hi"}]
    assert ds[1]["prompt"] is None and ds[1]["ground_truth"] is None and ds[1]["note"] is None


def test_parquet_loads_nested_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": [{"role": "user", "content": "hi"}], "ground_truth": "hello", "level": 1},
            {"messages": [{"role": "user", "content": "bye"}], "ground_truth": "ciao", "level": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert _strip_ids(load_dataset(tmp_path / "d.parquet").examples) == rows


def test_hf_dataset_loads_and_a_dataset_dict_asks_for_a_split():
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "a", "ground_truth": "1"}, {"prompt": "b", "ground_truth": "2"}]
    hf = datasets.Dataset.from_list(rows)
    assert _strip_ids(load_dataset(hf).examples) == rows
    msg = _error(datasets.DatasetDict({"train": hf, "test": hf}))
    assert "['train', 'test']" in msg and "ds['train']" in msg


def test_list_of_dicts_loads_without_changing_the_callers_rows():
    rows = [dict(r) for r in ROWS]
    ds = load_dataset(rows)
    assert _strip_ids(ds.examples) == ROWS and rows == ROWS  # no example_id added to the input
    assert load_dataset(ds) is ds


# -- every failure names the source, the row and the field ------------------------------------


@pytest.mark.parametrize(
    "bad_row, field, words",
    [
        ({"ground_truth": 1}, "prompt", "missing"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt", "exactly one"),
        ({"prompt": "   "}, "prompt", "non-empty string"),
        ({"messages": "hello"}, "messages", "must be a list"),
        ({"messages": []}, "messages", "empty"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "'bot' is not one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "messages[1].role", "last message has role 'assistant'"),
        ({"prompt": "x", "example_id": 7}, "example_id", "reserved"),
        ({"prompt": "x", "split": "dev"}, "split", "'dev' is not one of"),
        ({"prompt": "x", "split": ["train"]}, "split", "is not one of"),
    ],
)
def test_bad_row_error_names_file_line_and_field(tmp_path, bad_row, field, words):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, bad_row])
    msg = _error(path)
    assert str(path) in msg and f"line 2, field '{field}'" in msg and words in msg
    assert "1-based line" in msg


def test_error_for_a_list_names_the_index_and_a_non_object_row():
    msg = _error([{"prompt": "ok"}, "just a string"], name="mine")
    assert "'mine'" in msg and "index 1: must be an object" in msg and "0-based" in msg


def test_broken_json_line_reports_its_line_and_other_rows_still_get_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n{"nope": 1}\n')
    msg = _error(path)
    assert "line 3: not valid JSON" in msg and "line 4, field 'prompt': missing" in msg and "2 problems" in msg


def test_errors_list_ten_problems_and_count_the_rest():
    msg = _error([{"x": i} for i in range(25)])
    assert "25 problems" in msg and "index 9," in msg and "index 10," not in msg and "and 15 more" in msg


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    assert "is empty" in _error(path)


def test_file_with_no_rows_is_an_error(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "d.csv").write_text("prompt,ground_truth\n")
    assert "has no rows" in _error(tmp_path / "d.json") and "has no rows" in _error(tmp_path / "d.csv")


def test_unknown_extension_and_missing_file_are_errors(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    assert "unknown extension '.txt'" in _error(tmp_path / "d.txt")
    assert "no such file" in _error(tmp_path / "missing.jsonl")


def test_json_lines_in_a_json_file_hint_at_the_extension(tmp_path):
    _write_jsonl(tmp_path / "d.json", ROWS)
    assert "line 2" in (msg := _error(tmp_path / "d.json")) and ".jsonl" in msg


def test_csv_bad_messages_json_names_file_data_row_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,messages\nhello,\n,"[{""role"": ""user"""\n')
    msg = _error(path)
    assert str(path) in msg and "data row 2, field 'messages': not valid JSON" in msg and "header not counted" in msg


def test_mixed_split_field_is_an_error():
    msg = _error([{"prompt": "a", "split": "train"}, {"prompt": "b"}])
    assert "index 1, field 'split': missing" in msg


# -- split ------------------------------------------------------------------------------------


def _numbered(n: int) -> Dataset:
    return load_dataset([{"prompt": f"q{i}"} for i in range(n)])


def test_split_is_deterministic_disjoint_and_covering():
    ds = _numbered(50)
    train, eval_ = ds.split(eval_fraction=0.2, seed=3)
    assert len(eval_) == 10 and sorted(_ids(train) + _ids(eval_)) == list(range(50))
    assert not set(_ids(train)) & set(_ids(eval_))
    again = ds.split(eval_fraction=0.2, seed=3)
    assert _ids(again[0]) == _ids(train) and _ids(again[1]) == _ids(eval_)
    assert _ids(ds.split(eval_fraction=0.2, seed=4)[1]) != _ids(eval_)


def test_split_eval_size_and_defaults():
    ds = _numbered(7)
    assert len(ds.split(eval_size=3)[1]) == 3 and len(ds.split(eval_size=0)[1]) == 0
    assert len(ds.split()[1]) == 1  # 0.2 of 7, rounded
    assert len(_numbered(2).split(eval_fraction=0.01)[1]) == 1  # at least one eval example
    for bad in (dict(eval_size=7), dict(eval_fraction=1.0), dict(eval_fraction=0.5, eval_size=1)):
        with pytest.raises(ValueError):
            ds.split(**bad)


def test_split_honours_a_split_field():
    rows = [{"prompt": f"q{i}", "split": s} for i, s in enumerate(["train", "eval", "train", "test", "validation"])]
    train, eval_ = load_dataset(rows).split()
    assert _ids(train) == [0, 2] and _ids(eval_) == [1, 3, 4]
    with pytest.raises(ValueError, match="'split' field"):
        load_dataset(rows).split(eval_size=1)


# -- batches ----------------------------------------------------------------------------------


def test_batch_is_a_pure_function_of_step_size_seed_and_data():
    a, b = _numbered(10), _numbered(10)
    assert _ids(a.batch(7, 4, seed=1)) == _ids(b.batch(7, 4, seed=1))
    assert _ids(a.batch(0, 10, seed=1)) != _ids(a.batch(0, 10, seed=2))


def test_resuming_at_step_k_gives_the_same_batches_as_a_continuous_run():
    continuous = [_ids(_numbered(10).batch(s, 3, seed=5)) for s in range(12)]
    resumed = _numbered(10)  # fresh object, no cached state, starts at step 6
    assert [_ids(resumed.batch(s, 3, seed=5)) for s in range(6, 12)] == continuous[6:]


def test_each_epoch_is_a_permutation_and_a_batch_crosses_into_the_next_epoch():
    ds = _numbered(10)
    stream = [i for s in range(10) for i in _ids(ds.batch(s, 4, seed=0))]  # 40 items = 4 epochs
    epochs = [stream[e * 10:(e + 1) * 10] for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert _ids(ds.batch(2, 4, seed=0)) == epochs[0][8:] + epochs[1][:2]  # step 2 spans epochs 0 and 1


def test_too_small_dataset_for_one_batch_is_a_clear_error():
    ds = _numbered(3)
    ds.check_batch_size(3)
    with pytest.raises(DatasetError, match="3 examples, fewer than one batch of 4"):
        ds.batch(0, 4, seed=0)
    with pytest.raises(ValueError):
        ds.check_batch_size(0)


# -- initial messages -------------------------------------------------------------------------


def test_initial_messages_puts_the_env_system_prompt_before_the_prompt():
    assert initial_messages({"prompt": "hi"}, "sys") == [{"role": "system", "content": "sys"},
                                                         {"role": "user", "content": "hi"}]
    assert initial_messages({"prompt": "hi"}, None) == [{"role": "user", "content": "hi"}]


def test_initial_messages_row_system_message_wins_and_rows_are_not_mutated():
    ds = load_dataset(ROWS)
    chat = initial_messages(ds[1], "env sys")
    assert chat == ROWS[1]["messages"]  # the row's own system message, the env's left out
    chat.append({"role": "assistant", "content": "Paris"})
    chat[0]["content"] = "changed"
    assert ds[1]["messages"] == ROWS[1]["messages"]
    user_only = {"messages": [{"role": "user", "content": "q"}]}
    assert initial_messages(user_only, "env sys")[0] == {"role": "system", "content": "env sys"}
