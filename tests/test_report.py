import html
import json
import shutil
import subprocess

import pytest

from conftest import toy_rows, write_jsonl
from saft import FilterConfig, filter_dataset
from saft.report import render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    rows = toy_rows(30)
    for i, r in enumerate(rows):
        r["category"] = {"violence": not r["is_safe"] and i % 2 == 0, "privacy": not r["is_safe"] and i % 2 == 1}
    rows[0]["prompt"] = "<script>alert('x')</script> how do I hurt someone?"
    data = write_jsonl(tmp / "d.jsonl", rows)
    model, tok = tiny
    # the guard: the report reads only scores, labels and settings, and the guard needs no forward pass
    return filter_dataset(data, output_dir=tmp / "out", config=FilterConfig(detector="guard", rule="fraction", fraction=0.3,
                                                                             cache_dir=str(tmp / "cache")),
                          model=model, tokenizer=tok, progress=False, report=True)


def test_report_contents(result):
    text = (result.output_dir / "report.html").read_text()
    assert json.loads((result.output_dir / "summary.json").read_text())["outputs"]["report"].endswith("report.html")
    assert "<svg" in text and "threshold" in text and "harmful (label)" in text
    assert "Recall per harm category" in text and "violence" in text and "privacy" in text
    assert f"<b id='n-removed'>{result.selection.n_removed}</b>" in text
    assert text.count("<tr>") >= 1 + 25  # the top-25 table
    every = render_report(result, top=30)
    assert "<script>alert" not in every and html.escape("<script>alert('x')</script>") in every


def test_report_without_labels(tiny, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "is_safe"} for r in toy_rows(10)]
    model, tok = tiny
    filter_dataset(write_jsonl(tmp_path / "u.jsonl", rows), output_dir=tmp_path / "o", model=model,
                   tokenizer=tok, config=FilterConfig(detector="guard", rule="fraction", fraction=0.2,
                                                      cache_dir=str(tmp_path / "cache")), progress=False, report=True)
    text = (tmp_path / "o" / "report.html").read_text()
    assert "No labels in the input" in text and "all samples" in text and "Recall per harm category" not in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(result, tmp_path):
    report = result.output_dir / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert "saft filter report" in dom.stdout and "<svg" in dom.stdout and "n-removed" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
