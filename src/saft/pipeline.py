"""Score and filter a dataset file end to end: load, embed, score, select, write outputs.

`filter_dataset` is what `saft score` and `saft filter` call. Outputs in `output_dir`:
- `scores.jsonl`: one row per input sample (id, harm_score, rank, removed, reason, label when known);
- `kept.<ext>` and `removed.<ext>`: the input rows, every field preserved, in the input's format;
- `invalid.jsonl`: the rows `skip_invalid` skipped (line or row number, reason, raw text); empty without them;
- `summary.json`: the resolved settings, the threshold applied, counts and detection metrics.
kept + removed + invalid always equals the input rows (n_kept + n_removed + n_invalid = n_input_rows). The
input is never modified; every output is written atomically.

JSONL, CSV and Parquet inputs are streamed (`saft.data.scan_samples`): one pass checks the rows, the sentence view
is encoded a chunk at a time into its cache file, the hidden states are extracted a block of samples at a time
into the feature store, and one pass writes scores.jsonl, kept and removed; apart from the sentence encoder's run,
memory per row is a few dozen bytes (benchmarks/suites/scale.py, guard-filter). A detector's view over
`VIEW_IN_MEMORY_BYTES` is read from those files a chunk at a time (`saft.chunks.HStack`); below it, it is one
array. `--report`, `--certify` and `--engine ray` read the samples whole; JSON and `datasets` inputs are read
whole.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunks import HStack, n_rows, take
from .data import (
    Dataset, FieldOptions, StreamedDataset, atomic_open, json_text, load_samples, output_name, scan_samples,
    write_invalid, write_json, write_parts,
)
from .detectors import DETECTORS, detector_positions, get_detector, get_spec
from .detectors.guard import guard_weights
from .encoders import ENCODER_VERSION, sentence_features
from .features import POSITIONS, extract_features
from .metrics import detection_metrics
from .models import EMBEDDED, default_cache_dir, load_model
from .reference import reference_view
from .regions import refusal_mask
from .select import MARGIN, PRIOR_WEIGHT, RULES, RuleInputs, Selection, check_margin, draw_labeled, select
from .trust import label_free_trust

logger = logging.getLogger(__name__)

LABEL_FREE = "label-free"  # what `auto` runs without labels (docs/detectors.md)
LABELLED = "labelled"  # what `auto` runs with labels (docs/detectors.md)
# A detector's view larger than this (512 MiB) is read from the feature store a chunk at a time (`saft.chunks.HStack`)
# instead of gathered into one array: the detectors fit on bounded samples and score in chunks.
VIEW_IN_MEMORY_BYTES = 512 << 20
ENGINES = ("local", "ray")  # where hidden states are computed (saft.engine_ray)


def _help(text: str, *, advanced: bool = False) -> dict:
    return {"help": text, "advanced": advanced}


@dataclass
class FilterConfig:
    """Settings of a scoring/filtering run; saved resolved in summary.json. Fields marked advanced are grouped
    apart in `saft filter --help`."""

    detector: str = field(default="auto", metadata=_help(
        f"auto (labelled with labels, else label-free), {', '.join(DETECTORS)}"))
    rule: str = field(default="auto", metadata=_help(
        f"auto (per detector) or {', '.join(RULES)}"))
    labels_file: str | None = field(default=None, metadata=_help("a labelled file to learn from (instead of labelled "
                                                                  "rows in the data)"))
    fraction: float | None = field(default=None, metadata=_help("share of rows to remove (--rule fraction)"))
    threshold: float | None = field(default=None, metadata=_help("harm_score above which rows go (--rule threshold)"))
    certify: float | None = field(default=None, metadata=_help(
        "keep a set certified at most ALPHA harmful (needs --labels-file of a random sample)"))
    model: str = field(default=EMBEDDED, metadata=_help("hub id or local folder of the model to be fine-tuned"))
    layer: int | str = field(default="middle", metadata=_help("hidden layer read (0 = embeddings; middle = L//2)",
                                                              advanced=True))
    position: str = field(default="prompt_last", metadata=_help(f"token position: {', '.join(POSITIONS)}",
                                                                advanced=True))
    max_length: int = field(default=512, metadata=_help("tokens per sample; longer ones are truncated and counted",
                                                        advanced=True))
    batch_size: int = field(default=8, metadata=_help("samples per forward pass", advanced=True))
    n_labels: int = field(default=100, metadata=_help("labelled rows drawn from the data for the label rules",
                                                      advanced=True))
    prior_weight: float = field(default=PRIOR_WEIGHT, metadata=_help(
        "calibrated rule: labels the label-free estimate counts as", advanced=True))
    margin: float = field(default=MARGIN, metadata=_help(
        "estimate and calibrated rules: standard errors removed past the estimated count", advanced=True))
    n_components: int | None = field(default=None, metadata=_help("subspace: fix k (default: searched by the f1 rule)",
                                                                  advanced=True))
    k_candidates: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata=_help("subspace: k values the f1 rule "
                                                                               "searches", advanced=True))
    weighted: bool = field(default=False, metadata=_help("subspace: weight projections by singular values",
                                                         advanced=True))
    standardize: bool = field(default=False, metadata=_help("subspace: unit-variance features before the SVD",
                                                            advanced=True))
    n_thresholds: int = field(default=100, metadata=_help("f1 rule: evenly spaced thresholds tried", advanced=True))
    guard: str = field(default="v3", metadata=_help("packaged guard: v3 (v2 counting region by region), v2, v1 "
                                                     "or a weights file", advanced=True))
    delta: float = field(default=0.1, metadata=_help("--certify: the chance the certificate is wrong", advanced=True))
    certify_stratum_field: str | None = field(default=None, metadata=_help(
        "--certify: a field naming each row's stratum, each certified apart", advanced=True))
    seed: int = field(default=0, metadata=_help("seed of the label draw", advanced=True))
    cache_dir: str | None = field(default=None, metadata=_help("models and features (default ~/.cache/saft or "
                                                               "$SAFT_CACHE)", advanced=True))
    device: str | None = field(default=None, metadata=_help("cpu, cuda, ... (default: cuda if available)",
                                                            advanced=True))
    dtype: str | None = field(default=None, metadata=_help("float32, bfloat16, ... (default: fp32 on CPU, bf16 on "
                                                           "GPU)", advanced=True))
    trust_remote_code: bool = field(default=False, metadata=_help("run model code from the hub (off unless asked)",
                                                                  advanced=True))
    engine: str = field(default="local", metadata=_help(
        "local, or ray: hidden states from Ray workers, one per GPU (docs/ray.md)", advanced=True))
    ray_address: str | None = field(default=None, metadata=_help(
        "--engine ray: cluster to join (auto: the one running here)", advanced=True))
    ray_workers: int | None = field(default=None, metadata=_help(
        "--engine ray: workers (default: one per GPU, else per 4 CPUs)", advanced=True))

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.detector != "auto":
            get_spec(self.detector)  # raises with the list of names and a suggestion
        if self.rule != "auto" and self.rule not in RULES:
            raise ValueError(f"rule must be auto or one of {', '.join(RULES)}, got {self.rule!r}")
        guard_weights(self.guard)  # raises for an unknown version or a missing file
        if self.certify is not None:
            if not 0 < self.certify <= 1:
                raise ValueError(f"--certify takes the largest share harmful allowed in the kept set, in (0, 1]; "
                                 f"got {self.certify}")
            if not 0 < self.delta < 1:
                raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
            self.rule = "certify"
        elif self.rule == "certify":
            raise ValueError("the certify rule needs --certify ALPHA")
        if self.rule != "auto" and RULES[self.rule].label_free and self.detector != "auto" and get_spec(self.detector).labels:
            raise ValueError(f"the {self.rule} rule needs a label-free detector (its scores must not depend on the "
                             f"labels); {self.detector!r} trains on labels")
        if self.rule == "auto" and self.detector != "auto":
            self.rule = get_spec(self.detector).rule
        if (self.rule != "auto" and RULES[self.rule].estimate and self.detector != "auto"
                and not hasattr(get_spec(self.detector).cls, "contamination_estimate")):
            raise ValueError(f"the {self.rule} rule needs a detector that estimates contamination "
                             f"(guard, label-free); {self.detector!r} does not: use --rule f1, fraction or threshold")
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
        check_margin(self.margin)
        if self.n_labels < 1:
            raise ValueError(f"n_labels must be at least 1, got {self.n_labels}")
        if self.n_thresholds < 2:
            raise ValueError(f"n_thresholds must be at least 2, got {self.n_thresholds}")
        self.k_candidates = tuple(int(k) for k in self.k_candidates)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine != "ray" and (self.ray_address is not None or self.ray_workers is not None):
            raise ValueError("--ray-address and --ray-workers apply to --engine ray")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ValueError(f"ray_workers must be at least 1, got {self.ray_workers}")
        if self.engine == "ray":
            from .engine_ray import require_ray

            require_ray()  # says how to install it


def resolve_auto(config: FilterConfig, *, n_labelled: int, labels_file: bool) -> FilterConfig:
    """The concrete detector and rule for `auto`, given how many labelled rows the data has.

    With labels (n_labels labelled rows in the data, or a labels file) the benchmarks' best use of them is the
    labelled detector with the calibrated rule; without, the label-free detector with its own estimate.
    """
    detector = config.detector
    if detector == "auto":
        detector = LABELLED if labels_file or n_labelled >= config.n_labels else LABEL_FREE
        if config.rule != "auto" and RULES[config.rule].label_free:
            detector = LABEL_FREE  # an explicit label-free rule keeps the detector label-free
    rule = get_spec(detector).rule if config.rule == "auto" else config.rule
    return dataclasses.replace(config, detector=detector, rule=rule)


def pool_positions(dataset: Dataset, labels_ds: Dataset) -> list[int]:
    """Positions in `dataset` of the rows of `labels_ds`, matched by id, else by prompt and response; every row
    must be a pool row, and none chosen by score (`saft label` without --random)."""
    by_id = {s.id: i for i, s in enumerate(dataset.samples)}
    by_text = {(s.prompt, s.response): i for i, s in enumerate(dataset.samples)}
    out = []
    for s, row in zip(labels_ds.samples, labels_ds.rows):
        where = f"{labels_ds.path}, row {s.meta['line']}"
        if isinstance(row, dict) and row.get("selection") == "chosen":
            raise ValueError(f"{where}: chosen by score (saft label without --random), not drawn at random; the "
                             "certificate needs a uniformly random sample: saft label DATA -o FILE --random")
        i = by_id.get(s.id) if isinstance(row, dict) and "id" in row else None
        if i is None or (dataset.samples[i].prompt, dataset.samples[i].response) != (s.prompt, s.response):
            i = by_text.get((s.prompt, s.response))
        if i is None:
            raise ValueError(f"{where}: not a row of {dataset.path} (no row with its id or its prompt and "
                             "response); the certificate needs labels on the pool's own rows")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"{labels_ds.path}: a pool row is labelled twice; a random sample has each row once")
    return out


@dataclass
class FilterResult:
    """`dataset`: the input as read: a `StreamedDataset` for JSONL, CSV and Parquet (its `samples` and `rows`
    are read from the file when first asked for), a `Dataset` for JSON and `datasets` folders."""

    dataset: Dataset | StreamedDataset
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
    # JSONL, CSV and Parquet are read in passes (scan, view, write), never held whole; see `scan_samples`.
    dataset = scan_samples(path, fields=fields, skip_invalid=skip_invalid)
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
    # Labels: a separate labelled file, or n_labels drawn from the data's labelled rows; only rules and
    # detectors that learn from labels look at them.
    labeled_idx, Xv, val_labels = None, None, None
    if config.rule == "certify":  # the labels test the scores: they must be pool rows, drawn at random
        if labels_ds is None:
            raise ValueError("--certify needs --labels-file: labels on a uniformly random sample of the data "
                             "(saft label DATA -o labels.jsonl --random -n 400)")
        labeled_idx = np.asarray(pool_positions(dataset, labels_ds))
        Xv, val_labels = take(X, labeled_idx, dtype=None), labels_ds.labels
    elif RULES[config.rule].labels or get_spec(config.detector).labels:
        if labels_ds is not None:
            Xv, val_labels = embed(labels_ds), labels_ds.labels
        else:
            labeled_idx = draw_labeled(dataset.labels, config.n_labels, seed=config.seed)
            Xv, val_labels = take(X, labeled_idx, dtype=None), [dataset.labels[i] for i in labeled_idx]
    strata = None
    if config.certify_stratum_field:
        name = config.certify_stratum_field
        strata = []
        for s, row in _sample_rows(dataset):
            if name not in row:
                raise ValueError(f"{dataset.path}, row {s.meta['line']}: no field {name!r} (--certify-stratum-field)")
            strata.append(str(row[name]))
    refusal, labelled_refusal = None, None
    if hasattr(get_spec(config.detector).cls, "contamination_estimate"):  # the guard's estimate reads refusals
        refusal = refusal_mask(s.response for s in _samples(dataset))
        if labels_ds is not None and labeled_idx is None:
            labelled_refusal = refusal_mask(s.response for s in labels_ds.samples)
    scores, selection, candidate = score_and_select(config, X, labelled_X=Xv, labels=val_labels,
                                                    labelled_idx=labeled_idx, reference=info["reference"],
                                                    strata=strata, refusal=refusal, labelled_refusal=labelled_refusal)
    n = len(dataset)
    used = set() if labeled_idx is None else set(labeled_idx.tolist())
    summary = {
        "input": str(dataset.path), "format": dataset.format, "schema": dataset.schema,
        "n_input_rows": n + len(dataset.skipped), "n_samples": n, "n_invalid": len(dataset.skipped),
        "skipped_invalid": [{"line": ln, "reason": r} for ln, r, _ in dataset.skipped[:100]],
        "n_removed": selection.n_removed, "n_kept": n - selection.n_removed,
        "rule": selection.rule, "threshold": selection.threshold, "k": candidate,
        "detector": config.detector, "layer": info["layer"],
        "position": info["position"], "positions": info["positions"], "rule_params": selection.params,
        "n_truncated": info["n_truncated"], "labeled_rows_used": None if labeled_idx is None else _ids_at(dataset, labeled_idx),
        "metrics": detection_metrics(scores, dataset.labels, selection.removed),
        # The same on the labelled rows that neither trained the detector nor chose the threshold: the honest
        # number when labels were drawn from the data (None otherwise).
        "metrics_unused_labels": None if labeled_idx is None else detection_metrics(
            scores, [None if i in used else lab for i, lab in enumerate(dataset.labels)], selection.removed),
        "config": dataclasses.asdict(config), "requested": {"detector": requested.detector, "rule": requested.rule},
        "model": info["model"],
        "feature_cache": str(info["cache_path"]) if info["cache_path"] else None,
        "versions": versions(), "seconds": round(time.time() - t0, 2),
        # The label-free estimate's interval, the data's distance to the guard's training rows and the advice
        # (None for a guard shipped without that calibration, and for rules that do not use the estimate).
        "trust": selection.params.pop("trust", None),
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


def score_and_select(config: FilterConfig, X: np.ndarray, *, labelled_X=None, labels=None, labelled_idx=None,
                     reference=None, strata=None, refusal=None,
                     labelled_refusal=None) -> tuple[np.ndarray, Selection, int | None]:
    """Fit `config.detector` on the pool's view X and apply `config.rule`: (pool scores, selection, the paper's k
    when the f1 rule searched it, else None).

    Labelled rows are pool rows (`labelled_idx`, with `labelled_X = X[labelled_idx]`) or rows of a labels file
    (`labelled_X` alone); `reference()` gives the guard's rows and labels in the same view, for a detector that
    trains on them. `refusal`: the pool rows whose response reads as a refusal (`saft.regions.refusal_mask`), for
    the guard's region-wise estimate (`labelled_refusal`: the same for the rows of a labels file). `saft filter` and `saft experiment` both call this, so every detector is run
    the same way.
    """
    spec, rule = get_spec(config.detector), RULES[config.rule]
    params = {}
    if spec.searched:  # the paper's detector: its options, and k searched by the f1 rule unless fixed
        params = {"weighted": config.weighted, "standardize": config.standardize}
    if "weights" in inspect.signature(spec.cls).parameters:  # the detectors built on the packaged guard
        params["weights"] = guard_weights(config.guard)
    if spec.positions:  # the hidden-state blocks of X, in the order they were stacked
        params["positions"] = tuple(detector_positions(config.detector, config.position))
    candidates = [None]
    if spec.searched:
        if config.rule == "f1" and config.n_components is None:
            candidates = [k for k in config.k_candidates if k <= min(X.shape)]
            if not candidates:
                raise ValueError(f"every k in {config.k_candidates} exceeds what {X.shape[0]} samples of dimension "
                                 f"{X.shape[1]} allow; pass smaller --k-candidates")
        else:
            candidates = [config.n_components or 1]
    fit_X, y = X, None
    if spec.labels:  # semi-supervised: every pool row shapes the detector, the labelled rows train it
        if labelled_idx is not None:
            y = np.full(len(X), -1)
            y[labelled_idx] = labels
        else:
            fit_X, y = np.vstack([X, labelled_X]), np.concatenate([np.full(len(X), -1), labels])
    fit_kw = {}
    if spec.reference:
        fit_kw["reference_X"], fit_kw["reference_y"] = reference()
    if "refusal" in inspect.signature(spec.cls.fit).parameters:  # a detector that uses the guard's estimate
        extra = n_rows(fit_X) - n_rows(X)  # rows of a labels file, stacked under the pool's
        if refusal is not None and extra:
            fill = np.zeros(extra, dtype=bool) if labelled_refusal is None else np.asarray(labelled_refusal, dtype=bool)
            refusal = np.r_[refusal, fill]
        fit_kw["refusal"] = refusal
    detectors = {}
    for c in candidates:
        kw = dict(params, **({spec.searched: c} if spec.searched else {}))
        detectors[c] = get_detector(config.detector, **kw).fit(fit_X, y, **fit_kw)
    estimate, trust = None, None
    if hasattr(spec.cls, "contamination_estimate") and (rule.estimate or config.rule == "calibrated"):
        pool_refusal = None if refusal is None else refusal[:n_rows(X)]
        estimate = detectors[candidates[0]].contamination_estimate(X, refusal=pool_refusal)
        if rule.estimate:  # a label-free run: the interval caps what it removes (`saft.trust`)
            trust = label_free_trust(detectors[candidates[0]], X, estimate)
            if trust is not None:
                estimate = dataclasses.replace(estimate, interval=tuple(trust["interval"]), level=trust["level"])
    pool_scores = {c: d.score_samples(X) for c, d in detectors.items()}
    inputs = RuleInputs(pool_scores, estimate=estimate, fraction=config.fraction, threshold=config.threshold,
                        n_thresholds=config.n_thresholds, prior_weight=config.prior_weight, margin=config.margin,
                        labelled_idx=labelled_idx, alpha=config.certify, delta=config.delta, strata=strata)
    if rule.labels:
        inputs.labelled_scores = {c: d.score_samples(labelled_X) for c, d in detectors.items()}
        inputs.labels = labels
    selection = select(config.rule, inputs)
    if trust is not None:
        selection.params["trust"] = trust
    chosen = selection.params.pop("candidate", candidates[0])
    return pool_scores[chosen], selection, chosen


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


def hidden_states(config: FilterConfig, model, tokenizer, samples, *, positions, feature_cache: Path,
                  progress: bool = False, also=(), source=None):
    """`extract_features` at the config's layer, positions and length; with `engine="ray"` computed by a Ray
    actor pool, with the rows `also` (needed later; stored only), Ray Data reading `source`'s file itself where
    it can (`saft.engine_ray`)."""
    if config.engine == "ray":
        from .engine_ray import extract_with_ray

        return extract_with_ray(samples, model, tokenizer, config=config, positions=positions,
                                cache_dir=feature_cache, also=also, source=source, progress=progress)[0]
    return extract_features(model, tokenizer, samples, layers=[config.layer], positions=positions,
                            max_length=config.max_length, batch_size=config.batch_size, cache_dir=feature_cache,
                            progress=progress)


def detector_view(config: FilterConfig, model, tokenizer, *, feature_cache: Path, progress: bool = False):
    """`view(samples) -> X`: the configured detector's view of a list of samples (sentence-encoder columns and/or
    the model's hidden states at the detector's positions, stacked in that order), and the positions read.
    The pipeline and the experiment build every view through this, so the guard's rows always match the pool's."""
    spec = get_spec(config.detector)
    positions = detector_positions(config.detector, config.position)

    def sentence(samples):
        return sentence_features(samples, device=config.device or "cpu", cache_dir=feature_cache, progress=progress,
                                 out_of_core=isinstance(samples, StreamedDataset))

    def view(samples, computed=None):
        if spec.view == "sentence":
            return sentence(samples)
        f = computed or hidden_states(config, model, tokenizer, samples, positions=positions,
                                      feature_cache=feature_cache, progress=progress)
        parts = ([sentence(samples)] if spec.view == "both" else []) + [f.matrix(f.layers[0], p) for p in positions]
        if f.cache_path is not None and len(samples) * sum(p.shape[1] for p in parts) * 4 > VIEW_IN_MEMORY_BYTES:
            return HStack(parts)  # read from the store (and the sentence view's file) a chunk at a time
        return np.hstack([np.asarray(p, dtype=np.float32) for p in parts])

    return view, positions


def _feature_view(config: FilterConfig, dataset: Dataset, model, tokenizer, *, progress: bool):
    """(embed, info): `embed(ds)` gives the detector's view of a dataset (the pool's is computed here, once);
    `info` holds layer, positions, truncation count, model name and feature-cache path for the summary, and
    `reference`: None, or for a detector that trains on the guard's rows a function giving their (view, labels)."""
    feature_cache = Path(config.cache_dir or default_cache_dir()) / "features"
    spec = get_spec(config.detector)
    info = {"layer": None, "position": None, "positions": None, "n_truncated": 0, "model": ENCODER_VERSION,
            "cache_path": None, "reference": None}
    if spec.view == "sentence":  # no language model needed: the model being fine-tuned is not even loaded
        view, _ = detector_view(config, None, None, feature_cache=feature_cache, progress=progress)
        # a streamed dataset's view is encoded into the cache file and read from it a chunk at a time
        return (lambda ds: view(ds if isinstance(ds, StreamedDataset) else ds.samples)), info
    if model is None:
        model, tokenizer = load_model(config.model, cache_dir=config.cache_dir, device=config.device,
                                      dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    view, positions = detector_view(config, model, tokenizer, feature_cache=feature_cache, progress=progress)
    also = []
    if config.engine == "ray" and spec.reference:  # the guard's rows go to the workers with the pool's, in one pass
        from .reference import place_shipped_views, reference_samples

        also = reference_samples()
        place_shipped_views(model, tokenizer, also, layer=config.layer, positions=positions,
                            max_length=config.max_length, cache_dir=feature_cache)
    # A streamed dataset's samples are read from its file a block at a time (the Ray engine holds them all)
    pool = dataset.samples if config.engine == "ray" or not isinstance(dataset, StreamedDataset) else dataset
    feats = hidden_states(config, model, tokenizer, pool, positions=positions,
                          feature_cache=feature_cache, progress=progress, also=also, source=dataset)
    layer = feats.layers[0]
    info.update(layer=layer, position=config.position, positions=positions, n_truncated=feats.n_truncated,
                cache_path=feats.cache_path,
                model=feats.manifest["model"] + (f" + {ENCODER_VERSION}" if spec.view == "both" else ""))
    if spec.reference:
        info["reference"] = lambda: reference_view(view, model, tokenizer, layer=layer, positions=positions,
                                                   max_length=config.max_length, cache_dir=feature_cache)
    return (lambda ds: view(pool if ds is dataset else ds.samples, feats if ds is dataset else None)), info


def _samples(dataset):
    """Every sample, in order; a streamed dataset's read from its file (or its cache, once read whole)."""
    return dataset.iter_samples() if isinstance(dataset, StreamedDataset) else dataset.samples


def _sample_rows(dataset):
    """(sample, parsed row) of every sample, in order; a streamed dataset's read from its file."""
    if isinstance(dataset, StreamedDataset):
        return ((s, row) for s, row, _ in dataset.records())
    return zip(dataset.samples, dataset.rows)


def _ids_at(dataset, positions) -> list[str]:
    """The ids of the samples at `positions`, in that order (a streamed dataset is read once for them)."""
    if not isinstance(dataset, StreamedDataset) or dataset._samples is not None:
        return [dataset.samples[i].id for i in positions]
    wanted = {int(i): None for i in positions}
    for k, s in enumerate(dataset.iter_samples()):
        if k in wanted:
            wanted[k] = s.id
    return [wanted[int(i)] for i in positions]


class _ScoreRows:
    """scores.jsonl's row for each sample from its position and the sample: ranks are computed once."""

    def __init__(self, scores: np.ndarray, selection: Selection):
        self.scores, self.selection = scores, selection
        self.ranks = np.empty(len(scores), dtype=np.int64)
        self.ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)

    def __call__(self, i: int, s) -> dict:
        removed, score = bool(self.selection.removed[i]), float(self.scores[i])
        row = {"id": s.id, "harm_score": score, "rank": int(self.ranks[i]), "removed": removed,
               "reason": self.selection.reason(score) if removed else ""}
        if s.label is not None:
            row["label"] = s.label
        return row


