"""Score and filter a dataset file end to end: load, embed, score, select, write outputs.

`filter_dataset` is what `saft score` and `saft filter` call. Outputs in `output_dir`:
- `scores.jsonl`: one row per input sample (id, harm_score, rank, removed, reason, label when known);
- `kept.<ext>` and `removed.<ext>`: the input rows, every field preserved, in the input's format;
- `summary.json`: the resolved settings, the threshold applied, counts and detection metrics.
kept + removed always equals the input rows that parsed (rows skipped with `skip_invalid` are counted in the
summary). The input is never modified; every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Dataset, FieldOptions, load_samples, output_name, write_json, write_jsonl, write_subset
from .detectors import (
    DETECTORS, NEEDS_LABELS, calibrated_prior, default_rule, detector_positions, detector_view, get_detector,
    needs_reference, own_estimate,
)
from .detectors.guard import check_kernel
from .encoders import ENCODER_VERSION, sentence_features
from .features import POSITIONS, extract_features
from .metrics import detection_metrics
from .models import EMBEDDED, default_cache_dir, load_model
from .reference import reference_view
from .trust import cap_removal, label_free_trust
from .select import (
    PRIOR_WEIGHT, Selection, draw_labeled, select_by_f1, select_calibrated, select_estimate, select_fraction, select_mixture,
    select_threshold,
)

logger = logging.getLogger(__name__)

RULES = ("auto", "f1", "calibrated", "estimate", "fraction", "threshold", "mixture", "none")
LABEL_FREE = "guard-model"  # what `auto` runs without labels (benchmarks/RESULTS.md, pool-seeds)
LABELLED = "guard-model-probe"  # what `auto` runs with labels (benchmarks/RESULTS.md, calibrated-prior)


@dataclass
class FilterConfig:
    """Settings of a scoring/filtering run; saved resolved in summary.json."""

    model: str = field(default=EMBEDDED, metadata={"help": "hub id or local folder of a causal LM; default: the embedded SmolLM2-135M-Instruct"})
    layer: int | str = field(default="middle", metadata={"help": "hidden layer (0 = embeddings; 'middle' = L//2, the paper's choice)"})
    position: str = field(default="prompt_last", metadata={"help": f"token position: {', '.join(POSITIONS)} (prompt_last is the paper's)"})
    max_length: int = field(default=512, metadata={"help": "tokens per sample; longer samples are truncated and counted"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    detector: str = field(default="auto", metadata={"help": "auto (guard-model-probe when the data has n_labels labelled rows or a labels file is given, else guard-model), or a registered detector: guard-model (label-free: the guard's classifier retrained on the guard's rows in the model's own view, plus a probe on the pool trained on its surest calls), guard-student (label-free: guard-knn plus a probe on the model's features trained on guard-knn's surest calls), guard-knn (label-free: a packaged classifier on sentence embeddings, smoothed over the model's features), guard (the same classifier alone; the model is not loaded), subspace (the paper's), probe, guard-probe and guard-model-probe (semi-supervised: use the labels; guard-model-probe is guard-probe guided by guard-model instead of guard-knn)"})
    guard_kernel: str = field(default="rbf", metadata={"help": "classifier of the packaged guard (guard, guard-knn, guard-student, guard-probe; the estimate of guard-model and guard-model-probe): rbf (a kernel SVM, the default: better on BeaverTails-like data) or linear (the logistic regression, the default before); each with its own contamination estimate"})
    n_components: int | None = field(default=None, metadata={"help": "fix k; default: searched over k_candidates by the f1 rule, else 1"})
    k_candidates: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata={"help": "k values the f1 rule searches"})
    weighted: bool = field(default=False, metadata={"help": "weight squared projections by singular values (HaloScope option)"})
    standardize: bool = field(default=False, metadata={"help": "scale features to unit variance before the SVD (not in the paper)"})
    rule: str = field(default="auto", metadata={"help": f"selection rule: {', '.join(RULES)}; auto = estimate for a detector that estimates the contamination itself (guard, guard-knn, guard-student, guard-model), calibrated for one trained on labels (probe, guard-probe, guard-model-probe), else f1 (the paper's)"})
    prior_weight: float = field(default=PRIOR_WEIGHT, metadata={"help": "calibrated rule: how many labels the detector's own label-free contamination estimate counts as (guard-probe, guard-model-probe: the guard's); it damps the removed count's dependence on which rows were labelled; 0 = the labels alone"})
    n_labels: int = field(default=100, metadata={"help": "labelled samples drawn from the pool for the f1 rule"})
    labels_file: str | None = field(default=None, metadata={"help": "separate labelled file for the f1 rule (instead of drawing from the pool)"})
    n_thresholds: int = field(default=100, metadata={"help": "evenly spaced threshold candidates for the f1 rule"})
    fraction: float | None = field(default=None, metadata={"help": "removal fraction for the fraction rule"})
    threshold: float | None = field(default=None, metadata={"help": "harm_score threshold for the threshold rule"})
    seed: int = field(default=0, metadata={"help": "seed of the label draw"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache for converted models and features (default ~/.cache/saft or $SAFT_CACHE)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, ... (default: fp32 on CPU, bf16 on GPU)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.detector not in DETECTORS and self.detector != "auto":
            get_detector(self.detector)  # raises with the list of names and a suggestion
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        check_kernel(self.guard_kernel)
        if self.rule == "auto" and self.detector != "auto":
            self.rule = default_rule(self.detector)
        if self.rule == "estimate" and self.detector != "auto" and not hasattr(DETECTORS[self.detector], "contamination_estimate"):
            raise ValueError(f"the estimate rule needs a detector that estimates contamination (guard); "
                             f"{self.detector!r} does not: use --rule f1, fraction, threshold or mixture")
        if self.rule == "fraction" and (self.fraction is None or not 0 <= self.fraction < 1):
            raise ValueError(f"the fraction rule needs fraction in [0, 1), got {self.fraction!r}")
        if self.rule == "threshold" and self.threshold is None:
            raise ValueError("the threshold rule needs threshold=<number>")
        if self.n_components is not None and self.n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {self.n_components}")
        if not self.k_candidates or any(k < 1 for k in self.k_candidates):
            raise ValueError(f"k_candidates must be positive integers, got {self.k_candidates!r}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be at least 0, got {self.prior_weight}")
        if self.n_labels < 1:
            raise ValueError(f"n_labels must be at least 1, got {self.n_labels}")
        if self.n_thresholds < 2:
            raise ValueError(f"n_thresholds must be at least 2, got {self.n_thresholds}")
        self.k_candidates = tuple(int(k) for k in self.k_candidates)


def resolve_auto(config: FilterConfig, *, n_labelled: int, labels_file: bool) -> FilterConfig:
    """The concrete detector and rule for `auto`, given how many labelled rows the data has.

    With labels (n_labels labelled rows in the pool, or a labels file) the benchmark's best use of them is
    guard-model-probe with the calibrated rule; without, the label-free guard-model with its own contamination
    estimate.
    """
    detector = config.detector
    if detector == "auto":
        detector = LABELLED if labels_file or n_labelled >= config.n_labels else LABEL_FREE
    rule = config.rule
    if config.detector == "auto" and rule == "estimate" and detector == LABELLED:
        detector = LABEL_FREE  # an explicit label-free rule keeps the detector label-free
    return dataclasses.replace(config, detector=detector, rule=rule)


@dataclass
class FilterResult:
    dataset: Dataset
    scores: np.ndarray
    selection: Selection
    summary: dict
    output_dir: Path | None


def versions() -> dict:
    """Versions of the packages behind a result, for summaries and results tables."""
    import sklearn
    import torch
    import transformers

    from . import __version__

    return {"saft": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def filter_dataset(path, *, output_dir=None, config: FilterConfig | None = None,
                   fields: FieldOptions | None = None, skip_invalid: bool = False, progress: bool = True,
                   report: bool = False, model=None, tokenizer=None) -> FilterResult:
    """Score every sample of the dataset at `path` and select the ones to remove; write outputs if asked.

    `model`/`tokenizer` may be passed to reuse a loaded model; otherwise `config.model` is loaded.
    `report` also writes `report.html` (see `saft.report`) into `output_dir`.
    """
    config = config or FilterConfig()
    t0 = time.time()
    dataset = load_samples(path, fields=fields, skip_invalid=skip_invalid)
    labels_ds = None
    if config.labels_file:
        labels_ds = load_samples(config.labels_file, fields=fields, skip_invalid=skip_invalid)
        if any(lab is None for lab in labels_ds.labels):
            missing = next(s.meta["line"] for s in labels_ds.samples if s.label is None)
            raise ValueError(f"{config.labels_file}, row {missing}: no label. Every row of a labels file needs one "
                             "(is_safe, harmful, label; or name the field with --label-field)")
    requested = config
    config = resolve_auto(config, n_labelled=sum(lab is not None for lab in dataset.labels),
                          labels_file=labels_ds is not None)
    embed, info = _feature_view(config, dataset, model, tokenizer, progress=progress)
    X = embed(dataset)
    # Labels: a separate labelled file, or n_labels drawn from the pool's labelled rows. The f1 rule and
    # label-using detectors need them; other rules never look at them.
    labeled_idx, Xv, val_labels = None, None, None
    if config.rule in ("f1", "calibrated") or config.detector in NEEDS_LABELS:
        if labels_ds is not None:
            Xv = embed(labels_ds)
            val_labels = labels_ds.labels
        else:
            labeled_idx = draw_labeled(dataset.labels, config.n_labels, seed=config.seed)
            Xv, val_labels = X[labeled_idx], [dataset.labels[i] for i in labeled_idx]
    scorers = _fit_scorers(config, X, Xv, val_labels, labeled_idx, reference=info["reference"])
    pool_scores = {c: s.score_samples(X) for c, s in scorers.items()}
    if config.rule == "f1":
        val_scores = {c: s.score_samples(Xv) for c, s in scorers.items()}
        selection = select_by_f1(pool_scores, val_scores, val_labels, n_thresholds=config.n_thresholds)
        k = selection.params["candidate"]
    else:
        k = next(iter(pool_scores))
        scores = pool_scores[k]  # one candidate only: the f1 rule alone searches k
        if config.rule == "fraction":
            selection = select_fraction(scores, fraction=config.fraction)
        elif config.rule == "threshold":
            selection = select_threshold(scores, threshold=config.threshold)
        elif config.rule == "mixture":
            selection = select_mixture(scores, seed=config.seed)
        elif config.rule == "calibrated":
            selection = select_calibrated(scores, scorers[k].score_samples(Xv), val_labels,
                                          **calibrated_prior(scorers[k], X, config.prior_weight))
        elif config.rule == "estimate":
            selection = select_estimate(scores, **own_estimate(scorers[k], X))
        else:
            selection = Selection(np.zeros(len(scores), dtype=bool), float("inf"), "none", {})
    scores = pool_scores[k]
    n = len(dataset)
    # Label-free rules: the estimate's interval and the pool's distance to the guard's training rows (None for a
    # guard shipped without that calibration, v1); such a run never removes more than the interval's upper end.
    trust = label_free_trust(scorers[k], X) if config.rule in ("estimate", "mixture") else None
    if trust is not None and selection.n_removed > cap_removal(selection.n_removed, n, trust["interval"]):
        capped = select_fraction(scores, fraction=cap_removal(selection.n_removed, n, trust["interval"]) / n)
        selection = Selection(capped.removed, capped.threshold, selection.rule,
                              {**selection.params, "capped_at_interval": trust["interval"][1]})
    summary = {
        "input": str(dataset.path), "format": dataset.format, "schema": dataset.schema,
        "n_input_rows": n + len(dataset.skipped), "n_samples": n, "n_skipped_invalid": len(dataset.skipped),
        "skipped_invalid": [{"line": ln, "reason": r} for ln, r in dataset.skipped[:100]],
        "n_removed": selection.n_removed, "n_kept": n - selection.n_removed,
        "rule": selection.rule, "threshold": selection.threshold, "k": k if config.detector == "subspace" else None,
        "detector": config.detector, "layer": info["layer"],
        "position": info["position"], "positions": info["positions"], "rule_params": {kk: v for kk, v in selection.params.items() if kk != "candidate"},
        "n_truncated": info["n_truncated"], "labeled_rows_used": None if labeled_idx is None else [dataset.samples[i].id for i in labeled_idx],
        "metrics": detection_metrics(scores, dataset.labels, selection.removed),
        # The same on the labelled rows that neither trained the detector nor chose the threshold: the honest
        # number when labels were drawn from the pool (None otherwise).
        "metrics_unused_labels": None if labeled_idx is None else detection_metrics(
            scores, [None if i in set(labeled_idx.tolist()) else lab for i, lab in enumerate(dataset.labels)],
            selection.removed),
        "config": dataclasses.asdict(config), "requested": {"detector": requested.detector, "rule": requested.rule},
        "model": info["model"],
        "feature_cache": str(info["cache_path"]) if info["cache_path"] else None,
        "versions": versions(), "seconds": round(time.time() - t0, 2),
        "trust": trust,
    }
    result = FilterResult(dataset, scores, selection, summary, Path(output_dir) if output_dir is not None else None)
    if result.output_dir is not None:
        result.output_dir.mkdir(parents=True, exist_ok=True)
        extra = {}
        if report:
            from .report import write_report

            extra["report"] = str(write_report(result, result.output_dir / "report.html"))
        _write_outputs(dataset, scores, selection, summary, result.output_dir, extra)
    return result


PAPER = dict(detector="subspace", rule="f1")  # the paper's configuration on top of FilterConfig's defaults


def run_demo(output_dir, *, config: FilterConfig | None = None, progress: bool = True, report: bool = False,
             model=None, tokenizer=None) -> tuple[FilterResult, FilterResult | None]:
    """Filter the packaged demo set with `config` into `output_dir`, and, when `config` is not already the
    paper's method, also with the paper's configuration on the embedded model into `output_dir/paper`, so the
    two can be compared on the demo's labels."""
    from importlib import resources

    data = Path(str(resources.files("saft") / "demo" / "demo.jsonl"))
    config = config or FilterConfig()
    kw = dict(progress=progress, report=report, model=model, tokenizer=tokenizer)
    main = filter_dataset(data, output_dir=output_dir, config=config, **kw)
    if config.detector == "subspace":
        return main, None
    paper = filter_dataset(data, output_dir=Path(output_dir) / "paper", config=dataclasses.replace(config, **PAPER), **kw)
    return main, paper


