"""Read fine-tuning datasets into `Sample`s, and write subsets back in the input's own format.

Formats: JSONL, JSON (a list of objects), CSV, Parquet and a folder saved by `datasets.Dataset.save_to_disk`.
Schemas, tried in this order unless fields are named explicitly:
chat `messages`/`conversations` (the last assistant turn is the response, earlier turns are context),
`prompt`/`completion`, `prompt`/`response`, `instruction`/`input`/`output`, `instruction`/`context`/`response`
(Dolly), `question`/`answer`.

Raw rows are kept untouched next to the parsed samples so that `write_subset` can write kept and removed rows
with every input field preserved. Nothing here knows about models or tokenizers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
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

    `rows[i]` is the raw record behind `samples[i]` (for Parquet and `datasets` folders, `row_index[i]` is its
    position in `table`). `skipped` lists (row number, reason) for rows dropped by `skip_invalid`.
    """

    path: Path
    format: str
    samples: list[Sample]
    rows: list[Any]
    row_index: list[int]
    schema: str
    table: Any = None
    columns: list[str] | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)

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


def _read_rows(path: Path, fmt: str) -> tuple[list[Any], Any, list[str] | None, list[int]]:
    """Return (rows, table, columns, line_numbers): line numbers are 1-based where the format has lines."""
    if fmt == "jsonl":
        rows, lines = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_Malformed(f"not valid JSON ({e.msg} at column {e.colno})"))
                lines.append(lineno)
        return rows, None, None, lines
    if fmt == "json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}). Fix the file, or use JSONL "
                                "(one object a line) so that --skip-invalid can skip bad rows.") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError(f"{path}: JSON must be a list of objects (one per sample), got {type(data).__name__}.")
        return data, None, None, list(range(1, len(data) + 1))
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        # DictReader puts surplus cells under the key None: a row with more cells than the header.
        for i, row in enumerate(rows):
            if None in row:
                rows[i] = _Malformed(f"{len(columns) + len(row[None])} cells but the header has {len(columns)}")
        return rows, None, columns, list(range(2, len(rows) + 2))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as Parquet ({e}).") from None
        return table.to_pylist(), table, table.column_names, list(range(1, table.num_rows + 1))
    if fmt == "datasets":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load with datasets.load_from_disk ({e}).") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder, "
                            f"e.g. {path / next(iter(ds))}.")
        return ds.to_list(), ds, ds.column_names, list(range(1, len(ds) + 1))
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
    `skip_invalid` is set: then bad rows are skipped and listed in `Dataset.skipped`.
    """
    path = Path(path)
    opts = fields or FieldOptions()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    try:
        raw_rows, table, columns, linenos = _read_rows(path, fmt)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Re-encode the file as UTF-8.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}).") from None
    where = "line" if fmt in ("jsonl", "csv") else "row"
    samples, rows, index, skipped = [], [], [], []
    schemas, seen_ids, label_names = set(), {}, set()
    for i, (row, lineno) in enumerate(zip(raw_rows, linenos)):
        try:
            if isinstance(row, _Malformed):
                raise _RowError(row.reason)
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {type(row).__name__}")
            schema = _schema_of(row, opts)
            messages = _messages_of(row, schema, opts)
            label, label_name = _label_of(row, opts)
            id_name = opts.id_field or ("id" if "id" in row else None)
            if id_name is not None and id_name not in row:
                raise _RowError(f"id field {id_name!r} is missing")
            sid = str(row[id_name]) if id_name else str(i)
            if sid in seen_ids:
                raise _RowError(f"id {sid!r} repeats the id of {where} {seen_ids[sid]}; ids must be unique")
        except _RowError as e:
            msg = f"{path}, {where} {lineno}: {e}."
            if not skip_invalid:
                raise DataError(msg + " Fix the row, or pass --skip-invalid to skip such rows.") from None
            skipped.append((lineno, str(e)))
            continue
        seen_ids[sid] = lineno
        schemas.add(schema)
        if label_name:
            label_names.add(label_name)
        samples.append(Sample(id=sid, messages=messages, label=label, meta={"row": i, "line": lineno}))
        rows.append(row)
        index.append(i)
    if skipped:
        logger.warning("%s: skipped %d invalid rows (first: %s %d: %s)", path, len(skipped), where, *skipped[0])
    if not samples:
        raise DataError(f"{path}: no usable samples ({len(raw_rows)} rows read, {len(skipped)} invalid). "
                        "Check that the file holds fine-tuning samples.")
    return Dataset(path=path, format=fmt, samples=samples, rows=rows, row_index=index,
                   schema="+".join(sorted(schemas)), table=table, columns=columns, skipped=skipped)


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
            rows, _, _, _ = _read_rows(path, fmt)
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
    """Write the raw rows at `positions` (indices into `dataset.samples`) in the dataset's format, atomically."""
    path = Path(path)
    rows = [dataset.rows[p] for p in positions]
    fmt = dataset.format
    if fmt == "datasets":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            dataset.table.select([dataset.row_index[p] for p in positions]).save_to_disk(str(tmp / "ds"))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp / "ds", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    with atomic_open(path, "wb" if fmt == "parquet" else "w") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif fmt == "json":
            json.dump(rows, f, ensure_ascii=False, indent=1)
        elif fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=dataset.columns)
            writer.writeheader()
            writer.writerows(rows)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(dataset.table.take([dataset.row_index[p] for p in positions]), f)
    return path


class atomic_open:
    """Open a temporary file next to `path`; on a clean exit it replaces `path`, on an error it is removed."""

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        self.path = Path(path)
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        kwargs = {} if "b" in self.mode else {"encoding": "utf-8", "newline": "" if self.path.suffix == ".csv" else None}
        self.f = os.fdopen(fd, self.mode, **kwargs)
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def write_jsonl(records: Iterator[dict] | Sequence[dict], path: str | os.PathLike) -> Path:
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return Path(path)
