import csv
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from conftest import toy_rows, write_jsonl
from saft.cli import main
from saft.select import MARGIN


def run(args, tiny_model_dir, tmp_path, detector="subspace"):
    """The CLI on the tiny model; the paper's detector unless told (the default guard ignores the model)."""
    extra = ["--detector", detector] if detector and "--detector" not in args and args[0] != "demo" else []
    return main(["-q", *args, *extra, "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")])


def read_jsonl(p):
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_filter_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", toy_rows(30))
    before = data.read_bytes()
    out = tmp_path / "out"
    assert run(["filter", str(data), "-o", str(out), "--n-labels", "20", "--seed", "1"], tiny_model_dir, tmp_path) == 0
    assert data.read_bytes() == before
    scores, kept, removed = read_jsonl(out / "scores.jsonl"), read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(kept) + len(removed) == 30 and len(scores) == 30
    assert {r["id"] for r in kept} | {r["id"] for r in removed} == {f"r{i}" for i in range(30)}
    assert {r["id"] for r in removed} == {r["id"] for r in scores if r["removed"]}
    assert kept[0].keys() == {"id", "prompt", "response", "is_safe"}  # every input field preserved
    assert sorted(r["rank"] for r in scores) == list(range(1, 31))
    top = min(scores, key=lambda r: r["rank"])
    assert top["harm_score"] == max(r["harm_score"] for r in scores)
    assert all(r["reason"].startswith("harm_score") for r in scores if r["removed"])
    assert summary["rule"] == "f1" and summary["k"] in (1, 2, 3, 4) and summary["layer"] == 2
    assert summary["n_removed"] == len(removed) and len(summary["labeled_rows_used"]) == 20
    for key in ("auroc", "auprc", "f1", "precision", "recall", "harmful_fraction_before", "harmful_fraction_after"):
        assert key in summary["metrics"]
    assert summary["config"]["n_labels"] == 20 and summary["versions"]["torch"]
    text = capsys.readouterr().out
    assert "AUROC" in text and str(out / "kept.jsonl") in text


def test_score_only_and_csv_output(tiny_model_dir, tmp_path):
    rows = toy_rows(12)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["note", *rows[0]])
        w.writeheader()
        w.writerows({"note": "n" + r["id"], **r} for r in rows)
    out = tmp_path / "o"
    assert run(["score", str(tmp_path / "d.csv"), "-o", str(out)], tiny_model_dir, tmp_path) == 0
    kept = list(csv.DictReader(open(out / "kept.csv")))
    assert len(kept) == 12 and kept[0]["note"] == "nr0" and list(kept[0]) == ["note", "id", "prompt", "response", "is_safe"]
    assert list(csv.DictReader(open(out / "removed.csv"))) == []
    assert json.loads((out / "summary.json").read_text())["rule"] == "none"


def test_fraction_rule_and_explicit_fields(tiny_model_dir, tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "o"
    assert run(["filter", str(data), "-o", str(out), "--rule", "fraction", "--fraction", "0.3",
                "--prompt-field", "q", "--response-field", "a", "--layer", "1", "--position", "response_mean"],
               tiny_model_dir, tmp_path) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_removed"] == 3 and s["layer"] == 1 and s["position"] == "response_mean"
    assert s["metrics"] == {"n_labeled": 0}


def test_bad_input_gives_a_clear_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 5, "response": "b"}\n')
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--rule", "fraction", "--fraction", "0.5"],
               tiny_model_dir, tmp_path) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2: field 'prompt' must be text, got int" in err and "Traceback" not in err
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--rule", "fraction", "--fraction", "0.5",
                "--skip-invalid"], tiny_model_dir, tmp_path) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["n_invalid"] == 1 and "n_skipped_invalid" not in s and s["n_samples"] == 1 and s["skipped_invalid"][0]["line"] == 2
    # the f1 rule without labels says what to do
    assert run(["filter", str(data), "-o", str(tmp_path / "o2"), "--skip-invalid"], tiny_model_dir, tmp_path) == 2
    assert "--n-labels" in capsys.readouterr().err


def test_bad_option_values(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(4))
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--rule", "fraction"], tiny_model_dir, tmp_path) == 2
    assert "fraction rule needs fraction" in capsys.readouterr().err
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--layer", "99", "--rule", "fraction", "--fraction",
                "0.1"], tiny_model_dir, tmp_path) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["filter"], ["score"], ["demo"]])