def score_rows(dataset, scores: np.ndarray, selection: Selection) -> list[dict]:
    """One tidy row per sample, as in scores.jsonl: id, harm_score, rank (1 = most suspicious), removed, reason,
    and label when known."""
    row = _ScoreRows(scores, selection)
    samples = dataset.samples if isinstance(dataset, Dataset) else dataset.iter_samples()
    return [row(i, s) for i, s in enumerate(samples)]


def _write_outputs(dataset, scores: np.ndarray, selection: Selection, summary: dict, out: Path,
                   extra: dict) -> None:
    """scores.jsonl, kept and removed in one pass over the input (each written atomically), then invalid.jsonl
    and summary.json."""
    targets = [out / "scores.jsonl", out / "summary.json", out / "invalid.jsonl"] + [
        out / output_name(dataset, s) for s in ("kept", "removed")]
    if any(t.resolve() == dataset.path.resolve() for t in targets):
        raise ValueError(f"{dataset.path}: writing to {out} would overwrite the input; choose another -o folder")
    kept_path, removed_path = out / output_name(dataset, "kept"), out / output_name(dataset, "removed")
    score_row = _ScoreRows(scores, selection)
    with atomic_open(out / "scores.jsonl") as f:
        write_parts(dataset, np.asarray(selection.removed, dtype=np.int8), [kept_path, removed_path],
                    on_sample=lambda i, s: f.write(json_text(score_row(i, s)) + "\n"))
    summary["outputs"] = {
        "scores": str(out / "scores.jsonl"),
        "kept": str(kept_path),
        "removed": str(removed_path),
        "invalid": str(write_invalid(dataset, out / "invalid.jsonl")),
        "summary": str(out / "summary.json"),
        **extra,
    }
    write_json(summary, out / "summary.json")
