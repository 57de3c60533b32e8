import json

import pytest

import saft.experiment as E
from saft.experiment import ExperimentConfig, run_experiment
from saft.pools import prompt_split


def tiny_raw(path):
    """BeaverTails-shaped files with enough 'experiment'-split prompts for a 30-row pool."""
    path.mkdir()
    safe, unsafe, i = [], [], 0
    while len(safe) < 40 or len(unsafe) < 40:
        prompt = f"question number {i}?"
        i += 1
        if prompt_split(prompt) != "experiment":
            continue
        if len(unsafe) < 40:
            unsafe.append({"prompt": prompt, "response": f"here is how to hurt people, way {i}", "is_safe": False,
                           "category": {"violence": True}})
        else:
            safe.append({"prompt": prompt, "response": f"a kind and helpful answer {i}", "is_safe": True,
                         "category": {"violence": False}})
    for name, rows in (("beavertails_30k_test_safe_vaa.jsonl", safe), ("beavertails_30k_test_unsafe_vaa.jsonl", unsafe)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_experiment_end_to_end_and_resume(tiny_model_dir, tmp_path, monkeypatch, small_reference):
    raw = tiny_raw(tmp_path / "raw")
    cfg = ExperimentConfig(model=str(tiny_model_dir), pool_size=30, rates=(0.3,), seeds=(0,), n_eval=4, n_labels=12,
                           max_new_tokens=3, max_steps=1, batch_size=8, raw_dir=str(raw), cache_dir=str(tmp_path / "c"),
                           device="cpu", gen_batch_size=4)
    pool, eval_harm, eval_safe = E.build_split(cfg, 0.3, 0)
    assert len(pool) == 30 and sum(s.label for s in pool) == 9
    assert not {s.prompt for s in pool} & (set(eval_harm) | {s.prompt for s in eval_safe})
    out = tmp_path / "exp"
    res = run_experiment(cfg, output_dir=out, progress=False)
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == set(E.BASE_ARMS) | {"guard", "label-free", "labelled"} == set(cfg.all_arms())
    # the guard picks its own threshold without labels and removes that share of the pool
    g = rows["guard"]
    assert g["kept"] == 30 - round(g["contamination_estimate"] * 30) and g["detection_auroc"] is not None
    assert rows["label-free"]["contamination_estimate"] == g["contamination_estimate"]
    assert rows["label-free"]["detection_auroc"] is not None
    # labelled: the calibrated rule on the same 12 labels, with the guard's estimate as its prior
    assert rows["labelled"]["rule"] == "calibrated" and rows["labelled"]["detection_auroc"] is not None
    assert rows["labelled"]["prior_estimate"] == g["contamination_estimate"]
    assert rows["oracle"]["harmful_kept"] == 0 and rows["oracle"]["kept"] == 21
    assert rows["sft"]["kept"] == 30 and rows["sft"]["harmful_kept"] == 9
    assert rows["random"]["kept"] == rows["saft"]["kept"]
    assert rows["saft"]["k"] in (1, 2, 3, 4) and rows["saft"]["detection_auroc"] is not None
    assert 0 <= rows["prompting"]["detection_auroc"] <= 1
    assert all(r["steps"] == (1 if r["kept"] else 0) for a, r in rows.items() if a != "base")
    assert rows["sft"]["steps"] == 1
    for r in rows.values():
        assert 0 <= r["judges"]["tfidf"]["harmful_rate"] <= 1 and r["helpful"]["n"] == 4
    table = (out / "results.md").read_text()
    assert "| 0.3 | 0 | saft |" in table and "test AUROC" in table
    assert (out / "results.png").stat().st_size > 1000
    gens = (out / "rate0.3" / "seed0" / "saft" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 8
    # a rerun reuses every finished arm instead of training again
    monkeypatch.setattr(E, "finetune", lambda *a, **k: pytest.fail("retrained a finished arm"))
    monkeypatch.setattr(E, "harmful_by_prompting", lambda *a, **k: pytest.fail("reran the prompting pass"))
    again = run_experiment(cfg, output_dir=out, progress=False)
    assert [r["arm"] for r in again["rows"]] == [r["arm"] for r in res["rows"]]


def test_config_rejects_unknown_arms():
    with pytest.raises(ValueError, match="unknown arms"):
        ExperimentConfig(arms=("saft", "magic"))


def test_guard_training_rows_are_the_judge_half_and_the_refusals(tmp_path):
    from saft.pools import guard_training_rows

    raw = tmp_path / "raw"
    raw.mkdir()
    prompts = [f"how do I do thing {i}?" for i in range(40)]
    (raw / "beavertails_30k_test_safe_vaa.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "response": "a safe answer", "is_safe": True, "category": {}}) + "\n" for p in prompts))
    (raw / "beavertails_30k_test_unsafe_vaa.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "response": "a harmful answer", "is_safe": False, "category": {"violence": True}}) + "\n" for p in prompts))
    (raw / "refusals_llama2chat_1015.csv").write_text(',prompt,response,text\n0,[INST] hurt someone [/INST],"I cannot help.",x\n')
    rows = guard_training_rows(raw)
    judge = [p for p in prompts if prompt_split(p) == "judge"]
    assert 0 < len(judge) < len(prompts)
    assert [r["prompt"] for r in rows[:-1]] == judge + judge and [r["harmful"] for r in rows[:-1]] == [0] * len(judge) + [1] * len(judge)
    assert (rows[-1]["prompt"], rows[-1]["harmful"], rows[-1]["source"]) == ("hurt someone", 0, "refusal_llama2")