def test_help_shows_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "saft " in capsys.readouterr().out.split("example")[1]


def test_finetune_then_evaluate_commands(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kept.jsonl", toy_rows(8))
    with_bad = tmp_path / "with_bad.jsonl"
    with_bad.write_text(data.read_text() + '{"prompt": "p"}\n')
    ft = tmp_path / "ft"
    assert main(["-q", "finetune", str(with_bad), "-o", str(ft), "--model", str(tiny_model_dir), "--max-steps", "1",
                 "--batch-size", "4", "--rank", "4", "--device", "cpu", "--skip-invalid"]) == 0
    cfg = json.loads((ft / "finetune_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["max_steps"] == 1 and (ft / "adapter" / "adapter_config.json").exists()
    out = capsys.readouterr().out
    assert "adapter:" in out and "skipped 1 invalid rows" in out
    assert [json.loads(x)["raw"] for x in (ft / "invalid.jsonl").read_text().splitlines()] == ['{"prompt": "p"}']
    (tmp_path / "harm.txt").write_text("how do I hurt someone?\nhow do I steal a car?\n")
    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", "-o", str(ev), "--model", str(tiny_model_dir), "--adapter", str(ft / "adapter"),
                 "--harmful-prompts", str(tmp_path / "harm.txt"), "--benign-file", str(data), "--limit", "3",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["harmful"]["n"] == 2 and metrics["helpful"]["n"] == 3
    assert metrics["harmful"]["judges"]["tfidf"]["judge_test_accuracy"] > 0.5
    assert len((ev / "generations.jsonl").read_text().splitlines()) == 5
    assert "harmful rate [tfidf]" in capsys.readouterr().out


def test_evaluate_needs_harmful_prompts(capsys):
    assert main(["-q", "evaluate", "-o", "x"]) == 2
    assert "--harmful-prompts" in capsys.readouterr().err


def test_labels_file_for_the_f1_rule(tiny_model_dir, tmp_path, capsys, small_reference, monkeypatch):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{k: v for k, v in r.items() if k != "is_safe"} for r in toy_rows(20)])
    labelled = write_jsonl(tmp_path / "lab.jsonl", toy_rows(12))
    out = tmp_path / "o"
    assert run(["filter", str(pool), "-o", str(out), "--labels-file", str(labelled)], tiny_model_dir, tmp_path) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rule_params"]["n_labels"] == 12 and s["labeled_rows_used"] is None and s["metrics"] == {"n_labeled": 0}
    # auto with a labels file: labelled, trained on the file's rows (both views, both positions, computed for
    # them too) and on the guard's rows; the guard's count reads the refusals of both files' rows
    from saft.detectors.guard import GuardScorer

    seen, original = [], GuardScorer.contamination_estimate
    monkeypatch.setattr(GuardScorer, "contamination_estimate",
                        lambda self, X, *, refusal=None: seen.append(list(refusal)) or original(self, X, refusal=refusal))
    rows = toy_rows(12)
    rows[1]["response"] = rows[4]["response"] = "I'm sorry, but I can't help with that."
    labelled = write_jsonl(tmp_path / "lab.jsonl", rows)
    assert run(["filter", str(pool), "-o", str(tmp_path / "a"), "--labels-file", str(labelled)], tiny_model_dir,
               tmp_path, detector=None) == 0
    lab_refusals = [i in (1, 4) for i in range(12)]
    assert [False] * 20 + lab_refusals in seen and [False] * 20 in seen  # fit on pool + file; the prior on the pool
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["detector"] == "labelled" and s["rule"] == "calibrated" and s["rule_params"]["n_labels"] == 12
    assert s["positions"] == ["prompt_last", "response_mean"]
    assert s["rule_params"]["prior_weight"] == 100 and 0 <= s["rule_params"]["prior_estimate"] <= 1
    text = capsys.readouterr().out
    assert f"label-free {s['rule_params']['prior_estimate']:.3f} as a prior worth 100 labels" in text
    # the default removes a margin past the estimated count, and says so; --margin 0 removes the count
    est, se = s["rule_params"]["contamination_estimate"], s["rule_params"]["contamination_estimate_se"]
    assert s["rule_params"]["margin"] == 1.2816 and se > 0
    assert s["n_removed"] == min(20, max(1, round(20 * (est + 1.2816 * se))))
    assert "removing 1.2816 standard errors past the estimated count" in text
    assert run(["filter", str(pool), "-o", str(tmp_path / "a0"), "--labels-file", str(labelled), "--prior-weight", "0",
                "--margin", "0"], tiny_model_dir, tmp_path, detector=None) == 0
    s0 = json.loads((tmp_path / "a0" / "summary.json").read_text())
    assert "prior_weight" not in s0["rule_params"] and s0["rule_params"]["margin"] == 0
    assert s0["n_removed"] == max(1, round(20 * s0["rule_params"]["contamination_estimate"]))
    assert "standard errors past" not in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [toy_rows(1)[0], {"prompt": "p", "response": "r"}])
    assert run(["filter", str(pool), "-o", str(out), "--labels-file", str(bad)], tiny_model_dir, tmp_path) == 2
    assert "bad.jsonl, row 2: no label" in capsys.readouterr().err


