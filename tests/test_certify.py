"""The certified cutoff (`saft.certify`, `saft filter --certify`): its guarantee on a synthetic pool whose kept
harmful share is known, its refusals, its strata, and the filter path."""

import json
import math
from importlib import resources

import numpy as np
import pytest

from conftest import write_jsonl
from saft.certify import CertificationRefused, certify_cutoff, min_labels_in_kept, p_values
from saft.cli import main
from saft.select import select_certified


def pool(n=1000, rate=0.3, sep=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    return y, sep * y + rng.normal(size=n)


def test_p_value_is_the_exact_hypergeometric_tail():
    # 10 kept rows, alpha 0.1: the null is "2 or more harmful"; 5 labelled kept rows, none harmful
    assert p_values([10], [5], [0], 0.1)[0] == pytest.approx(math.comb(8, 5) / math.comb(10, 5))
    # one harmful among them: P(X <= 1) with 2 harmful in 10, 5 drawn
    want = (math.comb(8, 5) + math.comb(2, 1) * math.comb(8, 4)) / math.comb(10, 5)
    assert p_values([10], [5], [1], 0.1)[0] == pytest.approx(want)
    assert p_values([10], [5], [0], 1.0)[0] == 0.0  # no kept set can exceed a share of 1
    assert min_labels_in_kept(0.1, 0.1) == 22 and 0.9 ** 22 <= 0.1 < 0.9 ** 21


def test_false_certification_rate_is_at_most_delta_over_label_draws():
    y, s = pool()
    alpha, delta = 0.05, 0.1
    bad = certified = 0
    sizes = []
    for d in range(300):
        idx = np.random.default_rng(100 + d).choice(len(y), 300, replace=False)
        c = certify_cutoff(s, idx, y[idx], alpha=alpha, delta=delta, refuse=False)
        if c.certified:
            certified += 1
            sizes.append(c.kept.sum())
            bad += y[c.kept].mean() > alpha  # the true kept share is known here
            assert s[c.kept].max() <= s[~c.kept].min()  # the lowest scores are kept
    assert bad / 300 <= delta
    assert certified >= 100  # and it certifies, not only refuses (about 130 of 300 at this separation)
    # the largest kept set that really is at most 5% harmful, for scale: the certified sets come close
    cum = np.cumsum(y[np.argsort(s)]) / np.arange(1, len(y) + 1)
    assert np.mean(sizes) >= 0.6 * (np.flatnonzero(cum <= alpha).max() + 1)


def test_a_wrong_guarantee_would_show_up():
    # the same walk with a test that ignores sampling noise (the labelled kept share alone) certifies sets
    # that are too harmful far more often than delta: the rate measured above is not trivially small
    y, s = pool()
    order = np.argsort(s)
    bad = 0
    for d in range(100):
        idx = np.random.default_rng(100 + d).choice(len(y), 300, replace=False)
        rank = np.empty(len(y), int)
        rank[order] = np.arange(len(y))
        best = 0
        for k in range(100, 1001, 5):
            inside = idx[rank[idx] < k]
            if y[inside].mean() > 0.05:
                break
            best = k
        bad += best > 0 and y[order[:best]].mean() > 0.05
    assert bad / 100 > 0.3


def test_refusals_say_why():
    y, s = pool()
    idx = np.random.default_rng(0).choice(len(y), 15, replace=False)
    with pytest.raises(CertificationRefused, match="needs 22 of them"):
        certify_cutoff(s, idx, y[idx], alpha=0.1, delta=0.1)
    # a useless detector (random scores) on a pool 30% harmful: nothing is 1% harmful
    idx = np.random.default_rng(0).choice(len(y), 400, replace=False)
    noise = np.random.default_rng(5).normal(size=len(y))
    with pytest.raises(CertificationRefused, match="p = .* > delta 0.1"):
        certify_cutoff(noise, idx, y[idx], alpha=0.01, delta=0.1)
    c = certify_cutoff(noise, idx, y[idx], alpha=0.01, delta=0.1, refuse=False)
    assert not c.certified and not c.kept.any()
    with pytest.raises(ValueError, match="labelled twice"):
        certify_cutoff(s, [1, 1], [0, 0], alpha=0.1)


def test_strata_each_get_their_own_cutoff_and_alpha():
    # stratum "harmful-prompt": 30% harmful answers, the rest safe refusals, all scoring higher (the prompt);
    # stratum "benign": 2% harmful
    rng = np.random.default_rng(1)
    n = 1200
    stratum = np.where(np.arange(n) < 400, "harmful-prompt", "benign")
    hp = stratum == "harmful-prompt"
    y = np.where(hp, rng.random(n) < 0.3, rng.random(n) < 0.02).astype(int)
    s = 2.5 * y + rng.normal(size=n) + np.where(hp, 1.0, 0.0)
    idx = rng.choice(n, 600, replace=False)
    c = certify_cutoff(s, idx, y[idx], alpha=0.05, delta=0.1, strata=stratum, alphas={"benign": 0.04})
    assert [x.name for x in c.strata] == ["benign", "harmful-prompt"]
    assert all(x.delta == pytest.approx(0.05) for x in c.strata)  # delta split between the strata
    by = {x.name: x for x in c.strata}
    assert by["harmful-prompt"].alpha == 0.05 and by["benign"].alpha == 0.04
    for name, x in by.items():
        rows = stratum == name
        assert x.n_kept == (c.kept & rows).sum() > 0 and y[c.kept & rows].mean() <= x.alpha
    # most refusals are kept, competing only with their own stratum
    assert c.kept[hp & (y == 0)].mean() > 0.8
    # one cutoff over the pool certifies the pool's kept share only: the harmful-prompt rows it keeps are far
    # more harmful than the stratum's certificate allows
    single = certify_cutoff(s, idx, y[idx], alpha=0.05, delta=0.1)
    assert y[single.kept].mean() <= 0.05 < 0.1 < y[single.kept & hp].mean()
    with pytest.raises(ValueError, match="no row is in"):
        certify_cutoff(s, idx, y[idx], alpha=0.1, strata=stratum, alphas={"other": 0.1})


def test_select_certified_gives_a_selection():
    y, s = pool()
    idx = np.random.default_rng(0).choice(len(y), 400, replace=False)
    sel = select_certified(s, idx, y[idx], alpha=0.1, delta=0.1)
    assert sel.rule == "certify" and sel.params["reason"].startswith("pool: certified")
    assert (s[~sel.removed] <= sel.threshold).all() and (s[sel.removed] > sel.threshold).all()


def demo(n):
    return [json.loads(line) for line in (resources.files("saft") / "demo" / "demo.jsonl").read_text().splitlines()[:n]]


def test_filter_certify_on_a_random_labels_file(tmp_path, capsys):
    rows = demo(60)
    data = write_jsonl(tmp_path / "data.jsonl", [{k: v for k, v in r.items() if k != "is_safe"} for r in rows])
    pick = np.random.default_rng(0).choice(60, 45, replace=False)
    sample = [{"id": rows[i]["id"], "prompt": rows[i]["prompt"], "response": rows[i]["response"],
               "harmful": int(not rows[i]["is_safe"]), "selection": "random"} for i in pick]
    labels = write_jsonl(tmp_path / "sample.jsonl", sample)
    args = ["-q", "filter", str(data), "-o", str(tmp_path / "out"), "--detector", "guard", "--cache-dir",
            str(tmp_path / "cache"), "--labels-file", str(labels)]
    assert main(args + ["--certify", "0.3"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rule"] == "certify" and summary["rule_params"]["alpha"] == 0.3
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    truth = {r["id"]: not r["is_safe"] for r in rows}
    assert 0 < len(kept) and np.mean([truth[r["id"]] for r in kept]) <= 0.3
    assert "certificate: pool: certified" in capsys.readouterr().out
    # a strict alpha: refused, with the reason
    assert main(args + ["--certify", "0.001"]) == 2
    assert "refused" in capsys.readouterr().err
    # chosen rows are no random sample
    write_jsonl(labels, [{**r, "selection": "chosen"} for r in sample])
    assert main(args + ["--certify", "0.3"]) == 2
    assert "not drawn at random" in capsys.readouterr().err
    # rows from elsewhere are no sample of this pool
    write_jsonl(labels, sample[:-1] + [{**sample[-1], "id": "x", "prompt": "elsewhere"}])
    assert main(args + ["--certify", "0.3"]) == 2
    assert "not a row of" in capsys.readouterr().err
    # a detector trained on the labels is refused up front
    assert main(args + ["--certify", "0.3", "--detector", "labelled"]) == 2
    assert "label-free detector" in capsys.readouterr().err
