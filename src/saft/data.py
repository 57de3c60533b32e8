"""Read fine-tuning datasets into `Sample`s, and write subsets back in the input's own format.

Formats: JSONL, JSON (a list of objects), CSV, Parquet and a folder saved by `datasets.Dataset.save_to_disk`.
Schemas, tried in this order unless fields are named explicitly:
chat `messages`/`conversations` (the last assistant turn is the response, earlier turns are context),
`prompt`/`completion`, `prompt`/`response`, `instruction`/`input`/`output`, `instruction`/`context`/`response`
(Dolly), `question`/`answer`.

Kept and removed rows are written with every input field preserved: for JSONL, JSON and CSV the row's own text,
byte for byte (key order, number spelling, escapes, quoting); for Parquet and `datasets` folders the table's own
rows. Rows that cannot be used are listed (`skipped`, with their raw text) so that `write_invalid` can write them
out: every input row ends in exactly one output. Nothing here knows about models or tokenizers.

Two loaders, with the same samples, checks and errors: `load_samples` holds every row, its raw text and its
sample in memory (a `Dataset`); `scan_samples`, which `saft filter` uses, reads JSONL, CSV and Parquet in a
streaming pass (a line, a CSV record or a Parquet record batch at a time) and keeps only each sample's line number
and label (a `StreamedDataset`, a few bytes a row); later passes read the file again for the samples' text and to
write kept and removed (`write_parts`, one pass for every output). JSON (one list) and `datasets` folders are
read whole by both.

Untrusted input: nothing here unpickles, and a `datasets` folder that holds a pickle is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from array import array
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "csv", "parquet", "datasets")
LABEL_FIELDS = ("is_safe", "harmful", "is_harmful", "label", "unsafe")
# Fields whose truthy value means the sample is safe; every other label field means harmful.
SAFE_MEANING_FIELDS = ("is_safe", "safe")
ROLE_KEYS = (("role", "content"), ("from", "value"))
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
TRUE_STRINGS = {"1", "true", "yes", "y", "t", "harmful", "unsafe"}
FALSE_STRINGS = {"0", "false", "no", "n", "f", "safe", "benign", "harmless"}


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field, and what to do."""


@dataclass
class Sample:
    """One fine-tuning example: a conversation whose last message is the assistant's response.

    `label` is 1 for harmful, 0 for safe, None when unknown.
    """

    id: str
    messages: list[dict[str, str]]
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt(self) -> str:
        """The last user turn (the instruction the response answers)."""
        users = [m["content"] for m in self.messages[:-1] if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class FieldOptions:
    """Explicit field names; any left as None is detected from the data."""

    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    label_field: str | None = None
    # How to read the label field: "harmful" means a true value marks a harmful sample, "safe" the opposite.
    # None: "safe" for fields named is_safe/safe, "harmful" for the rest.
    label_meaning: str | None = None
    id_field: str | None = None

    def __post_init__(self) -> None:
        if self.label_meaning not in (None, "harmful", "safe"):
            raise ValueError(f"label_meaning must be 'harmful' or 'safe', got {self.label_meaning!r}")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("prompt_field and response_field must be given together")


@dataclass
class Dataset:
    """Parsed samples plus what is needed to write any subset back in the source format.

    `rows[i]` is the parsed record behind `samples[i]` (for Parquet and `datasets` folders, `row_index[i]` is its
    position in `table`); for JSONL, JSON and CSV `raw[i]` is its text as it stands in the file (`header`: a CSV
    file's header record). `skipped` lists (line or row number, reason, raw text) for rows dropped by
    `skip_invalid`; a row that is not UTF-8 keeps its bytes as lone surrogates (Python's "surrogateescape").
    """

    path: Path
    format: str
    samples: list[Sample]
    rows: list[Any]
    row_index: list[int]
    schema: str
    table: Any = None
    columns: list[str] | None = None
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    raw: list[str] | None = None
    header: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int | None]:
        return [s.label for s in self.samples]


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "datasets"
        raise DataError(f"{path}: a folder, but not one saved by datasets.Dataset.save_to_disk "
                        "(no dataset_info.json or state.json). Pass a data file or a saved dataset folder.")
    suffixes = [s.lower() for s in path.suffixes]
    for fmt, exts in (("jsonl", (".jsonl", ".ndjson")), ("json", (".json",)), ("csv", (".csv",)),
                      ("parquet", (".parquet", ".pq"))):
        if suffixes and suffixes[-1] in exts:
            return fmt
    raise DataError(f"{path}: unknown format (suffix {path.suffix!r}). Use .jsonl, .json, .csv, .parquet or a "
                    "saved datasets folder, or pass format= / --format explicitly.")


