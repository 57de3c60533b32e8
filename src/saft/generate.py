"""Batched greedy generation of answers to prompts, under the model's chat template."""

from __future__ import annotations

import logging
from typing import Sequence

from .render import pad_batch, prompt_text

logger = logging.getLogger(__name__)


def generate(model, tokenizer, prompts: Sequence[str | list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 16, progress: bool = True, prefixes: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to `prompts` (plain user texts or message lists), in input order.

    `prefixes`: one text per prompt that opens the answer; the model continues it, and the answer returned
    starts with it (how a model goes on once it has begun, say, a refusal).
    Prompts are sorted by length and left-padded in batches, so each batch wastes little compute.
    """
    import torch
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    prefixes = [""] * len(prompts) if prefixes is None else list(prefixes)
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts: give one per prompt")
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    encoded = [tokenizer(prompt_text(c, tokenizer) + x, add_special_tokens=not has_template)["input_ids"]
               for c, x in zip(convs, prefixes)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), disable=not progress, desc="generate", unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, attn = pad_batch([encoded[i] for i in idx], pad, side="left")
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            outputs[i] = (prefixes[i] + text).strip()
        bar.update(len(idx))
    bar.close()
    return outputs
