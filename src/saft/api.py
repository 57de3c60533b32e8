"""`saft.filter`: one call from the user's own data to kept rows, removed rows, scores and a summary.

The data may be a file or folder path (anything `saft filter` reads), a list of dicts, a pandas DataFrame or a
`datasets.Dataset`; kept and removed come back in the same type (a path gives lists of its rows), holding the
user's own rows untouched. Every detector and rule of `saft filter` is reachable through the keyword options,
which are `FilterConfig`'s fields.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import FieldOptions
from .pipeline import FilterConfig, FilterResult, filter_dataset, score_rows


@dataclass
class FilterOutput:
    """`kept` and `removed`: the input rows in the input's type; `scores`: one dict per scored row (id,
    harm_score, rank, removed, reason, label when known), as in scores.jsonl; `summary`: as in summary.json;
    `result`: the full `FilterResult`."""

    kept: Any
    removed: Any
    scores: list[dict]
    summary: dict
    result: FilterResult


def _json_default(value):
    """numpy scalars and other non-JSON cells of a DataFrame or Dataset: as Python values, else as text."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def _records(data) -> tuple[str, list[dict]] | None:
    """(kind, rows) for in-memory data; None for a path."""
    if isinstance(data, (str, os.PathLike)):
        return None
    if isinstance(data, list):
        if not all(isinstance(r, dict) for r in data):
            bad = next(i for i, r in enumerate(data) if not isinstance(r, dict))
            raise TypeError(f"saft.filter: item {bad} of the list is a {type(data[bad]).__name__}, not a dict; "
                            "pass a list of dicts (one per sample)")
        return "list", data
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return "pandas", data.to_dict("records")
    except ImportError:  # pandas comes with datasets; without it a DataFrame cannot have been passed
        pass
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            return "datasets", data.to_list()
    except ImportError:
        pass
    raise TypeError(f"saft.filter takes a path, a list of dicts, a pandas DataFrame or a datasets.Dataset; "
                    f"got {type(data).__name__}")


def _subset(data, kind: str, positions: list[int]):
    if kind == "list":
        return [data[i] for i in positions]
    if kind == "pandas":
        return data.iloc[positions]
    return data.select(positions)


def filter(data, *, output_dir=None, fields: FieldOptions | None = None, skip_invalid: bool = False,  # noqa: A001
           progress: bool = False, report: bool = False, model=None, tokenizer=None, **options) -> FilterOutput:
    """Filter `data` (see the module docstring) with `FilterConfig(**options)`, e.g.
    `saft.filter(rows, detector="guard")` or `saft.filter(df, rule="fraction", fraction=0.1)`.
    With `output_dir`, the files of `saft filter` are written there too."""
    config = FilterConfig(**options)
    records = _records(data)
    kw = dict(output_dir=output_dir, config=config, fields=fields, skip_invalid=skip_invalid, progress=progress,
              report=report, model=model, tokenizer=tokenizer)
    if records is None:
        result = filter_dataset(Path(data), **kw)
        kind, source = "list", result.dataset.rows
        position = list(range(len(result.dataset)))
    else:
        kind, rows = records
        with tempfile.TemporaryDirectory(prefix="saft-filter-") as tmp:
            path = Path(tmp) / "data.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            result = filter_dataset(path, **kw)
            result.dataset.samples  # read now: the temporary file goes when this block ends
        result.summary["input"] = f"<{kind}: {len(rows)} rows>"
        source = data
        # The temporary file has one line per row, so a sample's line number is its row's position.
        position = [s.meta["line"] - 1 for s in result.dataset.samples]
    removed = result.selection.removed
    kept_pos = [position[i] for i in range(len(position)) if not removed[i]]
    removed_pos = [position[i] for i in range(len(position)) if removed[i]]
    return FilterOutput(kept=_subset(source, kind, kept_pos), removed=_subset(source, kind, removed_pos),
                        scores=score_rows(result.dataset, result.scores, result.selection), summary=result.summary,
                        result=result)
