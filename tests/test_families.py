"""Source families and their pools (saft.pools): one family per prompt, no judge-reserved prompt, donors held out."""

import pytest

from saft.pools import (FAMILIES, ONE_CLASS, default_raw_dir, donor_rows, family_pool, family_rows, holdout_slice,
                        judge_reserved, load_source)


def _raw_found() -> bool:
    try:
        return default_raw_dir().is_dir()
    except FileNotFoundError:
        return False


# The families are read from the project's public data files (../shared/data/raw), present in the project's
# checkouts and CI; a copy of the repository elsewhere has none to read.
pytestmark = pytest.mark.skipif(not _raw_found(), reason="shared/data/raw not found from the working directory")


@pytest.fixture(scope="module")
def families():
    return {f: family_rows(f) for f in FAMILIES}


def test_families_are_disjoint_by_prompt_and_hold_no_reserved_prompt(families):
    seen = {}
    for f, rows in families.items():
        assert rows, f
        assert not any(judge_reserved(r["prompt"]) for r in rows)
        assert all(r["family"] == f for r in rows)
        for p in {r["prompt"] for r in rows if r["harmful"]}:
            assert p not in seen, (p[:60], f, seen.get(p))
            seen[p] = f
    for f in ONE_CLASS:
        assert not any(r["harmful"] for r in families[f])
    for f in ("beavertails", "jailbreakbench", "sbr"):
        assert 0 < sum(r["harmful"] for r in families[f]) < len(families[f])
    # the look-alikes mention harm; the benign family does not
    assert all("kill" not in (r["prompt"] + r["response"]).lower().split() for r in families["benign"])
    assert any("kill" in (r["prompt"] + r["response"]).lower() for r in families["lookalike"])


def test_jailbreakbench_rows_carry_the_judge_verdict():
    rows = load_source("jailbreakbench")
    assert len(rows) > 1500 and {r["harmful"] for r in rows} == {0, 1}
    assert all(r["prompt"] and r["response"] for r in rows)


def test_parts_and_limit():
    rows = family_rows("benign", limit=300)
    assert len(rows) == 300 and rows == family_rows("benign", limit=300)
    train, held = family_rows("benign", part="train", limit=300), family_rows("benign", part="holdout", limit=300)
    assert len(train) + len(held) == 300 and all(holdout_slice(r["prompt"]) for r in held)
    assert not any(holdout_slice(r["prompt"]) for r in train)
    with pytest.raises(ValueError, match="unknown family"):
        family_rows("nope")


def test_family_pool_rates_donors_and_determinism():
    donors = {(r["prompt"], r["response"]) for r in donor_rows(limit=800)}
    assert all(holdout_slice(p) for p, _ in donors)
    for f in ("lookalike", "beavertails"):
        pool = family_pool(f, 100, harmful_rate=0.3, seed=1, limit=800)
        assert len(pool) == 100 and sum(s.label for s in pool) == 30
        harm = {(s.prompt, s.response) for s in pool if s.label}
        if f in ONE_CLASS:
            assert harm <= donors and all(s.meta["family"] == f for s in pool if not s.label)
        else:
            assert all(s.meta["family"] == f for s in pool)
        assert [s.prompt for s in pool] == [s.prompt for s in family_pool(f, 100, harmful_rate=0.3, seed=1, limit=800)]
    assert sum(s.label for s in family_pool("refusals", 50, harmful_rate=0.0, seed=0)) == 0
    assert all(s.meta["refusal"] for s in family_pool("refusals", 50, harmful_rate=0.0, seed=0))
