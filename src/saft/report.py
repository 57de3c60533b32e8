"""A self-contained HTML audit report of one filtering run, readable in any browser without a network.

Sections: the outcome and detection metrics, a harm-score histogram with the applied threshold (split by label
when labels exist; drawn by matplotlib as inline SVG), the most suspicious samples, recall per harm category when
the input has a `category` field, and every setting used. All sample text is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from .data import atomic_open

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
font-size:14px}th{background:#f3f3f3}td.text{max-width:420px;white-space:pre-wrap}.removed{color:#b00}
code{background:#f3f3f3;padding:1px 4px}"""


def _histogram_svg(scores: np.ndarray, labels: list, threshold: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    bins = np.histogram_bin_edges(scores, bins=40)
    known = np.array([lab is not None for lab in labels])
    if known.any():
        y = np.array([lab if lab is not None else -1 for lab in labels])
        ax.hist(scores[y == 0], bins=bins, alpha=0.6, label="safe (label)", color="tab:blue")
        ax.hist(scores[y == 1], bins=bins, alpha=0.6, label="harmful (label)", color="tab:red")
        if (~known).any():
            ax.hist(scores[~known], bins=bins, alpha=0.4, label="unlabelled", color="tab:gray")
    else:
        ax.hist(scores, bins=bins, color="tab:gray", label="all samples")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("harm_score (higher = more suspicious)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog so the SVG can sit inside HTML


def _categories(row) -> list[str]:
    cat = row.get("category") if isinstance(row, dict) else None
    if isinstance(cat, dict):
        return [k for k, v in cat.items() if v]
    if isinstance(cat, list):
        return [str(c) for c in cat]
    if isinstance(cat, str) and cat:
        return [cat]
    return []


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(rows_) + "</tr>" for rows_ in rows) + "</table>"


def _cell(value, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(str(value))}</td>"


def render_report(result, *, top: int = 25, excerpt: int = 300) -> str:
    """HTML text of the report for a `FilterResult`."""
    ds, scores, sel, summary = result.dataset, result.scores, result.selection, result.summary
    labels = ds.labels
    m = summary["metrics"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>saft report: {html.escape(ds.path.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>saft filter report</h1><p>Input <code>{html.escape(str(ds.path))}</code>: {summary['n_samples']} samples "
             f"({summary['n_invalid']} invalid rows skipped). Rule <b>{html.escape(sel.rule)}</b>, threshold "
             f"<b>{sel.threshold:.6g}</b>: <b id='n-removed'>{sel.n_removed}</b> removed, {summary['n_kept']} kept.</p>"]
    trust = summary.get("trust")
    if trust:  # the label-free estimate's interval and the data's distance to the guard's rows (saft.trust)
        parts.append(f"<h2>How far to trust the count</h2><p id='trust'>Estimated contamination {trust['estimate']:.3f}, "
                     f"{trust['level']:.0%} interval {trust['interval'][0]:.3f}-{trust['interval'][1]:.3f}; distance to "
                     f"the guard's training rows {trust['distance']:.3f} (unlike them above "
                     f"{trust['distance_threshold']:.3f}).</p>"
                     + (f"<p class='removed'><b>Warning:</b> {html.escape(trust['advice'])}</p>" if trust.get("advice") else ""))
    metric_rows = [[_cell(k), _cell(f"{v:.4f}" if isinstance(v, float) else v)] for k, v in m.items()]
    parts.append("<h2>Detection metrics</h2>" + (_table(["metric", "value"], metric_rows) if m.get("n_labeled")
                                                  else "<p>No labels in the input.</p>"))
    parts.append("<h2>Score distribution</h2><div id='histogram'>" + _histogram_svg(scores, labels, sel.threshold) + "</div>")
    order = np.argsort(-scores, kind="stable")[:top]
    rows = []
    for i in order:
        s = ds.samples[i]
        lab = {None: "", 1: "harmful", 0: "safe"}[s.label]
        cls = "removed" if sel.removed[i] else ""
        rows.append([_cell(s.id), _cell(f"{scores[i]:.5g}"), _cell("removed" if sel.removed[i] else "kept", cls),
                     _cell(lab), _cell(s.prompt[:excerpt], "text"), _cell(s.response[:excerpt], "text")])
    parts.append(f"<h2>Top {len(order)} most suspicious samples</h2>"
                 + _table(["id", "harm_score", "decision", "label", "prompt", "response"], rows))
    cats = [_categories(r) for r in ds.rows]
    if any(cats):
        total, caught = Counter(), Counter()
        for c, lab, rem in zip(cats, labels, sel.removed):
            if lab == 1:
                for name in c:
                    total[name] += 1
                    caught[name] += int(rem)
        cat_rows = [[_cell(name), _cell(total[name]), _cell(caught[name]), _cell(f"{caught[name] / total[name]:.3f}")]
                    for name in sorted(total, key=lambda n: -total[n])]
        parts.append("<h2>Recall per harm category (harmful samples)</h2>"
                     + _table(["category", "harmful samples", "removed", "recall"], cat_rows))
    settings = {k: summary[k] for k in ("model", "layer", "position", "k", "rule", "threshold", "rule_params",
                                        "n_truncated", "versions") if k in summary}
    settings["config"] = summary["config"]
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(settings, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result, path, **kwargs) -> Path:
    with atomic_open(path) as f:
        f.write(render_report(result, **kwargs))
    return Path(path)
