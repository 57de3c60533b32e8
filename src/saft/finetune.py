"""LoRA supervised fine-tuning on kept samples, with the loss on response tokens only.

Samples are rendered with the same chat template and truncation as scoring (`saft.render.encode`); prompt
tokens (including earlier turns of a multi-turn sample) get label -100 so only the final response is learned. A
sample whose `meta["response_opening"]` holds the start of its response learns only what follows that opening:
the opening is given, as `saft.generate.generate(prefixes=...)` gives it when answering.
Training runs through transformers' `Trainer` with a peft LoRA adapter: checkpoints, resumption, logging and the
progress bar come from there. Outputs in `output_dir`: `adapter/` (the LoRA adapter and tokenizer),
`finetune_config.json`, `log_history.json`, and `checkpoints/` while training.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .data import Sample, write_json
from .models import EMBEDDED, load_model
from .render import encode

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning settings; saved next to the adapter."""

    model: str = field(default=EMBEDDED, metadata={"help": "hub id or folder, or embedded:smollm2-135m-aligned"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "module names to adapt ('all-linear' for every linear layer)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: use epochs)"})
    batch_size: int = field(default=8, metadata={"help": "samples per device step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_length: int = field(default=128, metadata={"help": "tokens per sample (truncated like scoring)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every this many steps (for resuming)"})
    logging_steps: int = field(default=5, metadata={"help": "log the loss every this many steps"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache for the converted embedded model"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, ... (default: fp32 on CPU)"})

    def __post_init__(self):
        for name in ("rank", "alpha", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)


def training_features(samples: Sequence[Sample], tokenizer, *, max_length: int) -> list[dict]:
    """input_ids and labels per sample; labels are -100 except on the final response's tokens, less its given
    opening (`meta["response_opening"]`) when it has one."""
    rows = []
    for s in samples:
        e = encode(s, tokenizer, max_length=max_length)
        given = _opening_tokens(s, tokenizer)
        if e.response_len <= given:
            logger.warning("sample %s has no response tokens to learn after truncation; skipped", s.id)
            continue
        start = e.prompt_len + given
        rows.append({"input_ids": e.ids, "attention_mask": [1] * len(e.ids),
                     "labels": [IGNORE] * start + e.ids[start:]})
    return rows


def _opening_tokens(sample: Sample, tokenizer) -> int:
    """How many of the response's tokens are its given opening (`meta["response_opening"]`; 0 without one): the
    tokens the sample shares with the same conversation answered by the opening alone, past the prompt."""
    opening = (sample.meta or {}).get("response_opening")
    if not opening:
        return 0
    response = sample.messages[-1]["content"]
    if not response.startswith(opening):
        raise ValueError(f"sample {sample.id}: meta['response_opening'] must be the start of its response; "
                         f"the response begins {response[:40]!r}")
    full = encode(sample, tokenizer)
    cut = encode(dataclasses.replace(sample, messages=[*sample.messages[:-1], {"role": "assistant", "content": opening}]),
                 tokenizer)
    shared = next((i for i, (a, b) in enumerate(zip(cut.ids, full.ids)) if a != b), min(len(cut.ids), len(full.ids)))
    # The opening's turn ends in end-of-turn tokens the full answer does not have at that place: only the shared
    # tokens count, and a token merged across the opening's end is learned.
    return max(0, shared - full.prompt_len)


def _lora_config(config: FinetuneConfig):
    from peft import LoraConfig

    targets = "all-linear" if config.target_modules == ("all-linear",) else list(config.target_modules)
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def finetune(samples: Sequence[Sample], *, output_dir, config: FinetuneConfig | None = None, model=None,
             tokenizer=None, progress: bool = True) -> dict:
    """Train a LoRA adapter on `samples`; resumes from the last checkpoint in `output_dir` if there is one, and
    when `output_dir` already holds the finished adapter of this same config, loads it instead of training.

    Returns {"adapter": path, "train_loss": ..., "log_history": [...], "n_samples": ..., "steps": ..., "model": ...}.
    """
    import torch
    from datasets import Dataset as HFDataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    config = config or FinetuneConfig()
    if not samples:
        raise ValueError("no samples to fine-tune on")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    if model is None:
        model, tokenizer = load_model(config.model, cache_dir=config.cache_dir, device=config.device, dtype=config.dtype)
    rows = training_features(samples, tokenizer, max_length=config.max_length)
    finished = _finished_run(out, config)
    if finished is not None:
        # Resuming Trainer from the final checkpoint would take one step more than an uninterrupted run did.
        logger.info("%s holds this config's finished adapter: loaded, not trained again", out)
        return {"adapter": str(out / "adapter"), "n_samples": len(rows), **finished,
                "model": load_adapter(model, out / "adapter")}
    model = get_peft_model(model, _lora_config(config))
    model.train()
    device = next(model.parameters()).device
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps, logging_steps=config.logging_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=1, report_to=[],
        seed=config.seed, data_seed=config.seed, disable_tqdm=not progress, use_cpu=device.type == "cpu",
        lr_scheduler_type="cosine", warmup_steps=0, remove_unused_columns=False, dataloader_num_workers=0,
        bf16=model.dtype == torch.bfloat16,
    )
    trainer = Trainer(model=model, args=args, train_dataset=HFDataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE))
    if not progress:  # without a progress bar Trainer prints every log line; the log history keeps them anyway
        trainer.remove_callback(PrinterCallback)
    # Trainer writes trainer_state.json last: a checkpoint without it was cut short (a crash mid-save) and is
    # never resumed from; the previous complete one is (save_total_limit keeps it until the next one is done).
    checkpoints = sorted((p for p in (out / "checkpoints").glob("checkpoint-*") if _complete_checkpoint(p)),
                         key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        logger.info("resuming from %s", checkpoints[-1])
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    write_json(dataclasses.asdict(config), out / "finetune_config.json")
    write_json(trainer.state.log_history, out / "log_history.json")
    model.eval()
    return {"adapter": str(out / "adapter"), "train_loss": result.training_loss, "n_samples": len(rows),
            "steps": trainer.state.global_step, "log_history": trainer.state.log_history, "model": model}


def _finished_run(out: Path, config: FinetuneConfig) -> dict | None:
    """train_loss, steps and log_history of a finished run of `config` in `out` (the adapter, then the config, then
    the log history are written when training ends), or None."""
    import json

    try:
        same = json.loads((out / "finetune_config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(config)))
        history = json.loads((out / "log_history.json").read_text())
    except (OSError, ValueError):
        return None
    if not same or not (out / "adapter" / "adapter_config.json").exists():
        return None
    end = next((h for h in reversed(history) if "train_loss" in h), None)
    if end is None:
        return None
    return {"train_loss": end["train_loss"], "steps": end["step"], "log_history": history}


def _complete_checkpoint(path: Path) -> bool:
    """A checkpoint-N folder whose trainer_state.json (the last file Trainer writes) is there and readable."""
    import json

    if not path.name.split("-")[-1].isdigit():
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def load_adapter(model, adapter_dir):
    """Base model + a saved LoRA adapter, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
