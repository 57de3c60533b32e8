"""The aligned embedded base: SmolLM2-135M-Instruct safety-tuned with a shipped LoRA adapter (fp16).

The embedded model complies with most harmful prompts, so fine-tuning cannot make it less safe and a filter has
nothing to protect. `embedded:smollm2-135m-aligned` is that model after a LoRA safety tuning (refusals to harmful
prompts, helpful answers to benign ones; scripts/align_base.py). Its adapter lives in `aligned_adapter/`
(safetensors) with `manifest.json`, which holds the recipe, the measured refusal rates and the SHA-1 of every
training prompt, so any pool or evaluation set can be checked for overlap (`is_alignment_prompt`).

Which prompts the alignment may use is fixed by `alignment_slice`, a hash of the prompt (version 1), so the
benign task sources (Alpaca, Dolly) and the safety-tuned-llamas refusals are split once: 'align' rows may train
the aligned base, 'eval' rows are held out for its helpfulness, 'task' rows are for task pools.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

ALIGNED = "embedded:smollm2-135m-aligned"
ADAPTER_DIR = Path(__file__).parent / "aligned_adapter"
MANIFEST = ADAPTER_DIR / "manifest.json"


def prompt_sha1(prompt: str) -> str:
    return hashlib.sha1(prompt.strip().encode("utf-8")).hexdigest()


def alignment_slice(prompt: str) -> str:
    """'align' (3 in 10), 'eval' (1 in 10) or 'task' (6 in 10), by a third byte of the prompt's SHA-1, independent
    of `saft.pools.prompt_split` (first byte) and `judge_reserved` (second byte)."""
    b = hashlib.sha1(prompt.encode("utf-8")).digest()[2] % 10
    return "align" if b < 3 else "eval" if b == 3 else "task"


@functools.lru_cache(maxsize=4)
def _manifest_hashes(path: str) -> frozenset[str]:
    p = Path(path)
    if not p.exists():
        return frozenset()
    return frozenset(json.loads(p.read_text())["train_prompt_sha1"])


def is_alignment_prompt(prompt: str, manifest: str | Path = MANIFEST) -> bool:
    """Whether the shipped aligned base was trained on this prompt (exact text, stripped)."""
    return prompt_sha1(prompt) in _manifest_hashes(str(manifest))
