"""The streaming reader and writer (`scan_samples`, `StreamedDataset`, `write_parts`) against the in-memory ones,
and the streamed sentence view against the in-memory one."""

import csv
import json

import numpy as np
import pytest

from conftest import toy_rows, write_jsonl
from saft.data import (
    DataError, Dataset, StreamedDataset, load_samples, scan_samples, write_parts, write_subset,
)

# Rows that exercise what the readers must keep: odd spacing and key order, escapes, a CRLF line, blank lines,
# an invalid row, a repeated id, a row without a label and a multi-turn chat.
JSONL = (
    '{"id": "a", "prompt": "p1", "response": "r1", "is_safe": false}\n'
    '\n'
    '{ "response":"r2","prompt":"p\\u00e9 2","id":"b","is_safe":true,"n":1.50 }\r\n'
    '{"id": "c", "prompt": "p3"}\n'
    'not json\n'
    '{"id": "a", "prompt": "dup", "response": "dup"}\n'
    '{"id": "d", "prompt": "p4", "response": "r4"}\n'
    '{"id": "e", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}],'
    ' "label": "harmful"}'
)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "response", "is_safe"], lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    with open(path, "a", newline="") as f:  # a quoted cell over two lines, an empty prompt, a short record
        f.write('x1,"two\nlines",resp,true\r\nx2,,resp,false\r\nx3,only\r\n')
    return path


def _csv_rows():
    return [{"id": f"c{i}", "prompt": f'say "{i}", please', "response": f"ok {i}", "is_safe": str(i % 2 == 0).lower()}
            for i in range(7)]


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def _parquet_rows():
    rows = [{"id": f"q{i}", "prompt": f"p{i}", "response": f"r{i}", "label": i % 3 == 0} for i in range(11)]
    rows[4] = {**rows[4], "prompt": ""}  # invalid: an empty prompt
    return rows


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def data_file(request, tmp_path):
    if request.param == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_bytes(JSONL.encode())
        return path
    if request.param == "csv":
        return _write_csv(tmp_path / "d.csv", _csv_rows())
    return _write_parquet(tmp_path / "d.parquet", _parquet_rows())


def _same(loaded: Dataset, streamed: StreamedDataset):
    assert isinstance(streamed, StreamedDataset)
    assert len(streamed) == len(loaded)
    assert streamed.format == loaded.format and streamed.schema == loaded.schema
    assert streamed.labels == loaded.labels
    assert streamed.skipped == loaded.skipped
    assert streamed.lines.tolist() == [s.meta["line"] for s in loaded.samples]
    assert [s.id for s in streamed.iter_samples()] == [s.id for s in loaded.samples]
    assert list(streamed.iter_samples()) == loaded.samples  # messages, labels, meta (row and line)
    assert streamed.rows == loaded.rows and streamed.samples == loaded.samples
    assert streamed.header == loaded.header


def test_streamed_equals_loaded_on_every_format(data_file):
    loaded = load_samples(data_file, skip_invalid=True)
    streamed = scan_samples(data_file, skip_invalid=True)
    assert loaded.skipped  # the fixtures hold invalid rows
    _same(loaded, streamed)


def test_streamed_errors_name_the_same_line(data_file):
    with pytest.raises(DataError) as a:
        load_samples(data_file)
    with pytest.raises(DataError) as b:
        scan_samples(data_file)
    assert str(a.value) == str(b.value)
    assert (" line " if data_file.suffix != ".parquet" else " row ") in str(b.value)


def test_json_and_datasets_stay_in_memory(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(toy_rows(4)))
    ds = scan_samples(path)
    assert isinstance(ds, Dataset) and len(ds) == 4


