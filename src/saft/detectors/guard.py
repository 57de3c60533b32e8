"""A packaged, label-free harm classifier on the sentence-encoder view (not in the paper).

The paper's score has no notion of what "harmful" means: it ranks samples by how far they sit along the pool's
main directions, which on real pools are style and topic (measured AUROC 0.49-0.59 with the embedded model).
The guard brings that notion from outside the user's data: a classifier on all-MiniLM-L6-v2 embeddings of
(response, exchange) (`saft.encoders`), trained by scripts/train_guard.py on public pairs: BeaverTails
safe/unsafe pairs from the judge half of the prompt split, plus refusals by a safety-tuned model to harmful
prompts (labelled safe, so that refusals, which a model needs to stay safe, are kept).
Two classifiers ship, trained on the same rows: a logistic regression (`guard_minilm_v1.json`) and an RBF-kernel
support vector machine (its support vectors in `guard_minilm_rbf_v1.npz`, named by the JSON), each with five
cross-validation fold models for the estimate. The kernel one is the default (`kernel="rbf"`): on the benchmark
pools it ranks above the linear one on every pool and draw of BeaverTails, where harmful and safe answers
differ in ways no single direction captures, and its estimate is closer to the truth on T and B
(benchmarks/RESULTS.md, pool-seeds and estimate). `kernel="linear"` gives the logistic regression and its folds.
`contamination_estimate` is an adjusted classify-and-count (Forman, 2008) of the harmful share of a pool:
(share above a threshold - fpr) / (tpr - fpr), clipped to [0, 1], averaged over the five cross-validation fold
models shipped beside the final one, because their true- and false-positive rates were measured on
rows they never saw, as a user's pool is. The threshold is not the classifier's 0 but a high one (the
`estimate_level` quantile of held-out harmful scores): an adjusted count is biased by how much more often the
pool's safe rows cross the threshold than the training safe rows did, and few safe rows of any kind reach a
high threshold. scripts/train_guard.py chooses the level on simulated shifted pools from the training rows
alone. Safe rows that read like harmful ones (BeaverTails' safe answers) still inflate the estimate (see
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_array, check_is_fitted

from ..chunks import is_out_of_core, map_chunks, n_rows
from ..regions import RegionModel, region_estimate
from .base import ContaminationEstimate

GUARD_FILE = Path(__file__).resolve().parent.parent / "guard_minilm_v1.json"
# The packaged guards by version: v1 learned from BeaverTails and Llama-2 refusals; v2 from six source families,
# with the calibration of its estimate's interval (`saft.trust`; docs/detectors/guard.md).
# v3 is v2's models with the region-wise estimate (`saft.regions`), built on top of v2 by scripts/train_guard.py.
GUARDS = {"v1": GUARD_FILE, "v2": GUARD_FILE.with_name("guard_minilm_v2.json"),
          "v3": GUARD_FILE.with_name("guard_minilm_v3.json")}


def guard_weights(name: str) -> str:
    """The weights file of a packaged guard version ("v1", "v2", "v3") or a path to one."""
    if name in GUARDS:
        return str(GUARDS[name])
    if not Path(name).is_file():
        raise ValueError(f"guard {name!r} is neither a packaged version ({', '.join(GUARDS)}) nor a weights file")
    return name
KERNELS = ("rbf", "linear")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"the guard's kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def decision(model: dict, X) -> np.ndarray:
    """A shipped model's decision function on X: linear (coef, intercept), or a fitted RBF SVC's kernel expansion
    over its support vectors. X may be a chunked source (`saft.chunks`)."""
    if "coef" in model:
        return map_chunks(lambda c: c @ model["coef"] + model["intercept"], X, 4096)
    from sklearn.metrics.pairwise import rbf_kernel

    # In blocks of rows: the kernel matrix of a whole large pool (rows x ~1000 support vectors) would not fit.
    sv, gamma = model["support_vectors"], model["gamma"]
    return map_chunks(lambda c: rbf_kernel(c, sv, gamma=gamma) @ model["dual_coef"], X, 4096) + model["intercept"]


def check_rows(X):
    """X validated without copying: a chunked source as it is, an array as float32 or float64 (a pool's float32
    view is converted a block at a time, not all at once)."""
    return X if is_out_of_core(X) else check_array(X, dtype=[np.float64, np.float32])


class GuardScorer(BaseEstimator):
    """Score = the packaged guard's decision value for harmful, on the sentence-encoder view (768 columns).

    Parameters
    ----------
    weights : str or None, default=None
        JSON file with `coef`, `intercept`, `meta`, `estimate_folds` (a list of {coef, intercept, threshold,
        tpr, fpr}) and `kernel_model` (the .npz file of the RBF model, relative to the JSON's folder) as written
        by scripts/train_guard.py. Without `estimate_folds`, the estimate uses the final linear model at 0 with
        `meta`'s `cv_tpr` and `cv_fpr`. None = the packaged `guard_minilm_v1.json`.
    kernel : {"rbf", "linear"}, default="rbf"
        Which classifier scores: the RBF support vector machine (decision value) or the logistic regression
        (log-odds), each with its own fold models for the estimate. Both are above 0 where they call a sample
        harmful.

    `fit(X, y=None)` only loads the weights and checks X's width: the guard needs no labels from the pool, and
    ignores them when given.
    """

    def __init__(self, weights: str | None = None, kernel: str = "rbf"):
        self.weights = weights
        self.kernel = kernel

    def load_weights(self) -> "GuardScorer":
        """Read the weights file; `fit` calls this, and so does every detector that uses the guard's estimate."""
        check_kernel(self.kernel)
        path = Path(self.weights) if self.weights else GUARD_FILE
        data = json.loads(path.read_text())
        self.coef_ = np.asarray(data["coef"], dtype=np.float64)
        self.intercept_ = float(data["intercept"])
        self.meta_ = data.get("meta", {})
        m = self.meta_
        folds = data.get("estimate_folds") or [{"coef": data["coef"], "intercept": data["intercept"], "threshold": 0.0,
                                                 "tpr": m.get("cv_tpr", 1.0), "fpr": m.get("cv_fpr", 0.0)}]
        # Each model is a dict: "coef" and "intercept" (linear) or "support_vectors", "dual_coef", "intercept" and
        # "gamma" (RBF); the estimate's fold models also hold their "threshold", "tpr" and "fpr".
        self.model_ = {"coef": self.coef_, "intercept": self.intercept_}
        self.estimate_models_ = [{"coef": np.asarray(f["coef"], dtype=np.float64), "intercept": float(f["intercept"]),
                                  "threshold": float(f["threshold"]), "tpr": float(f["tpr"]), "fpr": float(f["fpr"])}
                                 for f in folds]
        bad = [i for i, f in enumerate(self.estimate_models_) if f["coef"].shape != self.coef_.shape]
        if bad:
            raise ValueError(f"{path}: estimate_folds {bad} have {len(self.estimate_models_[bad[0]]['coef'])} "
                             f"coefficients but coef has {len(self.coef_)}; rebuild the file with scripts/train_guard.py")
        if self.kernel == "rbf":
            self.model_, rbf_folds = self._load_kernel_models(path, data)
            self.estimate_models_ = rbf_folds or self.estimate_models_
        # The region-wise estimate (guard v3): one region model, each kernel's fold models' rates per region.
        self.regions_, self.region_rates_, self.region_fallback_ = None, None, None
        block = (m.get("kernel_model") or {}) if self.kernel == "rbf" else m
        if "regions" in block:
            self.regions_ = RegionModel.from_json(m["region_model"])
            self.region_rates_ = block["regions"]["fold_rates"]
            self.region_fallback_ = [tuple(fb) for fb in block["regions"]["fold_fallback"]]
            if len(self.region_rates_) != len(self.estimate_models_):
                raise ValueError(f"{path}: {len(self.region_rates_)} fold models' region rates for "
                                 f"{len(self.estimate_models_)} fold models; rebuild it with scripts/train_guard.py")
        return self

    def _load_kernel_models(self, path: Path, data: dict) -> tuple[dict, list[dict]]:
        """The RBF model and, when the file has them, its fold models for the estimate."""
        if "kernel_model" not in data:
            raise ValueError(f"{path} holds no RBF model (no 'kernel_model' entry): use kernel='linear' "
                             "or rebuild the file with scripts/train_guard.py")
        npz = path.parent / data["kernel_model"]
        if not npz.exists():
            raise ValueError(f"{path} names the RBF model {npz}, which does not exist; rebuild both with "
                             "scripts/train_guard.py")

        def rbf(z, prefix):
            return {"support_vectors": z[prefix + "support_vectors"].astype(np.float64),
                    "dual_coef": z[prefix + "dual_coef"].astype(np.float64), "intercept": float(z[prefix + "intercept"]),
                    "gamma": float(z[prefix + "gamma"])}

        with np.load(npz) as z:
            model = rbf(z, "")
            n_folds = int(z["n_folds"]) if "n_folds" in z else 0
            folds = [{**rbf(z, f"fold{i}_"), **{k: float(z[f"fold{i}_{k}"]) for k in ("threshold", "tpr", "fpr")}}
                     for i in range(n_folds)]
        if any(f["support_vectors"].shape[1] != len(self.coef_) for f in [model, *folds]):
            raise ValueError(f"{npz}: support vectors have {model['support_vectors'].shape[1]} columns but {path}'s "
                             f"coef has {len(self.coef_)}; rebuild both with scripts/train_guard.py")
        return model, folds

    def fit(self, X, y=None):
        X = check_rows(X)
        self.load_weights()
        if X.shape[1] != len(self.coef_):
            raise ValueError(f"the guard reads the sentence-encoder view ({len(self.coef_)} columns) but got "
                             f"{X.shape[1]} columns; compute X with saft.encoders.sentence_features")
        self.n_features_in_ = X.shape[1]
        return self

    def score_samples(self, X) -> np.ndarray:
        """Decision value for harmful (log-odds for the linear kernel): higher = more suspicious; > 0 means the
        guard flags the sample."""
        check_is_fitted(self, "coef_")
        return decision(self.model_, check_rows(X))

    def fold_decisions(self, X) -> list[np.ndarray]:
        """Decision values of each of the estimate's fold models (compare with their "threshold")."""
        check_is_fitted(self, "coef_")
        X = check_rows(X)
        return [decision(f, X) for f in self.estimate_models_]

    def contamination_estimate(self, X, *, refusal=None) -> ContaminationEstimate:
        """Label-free estimate of the harmful share of X: the fold models' adjusted counts, averaged, with the
        binomial standard error of the count (the pool's sampling noise only, not the bias a shift in the
        pool's safe rows brings). The threshold is high, so few rows are counted and the error is large on
        small pools. With a region model (guard v3) each fold model's count is region-wise (`saft.regions`);
        `refusal` is then the rows' refusal mask (`saft.regions.refusal_mask` of their responses), without
        which refusals are regioned by their view alone."""
        value, se, flagged = self._estimate(X, refusal)
        return ContaminationEstimate(value, se, flagged=flagged)

    def _estimate(self, X, refusal=None) -> tuple[float, float, float]:
        X = check_rows(X)
        regions = None if self.regions_ is None else self.regions_.assign(X, refusal)
        estimates, errors, shares = [], [], []
        for i, (f, z) in enumerate(zip(self.estimate_models_, self.fold_decisions(X))):
            tpr, fpr = f["tpr"], f["fpr"]
            flagged = float((z > f["threshold"]).mean())
            shares.append(flagged)
            se = float(np.sqrt(flagged * (1 - flagged) / n_rows(X)))
            if regions is not None:
                value, region_se = region_estimate(z > f["threshold"], regions, self.region_rates_[i],
                                                   fallback=self.region_fallback_[i], with_se=True)
                estimates.append(value)
                errors.append(region_se)
            elif tpr - fpr <= 0:  # a model that cannot separate: fall back to the raw flagged share
                estimates.append(flagged)
                errors.append(se)
            else:
                estimates.append(float(np.clip((flagged - fpr) / (tpr - fpr), 0.0, 1.0)))
                errors.append(se / (tpr - fpr))
        # The fold models count nearly the same rows, so their errors do not average out: report their mean.
        # Guard v2's folds each miss one source family, and one of them can flag a whole pool far from its rows
        # (an RBF model's intercept): its meta asks for the median of the fold estimates instead of the mean.
        combine = np.median if self.meta_.get("estimate_combine") == "median" else np.mean
        return float(combine(estimates)), float(np.mean(errors)), float(combine(shares))