@dataclass
class _Rows:
    """What a reader returns: parsed rows (or `_Malformed`), their 1-based line (row) numbers, and, for the text
    formats, each row's raw text."""

    rows: list[Any]
    linenos: list[int]
    raw: list[str] | None = None
    table: Any = None
    columns: list[str] | None = None
    header: str | None = None


JSON_WHITESPACE = " \t\n\r"
# Files a dataset or model folder must not hold: formats that unpickle (run code) when loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".dill", ".npy", ".npz")
# Formats that are never pickles, so their first bytes are not checked (a safetensors header length can start
# with the same byte as a pickle).
NON_PICKLE_SUFFIXES = (".safetensors", ".gguf", ".arrow", ".json", ".jsonl", ".txt", ".md", ".csv", ".parquet",
                       ".model", ".jinja", ".py")


def find_pickles(folder: Path) -> list[Path]:
    """Files under `folder` that are, or may be, pickles: by suffix, or by a pickle's first bytes (protocol 2+:
    0x80 and the protocol number) or a zip archive holding a `.pkl` member (torch.save's format)."""
    import zipfile

    found = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() in NON_PICKLE_SUFFIXES:
            continue
        if p.suffix.lower() in PICKLE_SUFFIXES:
            found.append(p)
            continue
        with open(p, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            found.append(p)
        elif head == b"PK" and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    found.append(p)
    return found


def _utf8(data: bytes) -> tuple[str, str | None]:
    """(text, problem): bytes that are not UTF-8 stay as lone surrogates, so that the raw text loses nothing."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return (data.decode("utf-8", "surrogateescape"),
                f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the line); re-encode the file as UTF-8")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed row or `_Malformed`, the line's text) for every non-blank line, read a line at a time."""
    with open(path, "rb") as f:
        yield from jsonl_records(f)


def jsonl_records(lines: Iterable[bytes]) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed row or `_Malformed`, the line's text) for every non-blank line of a JSONL file given
    as its lines of bytes (each with its "\n", as a binary file gives them).

    Lines end at "\n" only (JSONL's definition), so a lone "\r" or U+2028 inside a line does not split it; the
    file is read as bytes so that one line that is not UTF-8 is one invalid row, not an unreadable file."""
    for lineno, data in enumerate(lines, 1):
        if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, written by some editors
            data = data[3:]
        text, problem = _utf8(data)
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        if not text.strip(JSON_WHITESPACE):
            continue
        yield lineno, _Malformed(problem) if problem else _jsonl_row(text), text


def _jsonl_row(text: str) -> Any:
    """One JSONL line's row, or `_Malformed` saying why it is none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Malformed(f"not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return _Malformed("nested deeper than the JSON reader allows")


def _read_jsonl(path: Path) -> _Rows:
    read = _Rows([], [], [])
    for lineno, row, text in _iter_jsonl(path):
        read.rows.append(row)
        read.linenos.append(lineno)
        read.raw.append(text)
    return read


def _read_json(path: Path) -> _Rows:
    """A JSON list of objects, each element's own text kept; or an object holding one such list."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    fix = "Fix the file, or use JSONL (one object a line) so that --skip-invalid can skip bad rows."
    start = next((i for i, c in enumerate(text) if c not in JSON_WHITESPACE), len(text))
    if text[start:start + 1] != "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}). {fix}") from None
        except RecursionError:
            raise DataError(f"{path}: nested deeper than the JSON reader allows. {fix}") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
            return _Rows(data, list(range(1, len(data) + 1)))
        raise DataError(f"{path}: JSON must be a list of objects (one per sample), got {type(data).__name__}.")
    # Walk the list element by element (raw_decode gives where each ends), so each row's text is kept as written.
    decoder = json.JSONDecoder()
    rows, raw = [], []

    def skip(i: int) -> int:
        while i < len(text) and text[i] in JSON_WHITESPACE:
            i += 1
        return i

    def fail(i: int, what: str):
        line = text.count("\n", 0, i) + 1
        raise DataError(f"{path}, line {line}: not valid JSON ({what}). {fix}")

    i = skip(start + 1)
    if text[i:i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                fail(e.pos, e.msg)
            except RecursionError:
                fail(i, "nested deeper than the JSON reader allows")
            rows.append(obj)
            raw.append(text[i:end])
            i = skip(end)
            if text[i:i + 1] == ",":
                i = skip(i + 1)
            elif text[i:i + 1] == "]":
                i += 1
                break
            else:
                fail(i, "expected ',' or ']' after a list element")
    if skip(i) != len(text):
        fail(skip(i), "extra data after the list")
    return _Rows(rows, list(range(1, len(rows) + 1)), raw)


# The csv module refuses fields over 128 KiB by default; a long chat transcript is a legitimate field.
CSV_FIELD_LIMIT = 2**31 - 1


def _iter_csv(path: Path):
    """A generator: first (columns, header text), then (line number, row or `_Malformed`, the record's own
    lines) for every record, read a record at a time. Rows are dicts by header name (missing cells are None)."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8-sig", newline="") as f:
        consumed: list[str] = []

        def feed():  # the lines the csv reader has taken since the last record
            for line in f:
                consumed.append(line)
                yield line

        reader = csv.reader(feed())
        try:
            columns = next(reader, [])
        except csv.Error as e:
            raise DataError(f"{path}, line 1: cannot read the CSV header ({e}).") from None
        header = "".join(consumed)
        consumed.clear()
        yield columns, header
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                cells = _Malformed(f"not valid CSV ({e})")
            text, n_lines = "".join(consumed), len(consumed)
            consumed.clear()
            if cells == []:  # a blank line
                continue
            lineno = reader.line_num - n_lines + 1  # where the record starts (a quoted cell may span lines)
            if isinstance(cells, _Malformed):
                row = cells
            elif len(cells) > len(columns):
                row = _Malformed(f"{len(cells)} cells but the header has {len(columns)}")
            else:
                row = dict(zip(columns, cells + [None] * (len(columns) - len(cells))))
            yield lineno, row, text


def _read_csv(path: Path) -> _Rows:
    """Rows as dicts by header name (missing cells are None), each record's own lines kept as its raw text."""
    records = _iter_csv(path)
    columns, header = next(records)
    read = _Rows([], [], [], columns=columns, header=header)
    for lineno, row, text in records:
        read.rows.append(row)
        read.linenos.append(lineno)
        read.raw.append(text)
    return read


# Rows of a Parquet file converted to Python at a time: bounds the memory of a streaming pass.
PARQUET_BATCH_ROWS = 4096


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet ({e}).") from None


def _iter_parquet(path: Path, on_batch=None) -> Iterator[tuple[int, Any, None]]:
    """(row number, row, None) for every row, a record batch at a time; `on_batch(batch, first row index)` is
    called before each batch's rows are given (the streaming writer writes the batch's kept and removed rows)."""
    start, batches = 0, _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a corrupt page shows only when it is read
            raise DataError(f"{path}: cannot read as Parquet ({e}).") from None
        if on_batch is not None:
            on_batch(batch, start)
        for j, row in enumerate(batch.to_pylist()):
            yield start + j + 1, row, None
        start += batch.num_rows


def _read_rows(path: Path, fmt: str) -> _Rows:
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        return _read_json(path)
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as Parquet ({e}).") from None
        return _Rows(table.to_pylist(), list(range(1, table.num_rows + 1)), table=table, columns=table.column_names)
    if fmt == "datasets":
        import datasets

        pickles = find_pickles(path)
        if pickles:
            raise DataError(f"{path}: holds {pickles[0].name}, a pickle (loading one can run code); a dataset "
                            "folder saved by datasets.Dataset.save_to_disk holds only .arrow and .json files. "
                            "Remove the file or pass the data as JSONL, CSV or Parquet.")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load with datasets.load_from_disk ({e}).") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder, "
                            f"e.g. {path / next(iter(ds))}.")
        return _Rows(ds.to_list(), list(range(1, len(ds) + 1)), table=ds, columns=ds.column_names)
    raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")