def test_write_parts_is_byte_identical_to_write_subset(data_file, tmp_path):
    loaded = load_samples(data_file, skip_invalid=True)
    streamed = scan_samples(data_file, skip_invalid=True)
    n = len(loaded)
    part = np.array([k % 3 - 1 for k in range(n)], dtype=np.int8)  # -1 (none), 0 and 1 in turn
    ext = data_file.suffix
    seen = []
    write_parts(streamed, part, [tmp_path / f"s0{ext}", tmp_path / f"s1{ext}"],
                on_sample=lambda k, s: seen.append((k, s.id)))
    assert seen == [(k, s.id) for k, s in enumerate(loaded.samples)]
    for j in (0, 1):
        positions = np.flatnonzero(part == j).tolist()
        write_subset(loaded, positions, tmp_path / f"m{j}{ext}")
        if ext == ".parquet":  # the same rows, schema and values (row groups may differ)
            import pyarrow.parquet as pq

            a, b = pq.read_table(tmp_path / f"s{j}{ext}"), pq.read_table(tmp_path / f"m{j}{ext}")
            assert a.schema == b.schema and a.to_pylist() == b.to_pylist()
            assert a.num_rows == len(positions)
        else:
            assert (tmp_path / f"s{j}{ext}").read_bytes() == (tmp_path / f"m{j}{ext}").read_bytes()
    # write_subset on the streamed dataset writes the same
    write_subset(streamed, [0, n - 1], tmp_path / f"t{ext}")
    write_subset(loaded, [0, n - 1], tmp_path / f"u{ext}")
    if ext != ".parquet":
        assert (tmp_path / f"t{ext}").read_bytes() == (tmp_path / f"u{ext}").read_bytes()


def test_empty_parts_are_valid_files(data_file, tmp_path):
    streamed = scan_samples(data_file, skip_invalid=True)
    out = tmp_path / f"none{data_file.suffix}"
    write_parts(streamed, np.full(len(streamed), -1, dtype=np.int8), [out])
    reread = load_samples if data_file.suffix != ".parquet" else None
    if reread is None:
        import pyarrow.parquet as pq

        assert pq.read_table(out).num_rows == 0
    elif data_file.suffix == ".csv":
        assert out.read_bytes() == streamed.header.encode()
    else:
        assert out.read_bytes() == b""


def test_a_file_changed_between_passes_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", toy_rows(6))
    streamed = scan_samples(path)
    write_jsonl(path, toy_rows(4))
    with pytest.raises(DataError, match="changed while it was being read"):
        list(streamed.iter_samples())


def test_streamed_sentence_view_equals_in_memory(tmp_path):
    from saft.chunks import NpyMatrix
    from saft.encoders import sentence_features

    path = write_jsonl(tmp_path / "d.jsonl", toy_rows(5))
    streamed = scan_samples(path)
    X = sentence_features(streamed, cache_dir=tmp_path / "a", out_of_core=True)
    assert isinstance(X, NpyMatrix) and X.shape == (5, 768)
    Y = sentence_features(load_samples(path).samples, cache_dir=tmp_path / "b")
    np.testing.assert_allclose(np.asarray(X), Y, atol=1e-6)
    # the same cache file: the in-memory call reads what the streamed one wrote
    assert (np.asarray(sentence_features(load_samples(path).samples, cache_dir=tmp_path / "a")) == np.asarray(X)).all()


def test_a_repeated_id_is_found_by_the_streamed_scan(tmp_path):
    rows = toy_rows(6)
    rows[4]["id"] = rows[1]["id"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"line 5: id 'r1' repeats the id of line 2"):
        scan_samples(path)
    streamed, loaded = scan_samples(path, skip_invalid=True), load_samples(path, skip_invalid=True)
    _same(loaded, streamed)
    assert len(streamed) == 5


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_rows_parsed_elsewhere_are_the_readers_samples(tmp_path, chunk):
    """`--engine ray`'s read tasks split a JSONL stream into lines themselves (`engine_ray._lines`, any chunk size)
    and parse them with `parse_records`: every valid row's messages are the streaming reader's, the invalid
    ones are left out, and a U+2028 inside a line does not split it."""
    import io

    from saft.data import jsonl_records, parse_records
    from saft.engine_ray import _lines

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + JSONL.encode() + '\n{"prompt": "a\u2028b", "response": "r"}\n'.encode())
    read = scan_samples(path, fields=None, skip_invalid=True)
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
    parsed = list(parse_records(jsonl_records(_lines(stream, size=chunk)), path=path, format="jsonl"))
    # the row whose id repeats another's is valid alone: the reader that writes the outputs drops it
    dup = [{"role": "user", "content": "dup"}, {"role": "assistant", "content": "dup"}]
    assert [s.messages for s in parsed if s.messages != dup] == [s.messages for s in read.samples]
    assert [s.label for s in parsed if s.messages != dup] == read.labels
    assert len(parsed) == len(read) + 1 == 6 and parsed[-1].messages[0]["content"] == "a\u2028b"
