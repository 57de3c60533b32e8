"""Chosen labels (`saft label`): the choice, the session (keys from a stream, a pipe, a real terminal), its
files, and the calibrated rule's prior when the labels contradict it."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from saft.data import Sample, load_samples
from saft.label import choose_rows, label_session, random_rows
from saft.select import prior_agreement, select_calibrated

ROOT = Path(__file__).resolve().parent.parent


def demo_rows(n):
    return [json.loads(line) for line in (resources.files("saft") / "demo" / "demo.jsonl").read_text().splitlines()[:n]]


def toy_samples(n):
    return [Sample(id=f"r{i}", messages=[{"role": "user", "content": f"prompt {i}"},
                                         {"role": "assistant", "content": f"response {i}"}]) for i in range(n)]


def test_choose_rows_spreads_over_ranks_and_around_the_estimate_cutoff():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    rank = np.argsort(np.argsort(scores))
    picked = choose_rows(scores, n=30, estimate=0.2, seed=0)
    assert len(picked) == 30 and len(set(picked.tolist())) == 30
    # half within the window around the cutoff (ranks 800 +- 100), where random rows would put a fifth
    near = np.abs(rank[picked] - 800) <= 100
    assert near.sum() >= 15
    # the other half covers every decile of the ranking
    assert set((rank[picked] // 100).tolist()) == set(range(10))
    assert np.array_equal(picked, choose_rows(scores, n=30, estimate=0.2, seed=0))  # reproducible
    assert not np.array_equal(np.sort(picked), np.sort(choose_rows(scores, n=30, estimate=0.2, seed=1)))
    # without an estimate: one row per thirtieth of the ranks
    plain = choose_rows(scores, n=30, seed=0)
    assert sorted((rank[plain] * 30 // 1000).tolist()) == list(range(30))
    with pytest.raises(ValueError, match="between 1 and"):
        choose_rows(scores[:5], n=6)


def test_session_saves_after_every_answer_undoes_skips_and_resumes(tmp_path):
    samples = toy_samples(10)
    scores = np.arange(10, dtype=float)
    out = tmp_path / "labels.jsonl"
    plan = [9, 5, 2, 7]
    shown = io.StringIO()
    # harmful, safe, an unknown key, skip (row 2: replaced by the nearest free score, row 1 or 3), undo (row 2
    # again, the replacement dropped), safe, then the input ends: the session stops, saved
    res = label_session(samples, scores, plan, out, n=4, selection="chosen", keys=io.StringIO("h s x k u s"),
                        out=shown)
    assert (res.n_labelled, res.n_harmful, res.n_skipped, res.complete) == (3, 1, 0, False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["harmful"]) for r in rows] == [("r9", 1), ("r5", 0), ("r2", 0)]
    assert rows[0]["prompt"] == "prompt 9" and rows[0]["response"] == "response 9" and rows[0]["score"] == 9.0
    assert "unknown key 'x'" in shown.getvalue() and "PROMPT:\nprompt 9" in shown.getvalue()
    state = json.loads((tmp_path / "labels.jsonl.session.json").read_text())
    assert state["queue"] == ["r9", "r5", "r2", "r7"]  # the skip's replacement left with the undo
    # resume: the next row is r7; a skip brings its nearest free neighbour (r6 or r8), which completes the set
    shown = io.StringIO()
    res = label_session(samples, scores, [0, 1], out, n=4, selection="chosen", keys=io.StringIO("k h h h"), out=shown)
    assert res.complete and (res.n_labelled, res.n_skipped) == (4, 1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows][:3] == ["r9", "r5", "r2"] and rows[3]["id"] in ("r6", "r8")
    assert "row r7" in shown.getvalue() and "done" in shown.getvalue()
    # the file is a labels file: prompt/response rows labelled by `harmful`
    ds = load_samples(out)
    assert ds.labels == [1, 0, 0, 1] and ds.samples[0].prompt == "prompt 9"
    # a labels file from elsewhere is never overwritten
    other = tmp_path / "mine.jsonl"
    other.write_text("{}\n")
    with pytest.raises(ValueError, match="no session file"):
        label_session(samples, scores, plan, other, n=2, selection="chosen", keys=io.StringIO("h"), out=io.StringIO())


def test_random_sessions_write_their_selection_and_undo_labels(tmp_path):
    samples = toy_samples(8)
    out = tmp_path / "r.jsonl"
    plan = random_rows(8, seed=3)
    assert sorted(plan.tolist()) == list(range(8))
    res = label_session(samples, None, plan, out, n=2, selection="random", keys=io.StringIO("h u s q"),
                        out=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res.n_labelled == 1 and rows == [{"id": f"r{plan[0]}", "prompt": f"prompt {plan[0]}",
                                             "response": f"response {plan[0]}", "harmful": 0, "score": None,
                                             "selection": "random"}]


def run_cli(args, tmp_path, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SAFT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "saft.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=600)


def test_saft_label_with_piped_answers_then_filter_reads_the_file(tmp_path):
    rows = demo_rows(24)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    truth = {r["id"]: int(not r["is_safe"]) for r in rows}
    out = tmp_path / "labels.jsonl"
    # quit after two answers, then resume: the second run shows the third chosen row, not the first again
    first = run_cli(["-q", "label", str(data), "-o", str(out), "-n", "6"], tmp_path, stdin="h\ns\nq\n")
    assert first.returncode == 0, first.stderr
    assert "saved 2 labels" in first.stdout and "[1/6]" in first.stdout and "[2/6]" in first.stdout
    assert len(out.read_text().splitlines()) == 2
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    answers = "".join("h" if truth[r] else "s" for r in json.loads((tmp_path / "labels.jsonl.session.json")
                                                                   .read_text())["queue"][2:6])
    second = run_cli(["-q", "label", str(data), "-o", str(out), "-n", "6"], tmp_path, stdin=answers)
    assert second.returncode == 0, second.stderr
    assert "[3/6]" in second.stdout and "[1/6]" not in second.stdout and "6 labelled" in second.stdout
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in labelled}) == 6 and all(r["selection"] == "chosen" for r in labelled)
    assert [r["harmful"] for r in labelled[2:]] == [truth[r["id"]] for r in labelled[2:]]
    # saft filter --labels-file reads it (the guard with the calibrated rule fitted on those labels)
    filt = run_cli(["-q", "filter", str(data), "-o", str(tmp_path / "f"), "--detector", "guard", "--rule",
                    "calibrated", "--labels-file", str(out)], tmp_path)
    assert filt.returncode == 0, filt.stderr
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["rule"] == "calibrated" and summary["rule_params"]["n_labels"] == 6


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_saft_label_in_a_real_terminal(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(12))
    out = tmp_path / "labels.jsonl"
    session = f"saft-label-test-{os.getpid()}"
    cmd = (f"cd {ROOT} && PYTHONPATH={ROOT / 'src'} SAFT_CACHE={tmp_path / 'cache'} {sys.executable} -m saft.cli -q "
           f"label {data} -o {out} --random -n 3 --seed 1; echo EXIT=$? > {tmp_path / 'rc'}; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd], check=True)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                              text=True).stdout

    def wait_for(text, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if text in screen():
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; screen:\n{screen()}")

    try:
        wait_for("[1/3]")
        subprocess.run(["tmux", "send-keys", "-t", session, "h"], check=True)  # one keypress, no Enter
        wait_for("[2/3]")
        subprocess.run(["tmux", "send-keys", "-t", session, "u"], check=True)  # undo: back to the first row
        wait_for("> undo")
        subprocess.run(["tmux", "send-keys", "-t", session, "s"], check=True)
        wait_for("> safe")
        for key in "hs":
            subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
            time.sleep(0.3)
        end = time.time() + 60
        while not (tmp_path / "rc").exists() and time.time() < end:
            time.sleep(0.2)
        assert (tmp_path / "rc").read_text().strip() == "EXIT=0", screen()
        assert "3 labelled (1 harmful)" in screen()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    order = random_rows(12, seed=1)
    assert [r["id"] for r in labelled] == [demo_rows(12)[i]["id"] for i in order[:3]]
    assert [r["harmful"] for r in labelled] == [0, 1, 0]


def test_calibrated_prior_gives_way_when_the_labels_contradict_it():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.24).astype(int)
    scores = 2.0 * y + rng.normal(size=2000)
    idx = rng.choice(2000, 100, replace=False)
    labels_only = select_calibrated(scores, scores[idx], y[idx], margin=0)
    # the labels say about 0.24 harmful, the prior 0.94: the labels win
    sel = select_calibrated(scores, scores[idx], y[idx], prior=0.94, prior_weight=100, margin=0)
    assert sel.params["prior_agreement_p"] < 1e-6 and sel.params["prior_weight_used"] < 1e-3
    assert abs(sel.params["contamination_estimate"] - labels_only.params["contamination_estimate"]) < 0.01
    assert abs(sel.n_removed - labels_only.n_removed) <= 5 and sel.n_removed / 2000 < 0.35
    # without the test (test_level 0), the prior drags the estimate halfway, as the rule did with a fixed weight
    fixed = select_calibrated(scores, scores[idx], y[idx], prior=0.94, prior_weight=100, test_level=0)
    assert fixed.params["contamination_estimate"] > 0.5 and fixed.n_removed / 2000 > 0.45
    # a prior the labels agree with keeps its full weight
    agree = select_calibrated(scores, scores[idx], y[idx], prior=float(y.mean()), prior_weight=100)
    assert agree.params["prior_agreement_p"] > 0.05 and agree.params["prior_weight_used"] == 100
    # the test reads rows chosen by score through their scores: the top rows' high harmful share is no conflict
    # (the true log-odds of this mixture; a binomial test of their share, 0.8 or more against 0.24, would reject)
    logit = 2.0 * scores - 2.0 + np.log(0.24 / 0.76)
    top = np.argsort(-scores)[:60]
    assert y[top].mean() > 0.8
    assert prior_agreement(logit, logit[top], y[top], float(y.mean())) > 0.05
    spread = choose_rows(scores, n=60, seed=0)  # rows over every rank do tell a wrong prior
    assert prior_agreement(logit, logit[spread], y[spread], float(y.mean())) > 0.05
    assert prior_agreement(logit, logit[spread], y[spread], 0.6) < 0.01