class _Malformed:
    def __init__(self, reason: str):
        self.reason = reason


def _text(row: dict, name: str, *, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise _RowError(f"field {name!r} is missing")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be text, got {type(value).__name__}")
    return value


class _RowError(Exception):
    pass


def _schema_of(row: dict, opts: FieldOptions) -> str:
    if opts.messages_field:
        return "messages"
    if opts.prompt_field:
        return "prompt_response"
    for key in ("messages", "conversations", "conversation"):
        if isinstance(row.get(key), list):
            return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "prompt" in row and "response" in row:
        return "prompt_response"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row and "response" in row:
        return "dolly"
    if "question" in row and "answer" in row:
        return "question_answer"
    raise _RowError(f"no known schema in fields {sorted(row)}; expected messages, prompt/completion, "
                    "prompt/response, instruction/input/output or question/answer. Name the fields with "
                    "--prompt-field and --response-field (or --messages-field)")


def _messages_of(row: dict, schema: str, opts: FieldOptions) -> list[dict[str, str]]:
    if schema == "messages":
        key = opts.messages_field or next(k for k in ("messages", "conversations", "conversation") if k in row)
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise _RowError(f"field {key!r} must be a non-empty list of turns")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _RowError(f"{key}[{j}] must be an object with role and content")
            role_key, content_key = next(((r, c) for r, c in ROLE_KEYS if r in turn), ("role", "content"))
            role = ROLE_ALIASES.get(str(turn.get(role_key)), turn.get(role_key))
            content = turn.get(content_key)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise _RowError(f"{key}[{j}] needs role system/user/assistant and text content, got {turn!r:.80}")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "assistant":
            raise _RowError(f"the last turn of {key!r} must be the assistant's response, got {messages[-1]['role']!r}")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise _RowError(f"{key!r} has no user turn before the response")
        return messages
    if schema == "prompt_response":
        prompt = _text(row, opts.prompt_field or "prompt")
        response = _text(row, opts.response_field or "response")
    elif schema == "prompt_completion":
        prompt, response = _text(row, "prompt"), _text(row, "completion")
    elif schema == "alpaca":
        prompt, extra = _text(row, "instruction"), _text(row, "input", required=False)
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        response = _text(row, "output")
    elif schema == "dolly":
        prompt, extra = _text(row, "instruction"), _text(row, "context", required=False)
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        response = _text(row, "response")
    elif schema == "question_answer":
        prompt, response = _text(row, "question"), _text(row, "answer")
    else:  # pragma: no cover - _schema_of only returns the names above
        raise AssertionError(schema)
    if not prompt.strip():
        raise _RowError("the prompt is empty")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _label_of(row: dict, opts: FieldOptions) -> tuple[int | None, str | None]:
    name = opts.label_field or next((f for f in LABEL_FIELDS if f in row), None)
    if name is None:
        return None, None
    if name not in row:
        raise _RowError(f"label field {name!r} is missing")
    value = row[name]
    if value is None or value == "":
        return None, name
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        flag = bool(value)
    elif isinstance(value, str) and value.strip().lower() in TRUE_STRINGS | FALSE_STRINGS:
        word = value.strip().lower()
        flag = word in TRUE_STRINGS
        if word in ("harmful", "unsafe", "safe", "benign", "harmless"):
            # A word states its meaning whatever the field is called.
            return int(word in ("harmful", "unsafe")), name
    else:
        raise _RowError(f"label field {name!r} has value {value!r}; use true/false, 1/0, or harmful/safe")
    meaning = opts.label_meaning or ("safe" if name in SAFE_MEANING_FIELDS else "harmful")
    return int(flag if meaning == "harmful" else not flag), name


class _RowParser:
    """Turns rows into `Sample`s one at a time, with the checks that span rows (unique ids) and what a load
    reports at the end (schemas, skipped rows, rows with lone surrogates). Both loaders run rows through this,
    so a streamed dataset has exactly the samples, ids, labels and errors of a loaded one."""

    def __init__(self, path: Path, fmt: str, opts: FieldOptions, skip_invalid: bool, *, check_ids: bool = True):
        self.path, self.opts, self.skip_invalid, self.check_ids = path, opts, skip_invalid, check_ids
        self.where = "line" if fmt in ("jsonl", "csv") else "row"
        self.seen_ids: dict[str, int] = {}
        self.schemas: set[str] = set()
        self.skipped: list[tuple[int, str, str]] = []
        self.n_rows = self.n_replaced = 0

    def parse(self, i: int, row: Any, lineno: int, raw: str | None) -> Sample | None:
        """The sample of row `i` (0-based among the rows read), or None when it is skipped as invalid."""
        self.n_rows += 1
        opts = self.opts
        try:
            if isinstance(row, _Malformed):
                raise _RowError(row.reason)
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {type(row).__name__}")
            schema = _schema_of(row, opts)
            messages, replaced = _valid_unicode(_messages_of(row, schema, opts))
            label, _ = _label_of(row, opts)
            id_name = opts.id_field or ("id" if "id" in row else None)
            if id_name is not None and id_name not in row:
                raise _RowError(f"id field {id_name!r} is missing")
            sid = str(row[id_name]) if id_name else str(i)
            if self.check_ids and sid in self.seen_ids:
                raise _RowError(f"id {sid!r} repeats the id of {self.where} {self.seen_ids[sid]}; ids must be unique")
        except (_RowError, RecursionError) as e:
            reason = str(e) if isinstance(e, _RowError) else "nested too deeply to read"
            msg = f"{self.path}, {self.where} {lineno}: {reason}."
            if not self.skip_invalid:
                raise DataError(msg + " Fix the row, or pass --skip-invalid to skip such rows.") from None
            self.skipped.append((lineno, reason, raw if raw is not None else _row_text(row)))
            return None
        self.n_replaced += replaced
        if self.check_ids:
            self.seen_ids[sid] = lineno
        self.schemas.add(schema)
        return Sample(id=sid, messages=messages, label=label, meta={"row": i, "line": lineno})

    def finish(self, n_samples: int) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d invalid rows (first: %s %d: %s)", self.path, len(self.skipped), self.where,
                           *self.skipped[0][:2])
        if self.n_replaced:
            logger.warning("%s: %d samples hold lone surrogates (not valid Unicode); the model sees U+FFFD in their "
                           "place", self.path, self.n_replaced)
        if not n_samples:
            raise DataError(f"{self.path}: no usable samples ({self.n_rows} rows read, {len(self.skipped)} invalid). "
                            "Check that the file holds fine-tuning samples.")
        self.seen_ids = {}

    @property
    def schema(self) -> str:
        return "+".join(sorted(self.schemas))


