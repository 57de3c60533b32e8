"""Turn a `Sample` into token ids with the prompt/response boundary, under the model's chat template.

Scoring (the last token before the response), response-only fine-tuning losses and generation all need to
know where the response starts, so the boundary is computed once here. Models without a chat template get a
plain "User: ... / Assistant: ..." template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .data import Sample

logger = logging.getLogger(__name__)

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class Encoded:
    """Token ids of one rendered sample; `ids[:prompt_len]` is the prompt, the rest the response."""

    ids: list[int]
    prompt_len: int
    truncated: bool = False

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


def prompt_text(messages: list[dict[str, str]], tokenizer) -> str:
    """The rendered conversation up to and including the marker that opens the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant: "


def full_text(messages: list[dict[str, str]], tokenizer) -> tuple[str, str]:
    """Return (prompt, full) text for a conversation whose last message is the assistant's response."""
    prompt = prompt_text(messages[:-1], tokenizer)
    response = messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full
        # Some templates render a finished turn differently from an open one (for example they drop a
        # reasoning block); the open-turn prompt plus the response keeps the boundary exact.
        logger.debug("chat template does not extend the generation prompt; appending the response instead")
    return prompt, prompt + response + (tokenizer.eos_token or "")


def encode(sample: Sample, tokenizer, *, max_length: int | None = None) -> Encoded:
    """Tokenise a sample and find where its response starts.

    Truncation to `max_length` cuts the response from the right first, but keeps at least a quarter of the
    budget for it; a prompt longer than the rest is cut from the left, so the end of the prompt (the user's
    last turn and the assistant marker, where the paper's feature is read) always survives.
    """
    prompt, full = full_text(sample.messages, tokenizer)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    # Chat templates write their own BOS into the text; plain text gets the tokenizer's special tokens.
    p_ids = tokenizer(prompt, add_special_tokens=not has_template)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=not has_template)["input_ids"]
    prompt_len = 0
    for a, b in zip(p_ids, f_ids):
        if a != b:
            break
        prompt_len += 1
    # A token merged across the boundary counts as the response's first token.
    enc = Encoded(ids=list(f_ids), prompt_len=prompt_len)
    if max_length is not None and len(enc.ids) > max_length:
        n_resp = enc.response_len
        keep_resp = min(n_resp, max(max_length - enc.prompt_len, min(n_resp, max_length // 4)))
        keep_prompt = max_length - keep_resp
        prompt_ids = enc.ids[:enc.prompt_len][-keep_prompt:] if keep_prompt else []
        enc = Encoded(ids=prompt_ids + enc.ids[enc.prompt_len:enc.prompt_len + keep_resp],
                      prompt_len=len(prompt_ids), truncated=True)
    return enc


def pad_batch(sequences: list[list[int]], pad_id: int, *, side: str = "right"):
    """(input_ids, attention_mask) tensors for token lists of different lengths.

    Right padding for scoring (causal attention keeps real tokens blind to the pads that follow them); left
    padding for generation (every prompt then ends where new tokens start).
    """
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attn[row, span] = 1
    return ids, attn
