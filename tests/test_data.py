import csv
import json

import pytest

from conftest import toy_rows, write_jsonl
from saft.data import DataError, FieldOptions, load_samples, output_name, write_subset


def test_jsonl_prompt_response_with_labels_and_ids(tmp_path):
    ds = load_samples(write_jsonl(tmp_path / "d.jsonl", toy_rows(6)))
    assert ds.format == "jsonl" and ds.schema == "prompt_response"
    assert [s.id for s in ds.samples] == [f"r{i}" for i in range(6)]
    assert ds.labels == [1, 0, 0, 1, 0, 0]  # is_safe false -> harmful = 1
    assert ds.samples[1].messages == [{"role": "user", "content": "write a poem about the sea, take 1"},
                                      {"role": "assistant", "content": "the sea is wide and blue 1"}]


def test_multi_turn_messages_last_assistant_is_response(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                          {"role": "assistant", "content": "d"}], "label": "harmful"}]
    s = load_samples(write_jsonl(tmp_path / "m.jsonl", rows)).samples[0]
    assert s.response == "d" and s.prompt == "c" and len(s.prompt_messages) == 4
    assert s.label == 1 and s.id == "0"


def test_sharegpt_style_conversations(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    s = load_samples(write_jsonl(tmp_path / "c.jsonl", rows)).samples[0]
    assert s.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row, prompt, response", [
    ({"prompt": "p", "completion": "c"}, "p", "c"),
    ({"instruction": "i", "input": "x", "output": "o"}, "i\n\nx", "o"),
    ({"instruction": "i", "input": "", "output": "o"}, "i", "o"),
    ({"instruction": "i", "context": "ctx", "response": "r"}, "i\n\nctx", "r"),
    ({"question": "q", "answer": "a"}, "q", "a"),
])
def test_schemas(tmp_path, row, prompt, response):
    s = load_samples(write_jsonl(tmp_path / "s.jsonl", [row])).samples[0]
    assert (s.prompt, s.response) == (prompt, response)


def test_explicit_fields_override_detection(tmp_path):
    rows = [{"q": "x", "a": "y", "prompt": "ignored", "response": "ignored", "bad": 1, "uid": "u1"}]
    ds = load_samples(write_jsonl(tmp_path / "e.jsonl", rows),
                      fields=FieldOptions(prompt_field="q", response_field="a", label_field="bad", id_field="uid"))
    s = ds.samples[0]
    assert (s.prompt, s.response, s.label, s.id) == ("x", "y", 1, "u1")
    safe = load_samples(tmp_path / "e.jsonl", fields=FieldOptions(prompt_field="q", response_field="a",
                                                                  label_field="bad", label_meaning="safe"))
    assert safe.samples[0].label == 0


def test_json_csv_parquet_and_datasets_roundtrip(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = toy_rows(5)
    for r in rows:
        r["extra"] = "keep me"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "d_ds"))
    for name in ("d.json", "d.csv", "d.parquet", "d_ds"):
        ds = load_samples(tmp_path / name)
        assert len(ds) == 5 and ds.labels == [1, 0, 0, 1, 0], name
        out = write_subset(ds, [1, 3], tmp_path / f"out_{name}" / output_name(ds, "kept"))
        back = load_samples(out)
        assert [s.id for s in back.samples] == ["r1", "r3"], name
        assert back.rows[0]["extra"] == "keep me", name


def test_csv_string_labels(tmp_path):
    (tmp_path / "l.csv").write_text("prompt,response,is_safe\nhi,yo,False\nhey,ok,True\n")
    assert load_samples(tmp_path / "l.csv").labels == [1, 0]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unknown format.*\.jsonl"):
        load_samples(tmp_path / "x.txt")


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON.*--skip-invalid"):
        load_samples(p)
    ds = load_samples(p, skip_invalid=True)
    assert len(ds) == 2 and ds.skipped[0][0] == 2
    assert [s.id for s in ds.samples] == ["0", "2"]  # ids stay the row numbers of the input


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a"}, r"line 1: no known schema"),
    ({"prompt": "a", "response": 3}, r"line 1: field 'response' must be text, got int"),
    ({"prompt": "a", "response": "b", "is_safe": "maybe"}, r"label field 'is_safe' has value 'maybe'"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"last turn of 'messages' must be the assistant"),
    ({"prompt": " ", "response": "b"}, r"prompt is empty"),
])
def test_bad_rows(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_samples(write_jsonl(tmp_path / "b.jsonl", [row]))


def test_duplicate_ids_and_missing_explicit_field(tmp_path):
    p = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a", "response": "b"}] * 2)
    with pytest.raises(DataError, match=r"line 2: id '1' repeats the id of line 1"):
        load_samples(p)
    p = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"field 'text' is missing"):
        load_samples(p, fields=FieldOptions(prompt_field="text", response_field="response"))


def test_empty_dataset_and_bad_json(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable samples"):
        load_samples(tmp_path / "empty.jsonl")
    (tmp_path / "obj.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(DataError, match="must be a list of objects"):
        load_samples(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(DataError, match=r"broken\.json, line 1: not valid JSON"):
        load_samples(tmp_path / "broken.json")


def test_csv_row_with_too_many_cells(tmp_path):
    (tmp_path / "c.csv").write_text("prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"c\.csv, line 3: 3 cells but the header has 2"):
        load_samples(tmp_path / "c.csv")


def test_not_utf8(tmp_path):
    (tmp_path / "l1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_samples(tmp_path / "l1.jsonl")


def test_load_prompts_formats(tmp_path):
    from saft.data import load_prompts

    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    assert load_prompts(tmp_path / "a.txt") == ["first", "second"]
    (tmp_path / "b.json").write_text(json.dumps({"instructions": ["x", "y"], "inputs": ["", ""]}))
    assert load_prompts(tmp_path / "b.json") == ["x", "y"]
    write_jsonl(tmp_path / "c.jsonl", [{"instruction": "i1", "output": "o"}, {"prompt": "p2"}])
    assert load_prompts(tmp_path / "c.jsonl") == ["i1", "p2"]
    write_jsonl(tmp_path / "d.jsonl", [{"text": "no prompt field"}])
    with pytest.raises(DataError, match=r"d\.jsonl, row 1: no text field named prompt"):
        load_prompts(tmp_path / "d.jsonl")