def _checked_path(path, format: str | None) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return path, fmt


class _reading:
    """Turns the errors of reading a file into `DataError`s naming it (a context manager around a pass)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UnicodeDecodeError):
            raise DataError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Re-encode the file as "
                            "UTF-8.") from None
        if exc_type is not None and issubclass(exc_type, OSError):
            raise DataError(f"{self.path}: cannot read ({exc.strerror}).") from None
        return False


def load_samples(path: str | os.PathLike, *, format: str | None = None, fields: FieldOptions | None = None,
                 skip_invalid: bool = False) -> Dataset:
    """Read a dataset file or folder into a `Dataset` of `Sample`s, every row in memory (`scan_samples` reads
    JSONL, CSV and Parquet without holding their rows).

    Raises `DataError` naming the file, row (line for JSONL/CSV) and field of the first bad row, unless
    `skip_invalid` is set: then bad rows are skipped and listed, with their raw text, in `Dataset.skipped`.
    Text that is not valid Unicode (a lone surrogate, written as a JSON escape) reaches the model with U+FFFD
    in its place; the row itself is kept as written.
    """
    path, fmt = _checked_path(path, format)
    with _reading(path):
        read = _read_rows(path, fmt)
    parser = _RowParser(path, fmt, fields or FieldOptions(), skip_invalid)
    samples, rows, index, raw_kept = [], [], [], []
    for i, (row, lineno) in enumerate(zip(read.rows, read.linenos)):
        sample = parser.parse(i, row, lineno, read.raw[i] if read.raw is not None else None)
        if sample is None:
            continue
        samples.append(sample)
        rows.append(row)
        index.append(i)
        if read.raw is not None:
            raw_kept.append(read.raw[i])
    parser.finish(len(samples))
    return Dataset(path=path, format=fmt, samples=samples, rows=rows, row_index=index, schema=parser.schema,
                   table=read.table, columns=read.columns, skipped=parser.skipped,
                   raw=raw_kept if read.raw is not None else None, header=read.header)


STREAMED_FORMATS = ("jsonl", "csv", "parquet")


def _stream_rows(path: Path, fmt: str, on_batch=None):
    """(columns, header, rows): `rows` yields (line or row number, row or `_Malformed`, raw text or None) in
    file order, reading a line (JSONL), a record (CSV) or a record batch (Parquet) at a time."""
    if fmt == "jsonl":
        return None, None, _iter_jsonl(path)
    if fmt == "csv":
        records = _iter_csv(path)
        columns, header = next(records)
        return columns, header, records
    if fmt == "parquet":
        return _parquet_file(path).schema_arrow.names, None, _iter_parquet(path, on_batch)
    raise AssertionError(fmt)  # pragma: no cover - callers pass STREAMED_FORMATS only


class StreamedDataset:
    """A JSONL, CSV or Parquet dataset read in passes, never held whole: in memory stay each sample's line (row)
    number and label, and the invalid rows `skip_invalid` dropped. The samples are read again from the file for
    each pass that needs them (`iter_samples`), and `write_parts` writes subsets back in one pass, each row as
    its input text (JSONL, CSV) or its input table's row (Parquet). The file must not change between passes; a
    pass that finds it changed raises `DataError`.

    `samples` and `rows` give the whole lists (read once, then kept), for callers that need them all at once.
    """

    def __init__(self, path: Path, format: str, fields: FieldOptions, skip_invalid: bool, *, schema: str,
                 lines: np.ndarray, labels: np.ndarray, skipped: list, columns, header, n_rows: int):
        self.path, self.format, self.fields, self.skip_invalid = path, format, fields, skip_invalid
        self.schema, self.lines, self._labels, self.skipped = schema, lines, labels, skipped
        self.columns, self.header, self.n_rows = columns, header, n_rows
        self._samples: list[Sample] | None = None
        self._rows: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def labels(self) -> list[int | None]:
        return [None if v < 0 else int(v) for v in self._labels]

    def records(self, on_batch=None) -> Iterator[tuple[Sample, Any, str | None]]:
        """(sample, parsed row, raw text or None) of every sample, in order, read from the file again."""
        parser = _RowParser(self.path, self.format, self.fields, True, check_ids=False)
        k, n, n_rows = 0, len(self.lines), 0
        with _reading(self.path):
            _, _, rows = _stream_rows(self.path, self.format, on_batch)
            for i, (lineno, row, raw) in enumerate(rows):
                n_rows += 1
                if k < n and lineno == self.lines[k]:  # the rows between are the invalid ones skipped
                    sample = parser.parse(i, row, lineno, raw)
                    if sample is None:
                        break
                    yield sample, row, raw
                    k += 1
        if k != n or n_rows != self.n_rows:
            raise DataError(f"{self.path}: changed while it was being read ({k} of {n} samples found again); rerun "
                            "on a file that is not being written to.")

    def iter_samples(self) -> Iterator[Sample]:
        if self._samples is not None:  # read whole already (`samples`)
            yield from self._samples
            return
        for sample, _, _ in self.records():
            yield sample

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def _load(self) -> None:
        self._samples, self._rows = [], []
        for sample, row, _ in self.records():
            self._samples.append(sample)
            self._rows.append(row)

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._load()
        return self._samples

    @property
    def rows(self) -> list[Any]:
        if self._rows is None:
            self._load()
        return self._rows


def scan_samples(path: str | os.PathLike, *, format: str | None = None, fields: FieldOptions | None = None,
                 skip_invalid: bool = False) -> Dataset | StreamedDataset:
    """Like `load_samples`, with the same samples, checks and errors, but JSONL, CSV and Parquet are read in a
    streaming pass and come back as a `StreamedDataset`, whose memory is a few bytes a row. JSON (one list) and
    `datasets` folders are read whole (`load_samples`)."""
    path, fmt = _checked_path(path, format)
    if fmt not in STREAMED_FORMATS:
        return load_samples(path, format=fmt, fields=fields, skip_invalid=skip_invalid)
    opts = fields or FieldOptions()
    for exact in (False, True):
        # Ids are checked unique by an 8-byte hash each; only when two hashes agree (an id may repeat) is the
        # file scanned again with every id held, which finds the repeat and names both lines.
        parser = _RowParser(path, fmt, opts, skip_invalid, check_ids=exact)
        lines, labels, hashes = array("q"), array("b"), array("q")
        with _reading(path):
            columns, header, rows = _stream_rows(path, fmt)
            for i, (lineno, row, raw) in enumerate(rows):
                sample = parser.parse(i, row, lineno, raw)
                if sample is not None:
                    lines.append(lineno)
                    labels.append(-1 if sample.label is None else sample.label)
                    if not exact:
                        digest = hashlib.blake2b(sample.id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                        hashes.append(int.from_bytes(digest, "little", signed=True))
        if exact or len(np.unique(np.frombuffer(hashes, dtype=np.int64))) == len(hashes):
            break
    parser.finish(len(lines))
    return StreamedDataset(path, fmt, opts, skip_invalid, schema=parser.schema,
                           lines=np.frombuffer(lines, dtype=np.int64), labels=np.frombuffer(labels, dtype=np.int8),
                           skipped=parser.skipped, columns=columns, header=header, n_rows=parser.n_rows)


def parse_records(records: Iterable[tuple[int, Any, str | None]], *, path: str | os.PathLike, format: str,
                  fields: FieldOptions | None = None) -> Iterator[Sample]:
    """The samples of (line or row number, row, raw text) records another reader read (Ray Data's, for
    `--engine ray`; JSONL lines through `jsonl_records`). Each row is parsed as this module's readers parse it, so
    its sample (messages and all) is the one `scan_samples` gives; invalid rows are left out without a word (the
    reader that reports them, and the checks across rows such as unique ids, belong to the pass that writes the
    outputs)."""
    parser = _RowParser(Path(path), format, fields or FieldOptions(), True, check_ids=False)
    for i, (lineno, row, raw) in enumerate(records):
        sample = parser.parse(i, row, lineno, raw)
        if sample is not None:
            yield sample
        parser.skipped.clear()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Messages with lone surrogates replaced by U+FFFD (tokenizers reject them), and 1 if any was replaced."""
    if all(_SURROGATE.search(m["content"]) is None for m in messages):
        return messages, 0
    return [{**m, "content": _SURROGATE.sub("\ufffd", m["content"])} for m in messages], 1