def _feature_view(config: FilterConfig, dataset: Dataset, model, tokenizer, *, progress: bool):
    """(embed, info): `embed(ds)` gives the detector's view of a dataset (the pool's is computed here, once);
    `info` holds layer, positions, truncation count, model name and feature-cache path for the summary, and
    `reference`: None, or for a detector that trains on the guard's rows (guard-model, guard-model-probe) a
    function giving their (view, labels)."""
    feature_cache = Path(config.cache_dir or default_cache_dir()) / "features"
    view = detector_view(config.detector)

    def sentence(samples):
        return sentence_features(samples, device=config.device or "cpu", cache_dir=feature_cache, progress=progress)

    info = {"layer": None, "position": None, "positions": None, "n_truncated": 0, "model": ENCODER_VERSION,
            "cache_path": None, "reference": None}
    if view == "sentence":  # no language model needed: the model being fine-tuned is not even loaded
        return (lambda ds: sentence(ds.samples)), info
    if model is None:
        model, tokenizer = load_model(config.model, cache_dir=config.cache_dir, device=config.device,
                                      dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    positions = detector_positions(config.detector, config.position)
    kw = dict(layers=[config.layer], positions=positions, max_length=config.max_length,
              batch_size=config.batch_size, cache_dir=feature_cache, progress=progress)
    feats = extract_features(model, tokenizer, dataset.samples, **kw)
    layer = feats.layers[0]
    info.update(layer=layer, position=config.position, positions=positions, n_truncated=feats.n_truncated,
                cache_path=feats.cache_path,
                model=feats.manifest["model"] + (f" + {ENCODER_VERSION}" if view == "both" else ""))

    def samples_view(samples, computed=None):
        f = computed or extract_features(model, tokenizer, samples, **kw)
        hidden = np.hstack([f.get(layer, p) for p in positions])
        return np.hstack([sentence(samples), hidden]) if view == "both" else hidden

    if needs_reference(config.detector):
        info["reference"] = lambda: reference_view(samples_view, model, tokenizer, layer=layer, positions=positions,
                                                   max_length=config.max_length, cache_dir=feature_cache)
    return (lambda ds: samples_view(ds.samples, feats if ds is dataset else None)), info


def _fit_scorers(config: FilterConfig, X, Xv, val_labels, labeled_idx, *, reference=None) -> dict:
    """Fitted detectors by candidate: k -> SubspaceScorer (k searched by the f1 rule), or one other detector.
    `reference()` gives the guard's rows in the detector's view, for a detector that trains on them."""
    if config.detector == "subspace":
        if config.rule == "f1" and config.n_components is None:
            ks = [k for k in config.k_candidates if k <= min(X.shape)]
            if not ks:
                raise ValueError(f"every k in {config.k_candidates} exceeds what {X.shape[0]} samples of dimension "
                                 f"{X.shape[1]} allow; pass smaller --k-candidates")
        else:
            ks = [config.n_components or 1]
        return {k: get_detector("subspace", n_components=k, weighted=config.weighted,
                                standardize=config.standardize).fit(X) for k in ks}
    detector = get_detector(config.detector)
    if "kernel" in detector.get_params():  # the guard detectors
        detector.set_params(kernel=config.guard_kernel)
    if "positions" in detector.get_params():  # the hidden-state blocks of X, in the order they were stacked
        detector.set_params(positions=tuple(detector_positions(config.detector, config.position)))
    fit_kw = {}
    if reference is not None:
        reference_X, reference_y = reference()
        fit_kw = {"reference_X": reference_X, "reference_y": reference_y}
    if config.detector not in NEEDS_LABELS:
        return {config.detector: detector.fit(X, **fit_kw)}
    # Semi-supervised: the pool shapes the detector, the labelled rows (pool rows or a labels file) train it.
    if labeled_idx is not None:
        y = np.full(len(X), -1)
        y[labeled_idx] = val_labels
        return {config.detector: detector.fit(X, y, **fit_kw)}
    return {config.detector: detector.fit(np.vstack([X, Xv]), np.concatenate([np.full(len(X), -1), val_labels]),
                                          **fit_kw)}


def _write_outputs(dataset: Dataset, scores: np.ndarray, selection: Selection, summary: dict, out: Path,
                   extra: dict) -> None:
    targets = [out / "scores.jsonl", out / "summary.json"] + [out / output_name(dataset, s) for s in ("kept", "removed")]
    if any(t.resolve() == dataset.path.resolve() for t in targets):
        raise ValueError(f"{dataset.path}: writing to {out} would overwrite the input; choose another -o folder")
    ranks = np.empty(len(scores), dtype=int)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    rows = []
    for i, s in enumerate(dataset.samples):
        row = {"id": s.id, "harm_score": float(scores[i]), "rank": int(ranks[i]), "removed": bool(selection.removed[i]),
               "reason": selection.reason(float(scores[i])) if selection.removed[i] else ""}
        if s.label is not None:
            row["label"] = s.label
        rows.append(row)
    write_jsonl(rows, out / "scores.jsonl")
    kept = [i for i in range(len(dataset)) if not selection.removed[i]]
    removed = [i for i in range(len(dataset)) if selection.removed[i]]
    summary["outputs"] = {
        "scores": str(out / "scores.jsonl"),
        "kept": str(write_subset(dataset, kept, out / output_name(dataset, "kept"))),
        "removed": str(write_subset(dataset, removed, out / output_name(dataset, "removed"))),
        "summary": str(out / "summary.json"),
        **extra,
    }
    write_json(summary, out / "summary.json")
