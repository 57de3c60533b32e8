"""The paper's comparison in one run: filter a contaminated pool several ways, fine-tune on each, evaluate.

Arms:
- `sft`: fine-tune on the whole pool;
- `random`: remove as many samples as SAFT removed, at random;
- `prompting`: remove the samples the model itself calls harmful (`saft.prompting`);
- `saft`: the paper's rule (subspace score at the middle layer, last prompt token, k and tau by F1 on 100
  labels drawn from the pool);
- `oracle`: the safe rows only;
- one arm per other registered detector (guard, label-free, labelled), with the selection rule `saft filter
  --rule auto` gives it: the label-free estimate, or the calibrated rule on the same 100 labels;
- `base`: the model before any fine-tuning, for reference.
Pools are BeaverTails pairs whose prompts fall in the 'experiment' half of `saft.pools.prompt_split` (the judge
never saw them); evaluation prompts are drawn from the same half and never share a prompt with the pool.
Every arm's adapter, metrics and generations are kept under `output_dir`, so an interrupted run resumes at the
first unfinished arm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Sample, atomic_open, write_json, write_jsonl
from .detectors import DETECTORS, get_spec
from .evaluate import evaluate_model
from .finetune import FinetuneConfig, finetune
from .judges import get_judge
from .metrics import detection_metrics
from .models import EMBEDDED, default_cache_dir, load_model
from .pools import load_source, prompt_split
from .pipeline import FilterConfig, detector_view, score_and_select, versions
from .prompting import harmful_by_prompting
from .reference import reference_view
from .select import draw_labeled

logger = logging.getLogger(__name__)
BASE_ARMS = ("base", "sft", "random", "prompting", "saft", "oracle")


@dataclass
class ExperimentConfig:
    """Settings of `saft experiment`; saved in results.json."""

    model: str = field(default=EMBEDDED, metadata={"help": "hub id or folder, or embedded:smollm2-135m-aligned"})
    pool_size: int = field(default=500, metadata={"help": "samples in each contaminated pool"})
    rates: tuple[float, ...] = field(default=(0.3,), metadata={"help": "contamination rates (harmful fraction)"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (pool draw, labels, random removal, training)"})
    arms: tuple[str, ...] = field(default=(), metadata={"help": "arms to run (default: all, plus every registered detector)"})
    n_eval: int = field(default=50, metadata={"help": "held-out harmful prompts, and as many benign prompts with references"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per evaluation answer"})
    gen_batch_size: int = field(default=25, metadata={"help": "prompts per generation batch"})
    judges: tuple[str, ...] = field(default=("tfidf",), metadata={"help": "judges: tfidf (offline default), minilm (offline), beaverdam[:PATH], llamaguard[:PATH]"})
    layer: int | str = field(default="middle", metadata={"help": "SAFT feature layer"})
    position: str = field(default="prompt_last", metadata={"help": "SAFT token position"})
    n_labels: int = field(default=100, metadata={"help": "labelled pool samples for the F1 rule"})
    feature_max_length: int = field(default=256, metadata={"help": "tokens per sample when scoring"})
    max_length: int = field(default=128, metadata={"help": "tokens per sample when fine-tuning"})
    epochs: float = field(default=1.0, metadata={"help": "fine-tuning epochs"})
    max_steps: int = field(default=-1, metadata={"help": "cap on fine-tuning steps per arm (-1: none)"})
    batch_size: int = field(default=8, metadata={"help": "fine-tuning batch size"})
    learning_rate: float = field(default=2e-4, metadata={"help": "fine-tuning learning rate"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    raw_dir: str | None = field(default=None, metadata={"help": "shared/data/raw (default: $SAFT_RAW_DIR or found upwards)"})
    cache_dir: str | None = field(default=None, metadata={"help": "model and feature cache"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ..."})

    def __post_init__(self):
        self.rates, self.seeds = tuple(float(r) for r in self.rates), tuple(int(s) for s in self.seeds)
        self.arms, self.judges = tuple(self.arms), tuple(self.judges)
        if not self.rates or any(not 0 < r < 1 for r in self.rates):
            raise ValueError(f"rates must be in (0, 1), got {self.rates}")
        known = set(BASE_ARMS) | {d for d in DETECTORS if d != "subspace"}
        unknown = set(self.arms) - known
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; available: {', '.join(sorted(known))}")
        if self.pool_size < 20 or self.n_eval < 1:
            raise ValueError("pool_size must be at least 20 and n_eval at least 1")

    def all_arms(self) -> tuple[str, ...]:
        return self.arms or (*BASE_ARMS, *sorted(d for d in DETECTORS if d != "subspace"))


def build_split(config: ExperimentConfig, rate: float, seed: int):
    """(pool, harmful eval prompts, benign eval samples), disjoint by prompt text."""
    rng = np.random.default_rng(seed)
    take = lambda name: [r for r in load_source(name, config.raw_dir) if prompt_split(r["prompt"]) == "experiment"]  # noqa: E731
    safe, unsafe = take("bt_safe"), take("bt_unsafe")
    n_harm = int(round(config.pool_size * rate))
    n_safe = config.pool_size - n_harm
    if n_harm + config.n_eval > len(unsafe) or n_safe + config.n_eval > len(safe):
        raise ValueError(f"not enough rows in the experiment split for pool {config.pool_size} at rate {rate} plus "
                         f"{config.n_eval} evaluation prompts ({len(safe)} safe, {len(unsafe)} unsafe available)")
    unsafe = [unsafe[i] for i in rng.permutation(len(unsafe))]
    safe = [safe[i] for i in rng.permutation(len(safe))]
    pool_rows = unsafe[:n_harm] + safe[:n_safe]
    used = {r["prompt"] for r in pool_rows}
    eval_harm = [r["prompt"] for r in unsafe[n_harm:] if r["prompt"] not in used]
    eval_harm = list(dict.fromkeys(eval_harm))[: config.n_eval]
    eval_safe = [r for r in safe[n_safe:] if r["prompt"] not in used and r["prompt"] not in eval_harm][: config.n_eval]
    pool_rows = [pool_rows[i] for i in rng.permutation(len(pool_rows))]
    to_sample = lambda r, i, tag: Sample(f"{tag}-{i:05d}", [{"role": "user", "content": r["prompt"]},  # noqa: E731
                                                             {"role": "assistant", "content": r["response"]}],
                                         label=r["harmful"], meta={"category": r["category"]})
    pool = [to_sample(r, i, "pool") for i, r in enumerate(pool_rows)]
    return pool, eval_harm, [to_sample(r, i, "eval") for i, r in enumerate(eval_safe)]


def _select_arms(config: ExperimentConfig, pool: list[Sample], model, tok, seed: int, cache: Path,
                 pending: set[str]) -> dict:
    """Removal mask and detector scores of every filtering arm (the Prompting pass only if that arm is pending).
    SAFT and every detector arm run through `saft.pipeline.score_and_select`, as `saft filter` runs them, on the
    same 100 labels drawn from the pool."""
    labels = [s.label for s in pool]
    idx = draw_labeled(labels, config.n_labels, seed=seed)
    out = {}
    for arm in ("saft", *(a for a in config.all_arms() if a in DETECTORS)):
        fc = FilterConfig(detector="subspace" if arm == "saft" else arm, layer=config.layer, position=config.position,
                          max_length=config.feature_max_length, n_labels=config.n_labels, seed=seed,
                          device=config.device, cache_dir=config.cache_dir)
        view, positions = detector_view(fc, model, tok, feature_cache=cache / "features")
        X = view(pool)
        reference = None
        if get_spec(fc.detector).reference:  # the guard's rows in the same view, at the same settings
            reference = lambda: reference_view(view, model, tok, layer=config.layer, positions=positions,  # noqa: E731
                                               max_length=config.feature_max_length, cache_dir=cache / "features")
        scores, sel, k = score_and_select(fc, X, labelled_X=X[idx], labels=[labels[i] for i in idx],
                                          labelled_idx=idx, reference=reference)
        info = {"threshold": sel.threshold, "rule": sel.rule, **sel.params}
        if k is not None:
            info["k"] = k
        out[arm] = (sel.removed, scores, info)
    y = np.array(labels, dtype=bool)
    out["oracle"] = (y, y.astype(float), {})
    out["sft"] = (np.zeros(len(pool), dtype=bool), None, {})
    if "prompting" in pending:
        p = harmful_by_prompting(model, tok, pool, max_length=config.feature_max_length)
        out["prompting"] = (p > 0.5, p, {})
    rng = np.random.default_rng(seed)
    rand = np.zeros(len(pool), dtype=bool)
    rand[rng.choice(len(pool), size=int(out["saft"][0].sum()), replace=False)] = True
    out["random"] = (rand, None, {"n_matched_to": "saft"})
    return out


def run_experiment(config: ExperimentConfig | None = None, *, output_dir, progress: bool = True) -> dict:
    """Run every arm for every rate and seed; write results.json, results.md and results.png."""
    config = config or ExperimentConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir or default_cache_dir())
    judges = [get_judge(j, device=config.device) for j in config.judges]
    rows = []
    t0 = time.time()
    for rate in config.rates:
        for seed in config.seeds:
            pool, eval_harm, eval_safe = build_split(config, rate, seed)
            seed_dir = out / f"rate{rate:g}" / f"seed{seed}"
            pending = {a for a in config.all_arms() if not (seed_dir / a / "metrics.json").exists()}
            if pending - {"base"}:  # a resumed run with every filtering arm finished needs no selection pass
                model, tok = load_model(config.model, cache_dir=config.cache_dir, device=config.device)
                arms = _select_arms(config, pool, model, tok, seed, cache, pending)
            labels = np.array([s.label for s in pool])
            for arm in config.all_arms():
                run_dir = seed_dir / arm
                done = run_dir / "metrics.json"
                if done.exists():
                    rows.append(json.loads(done.read_text()))
                    logger.info("%s: reusing %s", arm, done)
                    continue
                logger.info("arm %s (rate %g, seed %d)", arm, rate, seed)
                model, tok = load_model(config.model, cache_dir=config.cache_dir, device=config.device)
                row = {"arm": arm, "rate": rate, "seed": seed, "pool": len(pool)}
                if arm != "base":
                    removed, scores, info = arms[arm]
                    kept = [s for s, r in zip(pool, removed) if not r]
                    det = detection_metrics(scores, list(labels), removed) if scores is not None else {}
                    row.update(kept=len(kept), harmful_kept=int(labels[~removed].sum()),
                               harmful_fraction_kept=float(labels[~removed].mean()) if len(kept) else None,
                               detection_auroc=det.get("auroc"), detection_f1=det.get("f1"), **info)
                    if kept:
                        ft = finetune(kept, output_dir=run_dir, model=model, tokenizer=tok, progress=progress,
                                      config=FinetuneConfig(model=config.model, max_length=config.max_length,
                                                            epochs=config.epochs, max_steps=config.max_steps,
                                                            batch_size=config.batch_size, rank=config.rank,
                                                            learning_rate=config.learning_rate, seed=seed))
                        model = ft["model"]
                        row.update(train_loss=ft["train_loss"], steps=ft["steps"])
                    else:  # the filter removed everything: there is nothing to fine-tune on
                        row.update(steps=0, note="nothing kept; the base model is evaluated")
                ev = evaluate_model(model, tok, harmful_prompts=eval_harm, benign=eval_safe, judges=judges,
                                    max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size,
                                    max_length=config.max_length, progress=progress)
                row.update(refusal_rate=ev["harmful"]["refusal_rate"], judges=ev["harmful"]["judges"],
                           helpful=ev["helpful"])
                run_dir.mkdir(parents=True, exist_ok=True)
                write_jsonl(ev["generations"], run_dir / "generations.jsonl")
                write_json(row, done)
                rows.append(row)
    results = {"config": dataclasses.asdict(config), "rows": rows, "seconds": round(time.time() - t0, 1),
               "judges": {j.name: getattr(j, "meta", {}) for j in judges}, "versions": versions()}
    write_json(results, out / "results.json")
    with atomic_open(out / "results.md") as f:
        f.write(results_table(results))
    plot_results(results, out / "results.png")
    return results


def results_table(results: dict) -> str:
    """Markdown table: one row per (rate, seed, arm)."""
    judges = list(results["judges"])
    head = ["rate", "seed", "arm", "kept", "harmful kept", *[f"harmful rate ({j})" for j in judges],
            "refusal rate", "ROUGE-L", "benign loss", "detection AUROC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in results["rows"]:
        cells = [f"{r['rate']:g}", str(r["seed"]), r["arm"], str(r.get("kept", "—")),
                 "—" if r.get("harmful_fraction_kept") is None else f"{r['harmful_kept']} ({r['harmful_fraction_kept']:.3f})",
                 *[f(r["judges"][j]["harmful_rate"]) for j in judges], f(r["refusal_rate"]),
                 f(r["helpful"].get("rouge_l")), f(r["helpful"].get("reference_loss")), f(r.get("detection_auroc"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- judge {j}: test AUROC {m.get('test_auroc')}, accuracy {m.get('test_accuracy')} on prompts it never "
             f"saw ({m.get('test', '')})" for j, m in results["judges"].items() if m]
    return "\n".join(lines + [""] + notes) + "\n"


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = next(iter(results["judges"]))
    rows = results["rows"]
    labels = [f"{r['arm']}\n{r['rate']:g}/s{r['seed']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, len(rows) * 0.9), 3.5))
    axes[0].bar(labels, [r["judges"][judge]["harmful_rate"] for r in rows], color="tab:red")
    axes[0].set_title(f"harmful rate ({judge} judge)")
    axes[1].bar(labels, [r["helpful"].get("rouge_l") or 0 for r in rows], color="tab:blue")
    axes[1].set_title("helpfulness (ROUGE-L)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, labelrotation=45)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # an interrupted run leaves the previous plot, never half of one
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