def _row_text(row: Any) -> str:
    """A parsed row as JSON text (for rows of formats without a text of their own: Parquet, `datasets`)."""
    if isinstance(row, _Malformed):
        return ""
    try:
        return json.dumps(row, ensure_ascii=False, default=repr)
    except (RecursionError, ValueError):
        return repr(row)


PROMPT_FIELDS = ("prompt", "instruction", "question", "goal")


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts only (no responses needed): a .txt file with one prompt a line, a JSON/JSONL list of objects with
    a prompt/instruction/question field, or a JSON object holding an "instructions" list."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        fmt = detect_format(path)
        data = json.loads(path.read_text(encoding="utf-8")) if fmt == "json" else None
        if isinstance(data, dict) and isinstance(data.get("instructions"), list):
            rows = [{"prompt": p} for p in data["instructions"]]
        else:
            rows = _read_rows(path, fmt).rows
        prompts = []
        for i, row in enumerate(rows, 1):
            name = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
            if name is None:
                raise DataError(f"{path}, row {i}: no text field named {', '.join(PROMPT_FIELDS)}.")
            prompts.append(row[name])
    if not prompts:
        raise DataError(f"{path}: no prompts found.")
    return prompts


def output_name(dataset: Dataset, stem: str) -> str:
    """File name for a subset of `dataset` written in its own format: kept.jsonl, removed.csv, kept/ ..."""
    return stem if dataset.format == "datasets" else f"{stem}.{dataset.format}"


