"""saft-llm: find and remove harmful samples from an LLM fine-tuning dataset (SAFT), then fine-tune and evaluate."""

__version__ = "0.1.0"

from .data import DataError, Dataset, FieldOptions, Sample, load_samples, write_subset  # noqa: E402
from .detectors import DETECTORS, GuardKNNScorer, GuardScorer, GuardStudentScorer, GuidedProbeScorer, ModelGuardScorer, ModelGuidedProbeScorer, ProbeScorer, SubspaceScorer, get_detector  # noqa: E402
from .encoders import sentence_features  # noqa: E402
from .features import Features, extract_features  # noqa: E402
from .metrics import detection_metrics  # noqa: E402
from .models import EMBEDDED, load_model  # noqa: E402
from .pipeline import FilterConfig, FilterResult, filter_dataset  # noqa: E402
from .select import (  # noqa: E402
    Selection, draw_labeled, select_by_f1, select_calibrated, select_estimate, select_fraction, select_mixture,
    select_threshold,
)

__all__ = [
    "DETECTORS", "EMBEDDED", "DataError", "Dataset", "Features", "FieldOptions", "FilterConfig", "FilterResult",
    "GuardKNNScorer", "GuardScorer", "GuardStudentScorer", "GuidedProbeScorer", "ModelGuardScorer", "ModelGuidedProbeScorer", "ProbeScorer", "Sample", "Selection", "SubspaceScorer", "detection_metrics", "draw_labeled", "extract_features",
    "filter_dataset", "get_detector", "load_model", "load_samples", "select_by_f1", "select_calibrated", "select_estimate",
    "select_fraction", "select_mixture", "select_threshold", "sentence_features", "write_subset",
]
