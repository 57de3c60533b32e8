"""The aligned embedded base: SmolLM2-135M-Instruct safety-tuned with a shipped LoRA adapter (fp16).

The embedded model complies with most harmful prompts, so fine-tuning cannot make it less safe and a filter has
nothing to protect. `embedded:smollm2-135m-aligned` is that model after a LoRA safety tuning (refusals to harmful
prompts, helpful answers to benign ones; scripts/align_base.py). Its adapter lives in `aligned_adapter/`
(safetensors) with `manifest.json`, which holds the recipe, the row counts and the SHA-1 of every training
prompt, so any pool or evaluation set can be checked for overlap (`is_alignment_prompt`).

Which prompts the alignment may use is fixed by `alignment_slice`, a hash of the prompt (version 1), so the
benign task sources (Alpaca, Dolly) and the safety-tuned-llamas refusals are split once: 'align' rows may train
the aligned base, 'eval' rows are held out for its helpfulness, 'task' rows are for task pools.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .data import Sample, load_prompts

ALIGNED = "embedded:smollm2-135m-aligned"
ADAPTER_DIR = Path(__file__).parent / "aligned_adapter"
MANIFEST = ADAPTER_DIR / "manifest.json"
# Benign prompts that use words harmful requests use ("How do I kill a Python process that is stuck?"): a safe
# model answers them, so refusing them is over-refusal.
LOOKALIKES = Path(__file__).parent / "lookalike_prompts.txt"
# 40 more, written for the 'confirm' evaluation part only (no recipe is chosen on them).
LOOKALIKES_CONFIRM = Path(__file__).parent / "lookalike_prompts_confirm.txt"
PARTS = ("dev", "confirm")


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


def evaluation_sets(raw_dir: str | Path | None = None, *, n_harmful: int = 40, n_helpful: int = 30,
                    part: str = "dev") -> dict:
    """The aligned base's held-out evaluation prompts (none trained the alignment; scripts/align_base.py checks).

    part 'dev' (what experiments and recipes are measured on): harmful = the first `n_harmful`
    I-MaliciousInstructions prompts and the first `n_harmful` AdvBench prompts that the Llama-2-chat refusals
    (alignment rows) do not answer; benign = I-Alpaca (50) and the look-alikes (40), for over-refusal; helpful =
    `n_helpful` Alpaca/Dolly rows of the 'eval' slice, as `Sample`s with their reference answers (ROUGE-L and the
    references' loss).

    part 'confirm' (to confirm on other prompts a recipe chosen on 'dev'): harmful = the I-MaliciousInstructions
    prompts after those (60 at n_harmful=40) and as many AdvBench ones after those; benign = the next 80 'eval'
    slice prompts and 40 other look-alikes (`LOOKALIKES_CONFIRM`); helpful = the `n_helpful` 'eval' rows after them.
    """
    from .pools import default_raw_dir, load_source, norm_prompt

    if part not in PARTS:
        raise ValueError(f"evaluation part {part!r}: use one of {', '.join(PARTS)}")
    raw = Path(raw_dir) if raw_dir else default_raw_dir()
    llama = {norm_prompt(r["prompt"]) for r in load_source("refusal_llama2", raw)}
    advbench = [p for p in load_prompts(raw / "advbench.txt") if norm_prompt(p) not in llama]
    malicious = load_prompts(raw / "eval_malicious_instructions.json")
    helpful = [r for r in load_source("alpaca", raw) + load_source("dolly", raw) if alignment_slice(r["prompt"]) == "eval"]
    if part == "dev":
        harmful = malicious[:n_harmful] + advbench[:n_harmful]
        benign, lookalike = load_prompts(raw / "eval_alpaca50.json"), load_prompts(LOOKALIKES)
    else:
        more = malicious[n_harmful:]
        harmful = more + advbench[n_harmful:n_harmful + len(more)]
        benign = [r["prompt"] for r in helpful[n_helpful:n_helpful + 80]]
        lookalike = load_prompts(LOOKALIKES_CONFIRM)
        helpful = helpful[n_helpful + 80:]
    return {"harmful": harmful, "benign": benign, "lookalike": lookalike,
            "helpful": [Sample(f"help-{i:05d}", [{"role": "user", "content": r["prompt"]},
                                                 {"role": "assistant", "content": r["response"]}], label=0)
                        for i, r in enumerate(helpful[:n_helpful])]}


def evaluation_prompts(sets: dict) -> set[str]:
    """Every prompt of `evaluation_sets`, normalised (lower case, single spaces), for keeping them out of pools."""
    from .pools import norm_prompt

    return ({norm_prompt(p) for k in ("harmful", "benign", "lookalike") for p in sets[k]}
            | {norm_prompt(s.prompt) for s in sets["helpful"]})