def write_subset(dataset: Dataset | StreamedDataset, positions: Sequence[int], path: str | os.PathLike) -> Path:
    """Write the rows at `positions` (indices into `dataset.samples`) in the dataset's format, atomically.

    JSONL, JSON and CSV rows are written as their input text (a JSON file's rows as one list, a CSV file's under
    its header); Parquet and `datasets` rows as the input table's rows.
    """
    path = Path(path)
    if isinstance(dataset, StreamedDataset):
        part = np.full(len(dataset), -1, dtype=np.int8)
        part[np.asarray(positions, dtype=np.int64)] = 0
        return write_parts(dataset, part, [path])[0]
    fmt = dataset.format
    if fmt == "datasets":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            subset = dataset.table.select([dataset.row_index[p] for p in positions])
            # num_shards=1 for an empty subset: with zero shards load_from_disk cannot read the folder back
            subset.save_to_disk(str(tmp / "ds"), **({"num_shards": 1} if not positions else {}))
            os.chmod(tmp / "ds", output_mode(path, folder=True))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp / "ds", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    raw = [dataset.raw[p] for p in positions] if dataset.raw is not None else None
    # newline="" throughout: the rows' own line endings are written as they were read.
    with atomic_open(path, "wb" if fmt == "parquet" else "w", newline="") as f:
        if fmt == "jsonl":
            for line in raw:
                f.write(line + "\n")
        elif fmt == "json":
            if raw is not None:
                f.write("[\n" + ",\n".join(raw) + "\n]\n")
            else:  # the list sat inside an object: its rows have no text of their own
                f.write(json_text([dataset.rows[p] for p in positions], indent=1) + "\n")
        elif fmt == "csv":
            header, end = _csv_header(dataset.header)
            f.write(header)
            for record in raw:  # only the file's last record can lack a line ending
                f.write(record if record.endswith(("\n", "\r")) else record + end)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            # typed indices: an empty Python list would be a null array, which take() refuses
            take = pa.array([dataset.row_index[p] for p in positions], type=pa.int64())
            pq.write_table(dataset.table.take(take), f)
    return path