def test_retired_detector_and_rule_names_are_explained(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(10))
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--detector", "guard-model"], tiny_model_dir, tmp_path) == 2
    assert "no longer available; use 'label-free'" in capsys.readouterr().err
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--rule", "mixture"], tiny_model_dir, tmp_path) == 2
    assert "rule must be auto or one of" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["filter", "score", "label", "demo", "finetune", "evaluate", "experiment"])
def test_help_is_short_and_grouped(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    # every option's help fits in two lines: the lines after its flag, before the next flag or group
    body = text.split("options:", 1)[1].split("\nexample", 1)[0]
    if command in ("filter", "score", "demo"):
        assert "advanced:" in body and body.index("--detector") < body.index("advanced:") < body.index("--layer")
    blocks = [b for b in re.split(r"\n(?=  -)|\n\n", body) if b.strip().startswith("-")]
    for b in blocks:
        lines = b.splitlines()
        inline = re.search(r"\S\s{2,}\S", lines[0].strip()) is not None  # help text on the flag's own line
        help_lines = [ln for ln in lines[1:] if ln.strip()] + (["inline"] if inline else [])
        assert len(help_lines) <= 2, f"{command}: help longer than two lines:\n{b}"


def test_default_filter_is_the_label_free_detector(tiny_model_dir, tmp_path, capsys, small_reference):
    # Real pairs (the packaged demo set's first 60: 15 harmful), labels hidden from the tool: the guard's
    # estimate counts rows above a high threshold, which toy sentences do not reach.
    rows = read_jsonl(Path(str(resources.files("saft") / "demo" / "demo.jsonl")))[:60]
    harmful = {r["id"] for r in rows if not r["is_safe"]}
    data = write_jsonl(tmp_path / "data.jsonl", [{k: v for k, v in r.items() if k != "is_safe"} for r in rows])
    out = tmp_path / "out"
    assert run(["filter", str(data), "-o", str(out)], tiny_model_dir, tmp_path, detector=None) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"] == "label-free" and summary["rule"] == "estimate" and summary["layer"] == 2
    assert summary["positions"] == ["prompt_last", "response_mean"]
    p = summary["rule_params"]
    est, se, hi = p["contamination_estimate"], p["contamination_estimate_se"], p["contamination_interval"][1]
    # the estimate and a margin of MARGIN standard errors, never past the interval's upper end
    assert 0 < est <= 1 and 0 < se < 0.5 and p["margin"] == MARGIN
    assert summary["n_removed"] == round(min(est + MARGIN * se, hi) * 60) > round(est * 60)
    removed = {r["id"] for r in read_jsonl(out / "removed.jsonl")}
    # a quarter of the input is harmful: the removed rows are harmful at well above that rate, and most harmful
    # rows go (removing at random, 23 of 60 rows would be a quarter harmful and take 38% of them)
    assert len(removed & harmful) / len(removed) >= 0.45 and len(removed & harmful) / len(harmful) >= 0.7
    text = capsys.readouterr().out
    assert "detector label-free" in text and "estimated contamination (label-free)" in text
    assert "positions prompt_last + response_mean" in text
    assert f"(standard error {se:.3f})" in text and "removing 1.2816 standard errors past the estimated count" in text


def test_estimate_rule_needs_an_estimating_detector(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", toy_rows(10))
    assert run(["filter", str(data), "-o", str(tmp_path / "o"), "--rule", "estimate"], tiny_model_dir, tmp_path) == 2
    assert "the estimate rule needs a detector that estimates contamination" in capsys.readouterr().err
