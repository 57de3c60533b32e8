"""saft-llm: find and remove harmful samples from an LLM fine-tuning dataset (SAFT), then fine-tune and evaluate."""

__version__ = "0.1.0"

from .api import FilterOutput, filter  # noqa: E402,A004
from .data import DataError, Dataset, FieldOptions, Sample, load_samples, write_subset  # noqa: E402
from .detectors import (  # noqa: E402
    DETECTORS, ContaminationEstimate, GuardScorer, ModelGuardScorer, ModelGuidedProbeScorer, SubspaceScorer,
    get_detector,
)
from .encoders import sentence_features  # noqa: E402
from .features import Features, extract_features  # noqa: E402
from .metrics import detection_metrics  # noqa: E402
from .models import EMBEDDED, load_model  # noqa: E402
from .pipeline import FilterConfig, FilterResult, filter_dataset  # noqa: E402
from .select import (  # noqa: E402
    RULES, Selection, draw_labeled, select, select_by_f1, select_calibrated, select_estimate, select_fraction,
    select_threshold,
)

__all__ = [
    "DETECTORS", "EMBEDDED", "RULES", "ContaminationEstimate", "DataError", "Dataset", "Features", "FieldOptions",
    "FilterConfig", "FilterOutput", "FilterResult", "GuardScorer", "ModelGuardScorer", "ModelGuidedProbeScorer",
    "Sample", "Selection", "SubspaceScorer", "detection_metrics", "draw_labeled", "extract_features", "filter",
    "filter_dataset", "get_detector", "load_model", "load_samples", "select", "select_by_f1", "select_calibrated",
    "select_estimate", "select_fraction", "select_threshold", "sentence_features", "write_subset",
]