def _csv_header(header: str) -> tuple[str, str]:
    """(the header as written, with a line ending; the line ending records lacking one get)."""
    end = "\r\n" if header.endswith("\r\n") else "\n"
    return (header if header.endswith(("\n", "\r")) else header + end), end


def write_parts(dataset: Dataset | StreamedDataset, part: Sequence[int], paths: Sequence[str | os.PathLike], *,
                on_sample=None) -> list[Path]:
    """Write every sample to `paths[part[k]]` (k: its position in the dataset; -1: to none), each output in the
    dataset's format and atomically, as `write_subset` writes it; `on_sample(k, sample)` is called for every
    sample in order (scores.jsonl is written alongside). A `StreamedDataset` is read once, in one pass for every
    output; a `Dataset` is in memory already."""
    paths = [Path(p) for p in paths]
    part = np.asarray(part)
    if len(part) != len(dataset):
        raise ValueError(f"part has {len(part)} entries for {len(dataset)} samples")
    if not isinstance(dataset, StreamedDataset):
        for j, path in enumerate(paths):
            write_subset(dataset, np.flatnonzero(part == j).tolist(), path)
        if on_sample is not None:
            for k, sample in enumerate(dataset.samples):
                on_sample(k, sample)
        return paths
    fmt = dataset.format
    with ExitStack() as stack:
        files = [stack.enter_context(atomic_open(p, "wb" if fmt == "parquet" else "w", newline="")) for p in paths]
        on_batch = None
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _parquet_file(dataset.path).schema_arrow
            writers = [stack.enter_context(pq.ParquetWriter(f, schema)) for f in files]
            positions = dataset.lines - 1  # each sample's row in the table

            def write_batch(batch, start):  # this batch's kept and removed rows, in table order
                lo, hi = np.searchsorted(positions, [start, start + batch.num_rows])
                for j, writer in enumerate(writers):
                    local = positions[lo:hi][part[lo:hi] == j] - start
                    if len(local):
                        writer.write_batch(batch.take(pa.array(local, type=pa.int64())))

            on_batch = write_batch
        elif fmt == "csv":
            header, end = _csv_header(dataset.header)
            for f in files:
                f.write(header)
        for k, (sample, _, raw) in enumerate(dataset.records(on_batch)):
            j = part[k]
            if j >= 0 and fmt == "jsonl":
                files[j].write(raw + "\n")
            elif j >= 0 and fmt == "csv":  # only the file's last record can lack a line ending
                files[j].write(raw if raw.endswith(("\n", "\r")) else raw + end)
            if on_sample is not None:
                on_sample(k, sample)
    return paths


