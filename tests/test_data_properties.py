"""Property-based tests of every reader and writer in saft.data (hypothesis).

Random field names and schemas, text from the whole of Unicode (right-to-left marks, emoji, NUL, lone surrogates
where the format can hold them), empty and huge fields, deep nesting, CRLF line endings and byte-order marks, and
rows that are not samples at all. For every file: reading raises nothing but `DataError`; with `skip_invalid`
every input row ends in exactly one of kept, removed and invalid; and kept and removed hold the input rows
exactly (their text for JSONL, JSON and CSV, their values for Parquet and `datasets` folders).
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from saft.data import DataError, load_samples, output_name, write_invalid, write_subset

SPECIAL = ["", "\u202eevil\u202c", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", "\U0001f469\u200d\U0001f469\u200d\U0001f467",
           "a\x00b", "\ud800", "x\udfffy", "line\r\nbreak", "\ufeffbom", "\u2028sep\u2029", "\r", "\\", '"', "x" * 2000]
SCHEMAS = [("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("question", "answer")]
ALL_FIELDS = {f for pair in SCHEMAS for f in pair} | {"messages", "conversations", "conversation", "input",
                                                      "context", "id", "is_safe", "harmful", "is_harmful", "label",
                                                      "unsafe"}

# Any Unicode text, lone surrogates included (JSON can hold them as escapes), plus the awkward cases above.
any_text = st.one_of(st.text(st.characters(codec=None, categories=None), max_size=30), st.sampled_from(SPECIAL))
# Text that UTF-8 can encode (CSV, Parquet and datasets store UTF-8 bytes: no lone surrogates).
utf8_text = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
                      st.sampled_from([s for s in SPECIAL if not any(0xD800 <= ord(c) <= 0xDFFF for c in s)]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
extra_fields = st.dictionaries(any_text.filter(lambda k: k not in ALL_FIELDS), json_values, max_size=4)


@st.composite
def sample_rows(draw, text=any_text, extras=extra_fields):
    """A row of a random schema with random extra fields; sometimes one that is not a valid sample."""
    kind = draw(st.sampled_from(["pair", "pair", "messages", "junk"]))
    row = dict(draw(extras))
    if kind == "pair":
        p, r = draw(st.sampled_from(SCHEMAS))
        row[p] = draw(text)
        row[r] = draw(text)
    elif kind == "messages":
        row["messages"] = [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    if draw(st.booleans()):
        row["is_safe"] = draw(st.sampled_from([True, False, "yes", "maybe", 1, None]))
    if draw(st.booleans()):
        row["id"] = draw(st.one_of(text, st.integers(), st.lists(st.integers(), max_size=2)))
    return row


def _check_lost_nothing(ds, out, read_back):
    """Split the samples into kept and removed at random-ish positions, write both and invalid.jsonl; return
    (kept, removed, invalid) as read back."""
    removed = list(range(0, len(ds), 3))
    kept = [i for i in range(len(ds)) if i not in set(removed)]
    k = write_subset(ds, kept, out / output_name(ds, "kept"))
    r = write_subset(ds, removed, out / output_name(ds, "removed"))
    text = write_invalid(ds, out / "invalid.jsonl").read_text(encoding="utf-8")
    inv = [json.loads(line) for line in text.split("\n")[:-1]]
    assert len(inv) == len(ds.skipped)
    return read_back(k), read_back(r), inv, kept, removed


def _load(path, **kw):
    """load_samples, which may refuse a file only with a DataError (a file without one usable sample)."""
    try:
        return load_samples(path, **kw)
    except DataError as e:
        assert str(e).startswith(str(path)), e
        return None


PROPERTY = settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                             HealthCheck.data_too_large])


@PROPERTY
@given(rows=st.lists(st.one_of(sample_rows(), json_values), min_size=1, max_size=8),
       junk=st.lists(st.sampled_from(["{not json", "[" * 5000, "\x00", "\"unterminated", "{}", "42", "\ufeff{}"]),
                     max_size=3),
       crlf=st.booleans(), bom=st.booleans(), ascii_only=st.booleans(), trailing_newline=st.booleans(),
       blank_lines=st.booleans())
def test_jsonl_keeps_every_row_verbatim(tmp_path_factory, rows, junk, crlf, bom, ascii_only, trailing_newline,
                                        blank_lines):
    tmp = tmp_path_factory.mktemp("jsonl")
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows] + junk
    if not ascii_only and any(0xD800 <= ord(c) <= 0xDFFF for line in lines for c in line):
        lines = [json.dumps(r) for r in rows] + junk  # UTF-8 cannot hold a raw lone surrogate; JSON's escape can
    end = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + (end + end if blank_lines else end).join(lines) + (end if trailing_newline else "")
    path = tmp / "d.jsonl"
    path.write_bytes(text.encode("utf-8"))
    strict = _load(path)
    ds = _load(path, skip_invalid=True)
    if ds is None:
        assert strict is None
        return
    if strict is not None:
        assert not ds.skipped and len(strict) == len(ds)

    def read_back(p):
        return p.read_text(encoding="utf-8").split("\n")[:-1]

    kept, removed, invalid, kpos, rpos = _check_lost_nothing(ds, tmp, read_back)
    assert len(kept) + len(removed) + len(invalid) == len(lines)
    # every row is its own input line, unchanged (a BOM belongs to the file, not to its first row)
    originals = [line.lstrip("\ufeff") if i == 0 else line for i, line in enumerate(lines)]
    assert sorted(kept + removed + [r["raw"] for r in invalid]) == sorted(originals)
    assert kept == [ds.raw[i] for i in kpos] and removed == [ds.raw[i] for i in rpos]
    for line, sample in zip(kept, (ds.samples[i] for i in kpos)):
        assert line == originals[(sample.meta["line"] - 1) // (2 if blank_lines else 1)]
    for r in invalid:
        assert r["line"] >= 1 and r["reason"]


@PROPERTY
@given(rows=st.lists(st.one_of(sample_rows(), json_values), min_size=1, max_size=6), indent=st.sampled_from([None, 0, 2]),
       bom=st.booleans(), wrapped=st.booleans())
def test_json_keeps_every_row(tmp_path_factory, rows, indent, bom, wrapped):
    tmp = tmp_path_factory.mktemp("json")
    doc = {"data": rows} if wrapped else rows
    path = tmp / "d.json"
    path.write_bytes((("\ufeff" if bom else "") + json.dumps(doc, indent=indent)).encode("utf-8"))
    ds = _load(path, skip_invalid=True)
    if ds is None:
        return

    def read_back(p):
        return json.loads(p.read_text(encoding="utf-8"))

    kept, removed, invalid, kpos, rpos = _check_lost_nothing(ds, tmp, read_back)
    assert len(kept) + len(removed) + len(invalid) == len(rows)
    assert kept == [rows[ds.samples[i].meta["row"]] for i in kpos]
    assert removed == [rows[ds.samples[i].meta["row"]] for i in rpos]
    assert sorted(json.dumps(json.loads(r["raw"]), sort_keys=True) for r in invalid) == sorted(
        json.dumps(rows[n - 1], sort_keys=True) for n in (r["row"] for r in invalid))


@st.composite
def csv_files(draw):
    """(header, records): prompt and response columns among random ones; records of random cells, some with too
    many cells, some with too few."""
    names = draw(st.lists(utf8_text.filter(lambda n: n not in ALL_FIELDS and n != ""), max_size=3, unique=True))
    header = draw(st.permutations(["prompt", "response", *names]))
    records = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.sampled_from([len(header)] * 4 + [len(header) + 1, 1]))
        records.append([draw(utf8_text) for _ in range(n)])
    return header, records


@PROPERTY
@given(spec=csv_files(), crlf=st.booleans(), bom=st.booleans(), quote_all=st.booleans())
def test_csv_keeps_every_record_verbatim(tmp_path_factory, spec, crlf, bom, quote_all):
    header, records = spec
    tmp = tmp_path_factory.mktemp("csv")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n" if crlf else "\n",
                        quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(records)
    path = tmp / "d.csv"
    path.write_bytes((("\ufeff" if bom else "") + buf.getvalue()).encode("utf-8"))
    # What the file holds is what the csv module reads back (its writer leaves a lone "\r" in a cell unquoted
    # under QUOTE_MINIMAL, which then ends a line): blank lines are no records.
    with open(path, encoding="utf-8-sig", newline="") as f:
        header, *records = [r for r in csv.reader(f) if r != []]
    ds = _load(path, skip_invalid=True)
    if ds is None:
        return

    def read_back(p):
        with open(p, encoding="utf-8", newline="") as f:
            got = list(csv.reader(f))
        assert got[0] == header
        return got[1:]

    kept, removed, invalid, kpos, rpos = _check_lost_nothing(ds, tmp, read_back)
    assert len(kept) + len(removed) + len(invalid) == len(records)
    assert kept == [records[ds.samples[i].meta["row"]] for i in kpos]
    assert removed == [records[ds.samples[i].meta["row"]] for i in rpos]
    for r in invalid:  # the record's own text: it parses back to the record
        assert next(csv.reader(io.StringIO(r["raw"], newline=""))) in records


@settings(PROPERTY, max_examples=25)
@given(rows=st.lists(sample_rows(text=utf8_text, extras=st.dictionaries(
    utf8_text.filter(lambda k: k not in ALL_FIELDS and k != ""), utf8_text, max_size=3)), min_size=1, max_size=6))
@example(rows=[{"prompt": "", "response": "", "id": 2**63}])  # beyond int64: Arrow cannot type it
def test_parquet_keeps_every_row(tmp_path_factory, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("parquet")
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # rows whose values Arrow cannot put into one column type (or an integer beyond int64): not a Parquet
        # file anyone has
        assume(False)
    pq.write_table(table, tmp / "d.parquet")
    full = pq.read_table(tmp / "d.parquet").to_pylist()
    ds = _load(tmp / "d.parquet", skip_invalid=True)
    if ds is None:
        return
    kept, removed, invalid, kpos, rpos = _check_lost_nothing(ds, tmp, lambda p: pq.read_table(p).to_pylist())
    assert len(kept) + len(removed) + len(invalid) == len(rows)
    assert kept == [full[ds.samples[i].meta["row"]] for i in kpos]
    assert removed == [full[ds.samples[i].meta["row"]] for i in rpos]


@settings(PROPERTY, max_examples=8)
@given(rows=st.lists(sample_rows(text=utf8_text, extras=st.just({})), min_size=1, max_size=5))
def test_datasets_folder_keeps_every_row(tmp_path_factory, rows):
    import datasets

    tmp = tmp_path_factory.mktemp("ds")
    try:
        hf = datasets.Dataset.from_list(rows)
    except Exception:  # noqa: BLE001 - pyarrow's many type errors: rows Arrow cannot type as one table
        assume(False)
    hf.save_to_disk(str(tmp / "d"))
    try:
        full = datasets.load_from_disk(str(tmp / "d")).to_list()
    except IndexError:  # datasets itself cannot read back a table of rows with no columns ([{}]): not our reader
        assume(False)
    ds = _load(tmp / "d", skip_invalid=True)
    if ds is None:
        return
    kept, removed, invalid, kpos, rpos = _check_lost_nothing(ds, tmp, lambda p: datasets.load_from_disk(str(p)).to_list())
    assert len(kept) + len(removed) + len(invalid) == len(rows)
    assert kept == [full[ds.samples[i].meta["row"]] for i in kpos]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@settings(PROPERTY, max_examples=40)
@given(data=st.binary(max_size=300) | st.sampled_from([b"\xef\xbb\xbf", b"[" * 50_000, b"\xff\xfe{}", b"\x00" * 10,
                                                        b'{"prompt": "\xe9", "response": "x"}\n']))
def test_any_bytes_give_a_data_error_or_samples(tmp_path_factory, suffix, data):
    path = tmp_path_factory.mktemp("bytes") / f"f{suffix}"
    path.write_bytes(data)
    for skip in (False, True):
        ds = _load(path, skip_invalid=skip)
        if ds is not None:
            assert len(ds) + len(ds.skipped) >= 1


def test_lone_surrogates_reach_the_model_as_replacement_characters(tmp_path):
    path = tmp_path / "s.jsonl"
    line = json.dumps({"prompt": "a\ud800b", "response": "ok\udfff"})
    path.write_text(line + "\n")
    ds = load_samples(path)
    assert ds.samples[0].prompt == "a\ufffdb" and ds.samples[0].response == "ok\ufffd"
    write_subset(ds, [0], tmp_path / "k.jsonl")
    assert (tmp_path / "k.jsonl").read_text() == line + "\n"  # the row itself is untouched


def test_deep_nesting_is_an_invalid_row_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = '{"prompt": "p", "response": "r", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text('{"prompt": "a", "response": "b"}\n' + deep + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2: nested deeper"):
        load_samples(path)
    ds = load_samples(path, skip_invalid=True)
    assert len(ds) == 1 and ds.skipped[0][:2] == (2, "nested deeper than the JSON reader allows")
    assert ds.skipped[0][2] == deep
    (tmp_path / "deep.json").write_text("[" + deep + "]")
    with pytest.raises(DataError, match=r"deep\.json, line 1: not valid JSON \(nested deeper"):
        load_samples(tmp_path / "deep.json")


def test_csv_line_numbers_count_multi_line_cells_and_blank_lines(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('prompt,response\n"two\nlines",a\n\nc,d,e\nf,g\n', newline="")
    with pytest.raises(DataError, match=r"m\.csv, line 5: 3 cells but the header has 2"):
        load_samples(path)
    ds = load_samples(path, skip_invalid=True)
    assert [s.meta["line"] for s in ds.samples] == [2, 6] and ds.skipped == [(5, "3 cells but the header has 2", "c,d,e\n")]


def test_json_float_spelling_and_key_order_survive(tmp_path):
    text = '[{"response": "r", "prompt": "p", "score": 1.0, "big": 1e400, "n": 12345678901234567890123}]'
    (tmp_path / "f.json").write_text(text)
    ds = load_samples(tmp_path / "f.json")
    write_subset(ds, [0], tmp_path / "k.json")
    assert (tmp_path / "k.json").read_text() == "[\n" + text[1:-1] + "\n]\n"
    assert math.isinf(ds.rows[0]["big"])


def test_huge_fields(tmp_path):
    """Fields far over the csv module's default 128 KiB limit, in every text format."""
    big = "\u05e9x\U0001f600" * 200_000
    row = {"prompt": big, "response": big, "extra": big}
    (tmp_path / "h.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp_path / "h.json").write_text(json.dumps([row]))
    with open(tmp_path / "h.csv", "w", newline="") as f:
        csv.writer(f).writerows([list(row), list(row.values())])
    for name in ("h.jsonl", "h.json", "h.csv"):
        ds = load_samples(tmp_path / name)
        assert ds.samples[0].prompt == big, name
        out = write_subset(ds, [0], tmp_path / "out" / name)
        assert ds.raw[0] in out.read_bytes().decode("utf-8"), name  # the row's own text
        assert load_samples(out).rows[0] == row, name
