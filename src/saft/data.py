"""Read fine-tuning datasets into `Sample`s, and write subsets back in the input's own format.

Formats: JSONL, JSON (a list of objects), CSV, Parquet and a folder saved by `datasets.Dataset.save_to_disk`.
Schemas, tried in this order unless fields are named explicitly:
chat `messages`/`conversations` (the last assistant turn is the response, earlier turns are context),
`prompt`/`completion`, `prompt`/`response`, `instruction`/`input`/`output`, `instruction`/`context`/`response`
(Dolly), `question`/`answer`.

Raw rows are kept untouched next to the parsed samples so that `write_subset` can write kept and removed rows
with every input field preserved: for JSONL, JSON and CSV the row's own text, byte for byte (key order, number
spelling, escapes, quoting); for Parquet and `datasets` folders the table's own rows. Rows that cannot be used are
kept too (`Dataset.skipped`, with their raw text) so that `write_invalid` can write them out: every input row ends
in exactly one output. Nothing here knows about models or tokenizers.

Untrusted input: nothing here unpickles, and a `datasets` folder that holds a pickle is refused.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def _read_jsonl(path: Path) -> _Rows:
    # Lines end at "\n" only (JSONL's definition), so a lone "\r" or U+2028 inside a line does not split it; the
    # file is read as bytes so that one line that is not UTF-8 is one invalid row, not an unreadable file.
    rows, lines, raw = [], [], []
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, 1):
            if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, written by some editors
                data = data[3:]
            text, problem = _utf8(data)
            text = text[:-1] if text.endswith("\n") else text
            text = text[:-1] if text.endswith("\r") else text
            if not text.strip(JSON_WHITESPACE):
                continue
            if problem:
                rows.append(_Malformed(problem))
            else:
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError as e:
                    rows.append(_Malformed(f"not valid JSON ({e.msg} at column {e.colno})"))
                except RecursionError:
                    rows.append(_Malformed("nested deeper than the JSON reader allows"))
            lines.append(lineno)
            raw.append(text)
    return _Rows(rows, lines, raw)


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


def _read_csv(path: Path) -> _Rows:
    """Rows as dicts by header name (missing cells are None), each record's own lines kept as its raw text."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    rows, lines, raw = [], [], []
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
            lines.append(reader.line_num - n_lines + 1)  # where the record starts (a quoted cell may span lines)
            raw.append(text)
            if isinstance(cells, _Malformed):
                rows.append(cells)
            elif len(cells) > len(columns):
                rows.append(_Malformed(f"{len(cells)} cells but the header has {len(columns)}"))
            else:
                rows.append(dict(zip(columns, cells + [None] * (len(columns) - len(cells)))))
    return _Rows(rows, lines, raw, columns=columns, header=header)


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


def load_samples(path: str | os.PathLike, *, format: str | None = None, fields: FieldOptions | None = None,
                 skip_invalid: bool = False) -> Dataset:
    """Read a dataset file or folder into a `Dataset` of `Sample`s.

    Raises `DataError` naming the file, row (line for JSONL/CSV) and field of the first bad row, unless
    `skip_invalid` is set: then bad rows are skipped and listed, with their raw text, in `Dataset.skipped`.
    Text that is not valid Unicode (a lone surrogate, written as a JSON escape) reaches the model with U+FFFD
    in its place; the row itself is kept as written.
    """
    path = Path(path)
    opts = fields or FieldOptions()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    try:
        read = _read_rows(path, fmt)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Re-encode the file as UTF-8.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}).") from None
    where = "line" if fmt in ("jsonl", "csv") else "row"
    samples, rows, index, skipped = [], [], [], []
    schemas, seen_ids, label_names = set(), {}, set()
    raw_rows, linenos, raw_kept, n_replaced = read.rows, read.linenos, [], 0
    for i, (row, lineno) in enumerate(zip(raw_rows, linenos)):
        try:
            if isinstance(row, _Malformed):
                raise _RowError(row.reason)
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {type(row).__name__}")
            schema = _schema_of(row, opts)
            messages, replaced = _valid_unicode(_messages_of(row, schema, opts))
            label, label_name = _label_of(row, opts)
            id_name = opts.id_field or ("id" if "id" in row else None)
            if id_name is not None and id_name not in row:
                raise _RowError(f"id field {id_name!r} is missing")
            sid = str(row[id_name]) if id_name else str(i)
            if sid in seen_ids:
                raise _RowError(f"id {sid!r} repeats the id of {where} {seen_ids[sid]}; ids must be unique")
        except (_RowError, RecursionError) as e:
            reason = str(e) if isinstance(e, _RowError) else "nested too deeply to read"
            msg = f"{path}, {where} {lineno}: {reason}."
            if not skip_invalid:
                raise DataError(msg + " Fix the row, or pass --skip-invalid to skip such rows.") from None
            skipped.append((lineno, reason, read.raw[i] if read.raw is not None else _row_text(row)))
            continue
        n_replaced += replaced
        seen_ids[sid] = lineno
        schemas.add(schema)
        if label_name:
            label_names.add(label_name)
        samples.append(Sample(id=sid, messages=messages, label=label, meta={"row": i, "line": lineno}))
        rows.append(row)
        index.append(i)
        if read.raw is not None:
            raw_kept.append(read.raw[i])
    if skipped:
        logger.warning("%s: skipped %d invalid rows (first: %s %d: %s)", path, len(skipped), where, *skipped[0][:2])
    if n_replaced:
        logger.warning("%s: %d samples hold lone surrogates (not valid Unicode); the model sees U+FFFD in their place",
                       path, n_replaced)
    if not samples:
        raise DataError(f"{path}: no usable samples ({len(raw_rows)} rows read, {len(skipped)} invalid). "
                        "Check that the file holds fine-tuning samples.")
    return Dataset(path=path, format=fmt, samples=samples, rows=rows, row_index=index,
                   schema="+".join(sorted(schemas)), table=read.table, columns=read.columns, skipped=skipped,
                   raw=raw_kept if read.raw is not None else None, header=read.header)


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


def write_subset(dataset: Dataset, positions: Sequence[int], path: str | os.PathLike) -> Path:
    """Write the rows at `positions` (indices into `dataset.samples`) in the dataset's format, atomically.

    JSONL, JSON and CSV rows are written as their input text (a JSON file's rows as one list, a CSV file's under
    its header); Parquet and `datasets` rows as the input table's rows.
    """
    path = Path(path)
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
            end = "\r\n" if dataset.header.endswith("\r\n") else "\n"
            f.write(dataset.header if dataset.header.endswith(("\n", "\r")) else dataset.header + end)
            for record in raw:  # only the file's last record can lack a line ending
                f.write(record if record.endswith(("\n", "\r")) else record + end)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            # typed indices: an empty Python list would be a null array, which take() refuses
            take = pa.array([dataset.row_index[p] for p in positions], type=pa.int64())
            pq.write_table(dataset.table.take(take), f)
    return path


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