def write_invalid(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write the rows `skip_invalid` dropped, one JSON object a line: the line (JSONL, CSV) or row number, the
    reason, and the row's raw text (for Parquet and `datasets` rows, the row as JSON)."""
    key = "line" if dataset.format in ("jsonl", "csv") else "row"
    return write_jsonl(({key: n, "reason": reason, "raw": raw} for n, reason, raw in dataset.skipped), path)


def json_text(obj: Any, **kwargs) -> str:
    """`json.dumps` with text as written (ensure_ascii off), except for text that UTF-8 cannot encode (lone
    surrogates, which a JSON escape can hold): that is escaped, so the output is valid UTF-8 and loses nothing."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    if _SURROGATE.search(text) is None:
        return text
    return json.dumps(obj, ensure_ascii=True, **kwargs)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it, and
    setting it to read it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(path: Path, *, folder: bool = False) -> int:
    """Permission bits an output written at `path` gets: the existing file's, else what open() (mkdir for a
    folder) would give it: 0o666 (0o777) less the umask. mkstemp's files and mkdtemp's folders are 0o600 and
    0o700, so atomic writes set this explicitly."""
    try:
        if not path.is_symlink():
            return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    return (0o777 if folder else 0o666) & ~_umask()


class atomic_open:
    """Open a temporary file next to `path`; on a clean exit it replaces `path`, on an error it is removed.

    The file gets the mode an ordinary open() would give it (`output_mode`). A link at `path` is replaced, never
    followed, so an output cannot be sent elsewhere by a link planted in the output folder.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", *, newline: str | None = None):
        self.path = Path(path)
        self.mode = mode
        self.newline = "" if newline is None and self.path.suffix == ".csv" else newline

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, output_mode(self.path))
            kwargs = {} if "b" in self.mode else {"encoding": "utf-8", "newline": self.newline}
            self.f = os.fdopen(fd, self.mode, **kwargs)
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            self.f.close()
        except BaseException:
            os.unlink(self.tmp)
            raise
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def write_jsonl(records: Iterator[dict] | Sequence[dict], path: str | os.PathLike) -> Path:
    with atomic_open(path) as f:
        for r in records:
            f.write(json_text(r) + "\n")
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_open(path) as f:
        f.write(json_text(obj, indent=2) + "\n")
    return Path(path)
