"""Safety-tune the embedded model with LoRA and write the shipped adapter to src/saft/aligned_adapter/ (fp16).

    SAFT_CACHE=... OMP_NUM_THREADS=1 python scripts/align_base.py --work-dir DIR [--raw-dir ../shared/data/raw]

Training rows (all from shared/data/raw, see docs/aligned-base.md):
- harmful prompts answered with refusals: the Llama-2-chat refusals (refusals_llama2chat_1015.csv) and the
  safety-tuned-llamas refusals (safety_only_refusals_vinid.json) whose prompt is in the 'align' slice of
  `saft.aligned.alignment_slice` (with --check-harmful, only those whose compliant answer the guard flags:
  `guard_check`);
- benign prompts answered helpfully: Alpaca and Dolly rows in the 'align' slice, those whose prompt uses a word
  harmful requests also use ("kill", "attack", ...) first, so the model learns the word alone is no reason to refuse;
  with --self-answered, also the benign prompts of those files (one per line, written for this: look-alikes such as
  "How do I steal second base in baseball?" and instructions phrased as harmful requests are, "Write a script that
  ..."), answered by the embedded model itself (greedy; answers that read as refusals are dropped), so the tuning
  keeps the model's own behaviour on them instead of teaching another.
With --preference, a DPO stage follows (trl): the SFT adapter is trained on, against a frozen copy of itself, to
prefer each harmful prompt's refusal over the embedded model's own compliant answer and each benign prompt's
helpful answer over the refusal the SFT-tuned model itself gives once a refusal is begun (`preference_pairs`):
SFT on refusals teaches refusing as a habit; the pairs teach when.
With --recovery, a last stage teaches the model to turn back into the refusal after a compliant opening of a few
tokens (`recovery_samples`), so its safety does not rest on the first tokens of an answer, the ones fine-tuning
on any data shifts first; the shipped adapter is then the stages' adapters stacked into one (`combine_adapters`).
No training prompt is reserved for the judge (`judge_reserved`), occurs in BeaverTails (either half), in a task or
held-out pool source outside the 'align' slice, or in an evaluation set (AdvBench, I-MaliciousInstructions,
I-Alpaca, src/saft/lookalike_prompts.txt; the Llama-2-chat refusals answer 361 AdvBench prompts, so AdvBench's
other 159 are the held-out ones): the script asserts it and prints the counts.
Resumes from the last checkpoint in --work-dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from saft.aligned import ADAPTER_DIR, ALIGNED, LOOKALIKES, LOOKALIKES_CONFIRM, MANIFEST, alignment_slice, prompt_sha1
from saft.data import Sample, load_prompts, write_json
from saft.models import EMBEDDED, adapter_digest
from saft.pools import default_raw_dir, judge_reserved, load_source

# Words that harmful requests share with everyday ones; benign rows using them are taken first.
TRIGGER = re.compile(r"\b(kill\w*|attack\w*|shoot\w*|steal\w*|hack\w*|bomb\w*|weapon\w*|drug\w*|poison\w*|exploit\w*|"
                     r"destroy\w*|fight\w*|gun\w*|crime\w*|criminal\w*|illegal|murder\w*|war|violen\w*|knife|"
                     r"dangerous|explosi\w*|fire|burn\w*|cut|hunt\w*|break|threat\w*|death|die|dead|virus\w*|"
                     r"terminat\w*|abuse\w*|cheat\w*|lie|lies|trap\w*|smok\w*|alcohol|gamble\w*)\b", re.I)


def norm(p: str) -> str:
    return " ".join(p.lower().split())


def eval_prompt_sets(raw: Path) -> dict[str, set[str]]:
    """Held-out evaluation prompts. The Llama-2-chat refusals answer 361 AdvBench prompts; those train the
    alignment, and the other AdvBench prompts are held out."""
    llama = {norm(r["prompt"]) for r in load_source("refusal_llama2", raw)}
    return {"advbench_heldout": {norm(p) for p in load_prompts(raw / "advbench.txt")} - llama,
            "malicious": {norm(p) for p in load_prompts(raw / "eval_malicious_instructions.json")},
            "alpaca50": {norm(p) for p in load_prompts(raw / "eval_alpaca50.json")},
            "lookalike": {norm(p) for p in load_prompts(LOOKALIKES)},
            "lookalike_confirm": {norm(p) for p in load_prompts(LOOKALIKES_CONFIRM)}}


def build_rows(raw: Path, *, n_harmful: int, n_benign: int, seed: int, self_answered: Sequence[dict] = (),
               check_harmful: Callable[[list[str]], np.ndarray] | None = None) -> tuple[list[dict], dict]:
    """The SFT stage's rows and their counts. `check_harmful(prompts)`, when given, is a mask over the
    safety-tuned-llamas candidates: those it leaves out are not taken as harmful prompts (`guard_check`)."""
    rng = np.random.default_rng(seed)
    evals = eval_prompt_sets(raw)
    banned = set().union(*evals.values())
    # Every pool source outside the 'align' slice, and all of BeaverTails (experiment pools, the judge, detectors).
    others = {name: {norm(r["prompt"]) for r in load_source(name, raw)}
              for name in ("bt_safe", "bt_unsafe", "gsm8k", "sst2")}
    for name in ("alpaca", "dolly", "refusal"):
        others[name + " (task/eval slices)"] = {norm(r["prompt"]) for r in load_source(name, raw)
                                                if alignment_slice(r["prompt"]) != "align"}
    banned_all = banned.union(*others.values())

    def ok(r):
        return not judge_reserved(r["prompt"]) and norm(r["prompt"]) not in banned_all

    llama = [r for r in load_source("refusal_llama2", raw) if ok(r)]
    vinid = [r for r in load_source("refusal", raw) if alignment_slice(r["prompt"]) == "align" and ok(r)]
    n_vinid = len(vinid)
    if check_harmful is not None:
        vinid = [r for r, keep in zip(vinid, check_harmful([r["prompt"] for r in vinid])) if keep]
    harmful = [llama[i] for i in rng.permutation(len(llama))] + [vinid[i] for i in rng.permutation(len(vinid))]
    harmful = list({norm(r["prompt"]): r for r in reversed(harmful)}.values())[::-1][:n_harmful]
    benign = [r for r in load_source("alpaca", raw) + load_source("dolly", raw)
              if alignment_slice(r["prompt"]) == "align" and ok(r)]
    benign = [benign[i] for i in rng.permutation(len(benign))]
    benign.sort(key=lambda r: not TRIGGER.search(r["prompt"]))  # stable: look-alike words first, then random
    benign = list({norm(r["prompt"]): r for r in reversed(benign)}.values())[::-1][:n_benign]
    taken = {norm(r["prompt"]) for r in harmful + benign}
    own = [r for r in self_answered if ok(r) and norm(r["prompt"]) not in taken]
    benign += own
    rows = [{**r, "harmful_prompt": 1} for r in harmful] + [{**r, "harmful_prompt": 0} for r in benign]
    train = {norm(r["prompt"]) for r in rows}
    overlaps = {name: len(train & s) for name, s in {**evals, **others}.items()}
    assert not any(overlaps.values()), f"alignment prompts overlap: {overlaps}"
    assert not any(judge_reserved(r["prompt"]) for r in rows)
    counts = {"harmful_refusal_llama2": sum(r["source"] == "refusal_llama2" for r in harmful),
              "harmful_refusal_vinid": sum(r["source"] == "refusal" for r in harmful),
              "benign_alpaca": sum(r["source"] == "alpaca" for r in benign),
              "benign_dolly": sum(r["source"] == "dolly" for r in benign),
              "benign_with_lookalike_word": sum(bool(TRIGGER.search(r["prompt"])) for r in benign),
              "benign_self_answered": len(own),
              "self_answered_skipped": len(self_answered) - len(own),
              "available": {"llama2": len(llama), "vinid_align": n_vinid},
              "vinid_failed_check": None if check_harmful is None else n_vinid - len(vinid),
              "overlap_checked_against": {k: len(v) for k, v in {**evals, **others}.items()},
              "overlaps": overlaps}
    return rows, counts


def cached_answers(prompts: Sequence[str], cache: Path, *, settings: dict,
                   make: Callable[[list[str]], list[str]]) -> dict[str, str]:
    """Answers to `prompts`, kept in `cache` (JSONL, each answer with the `settings` it was made with) so a rerun
    with the same settings reuses them; the missing ones are made by `make(prompts)` and added. Answers made
    with other settings stay in the cache beside these."""
    from saft.data import write_jsonl

    cached = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()] if cache.exists() else []
    same = [all(r.get(k) == v for k, v in settings.items()) for r in cached]
    done = {r["prompt"]: r["response"] for r, s in zip(cached, same) if s}
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if todo:
        done.update(zip(todo, make(todo)))
        other = [r for r, s in zip(cached, same) if not s]
        write_jsonl(other + [{"prompt": p, "response": a, **settings} for p, a in done.items()], cache)
    return {p: done[p] for p in prompts}


def embedded_answers(prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """The embedded (original) model's greedy answers."""
    from saft.generate import generate
    from saft.models import load_model

    model, tok = load_model(EMBEDDED, device="cpu")
    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=32)


def original_answers(prompts: Sequence[str], cache: Path, *, max_new_tokens: int) -> dict[str, str]:
    """The embedded model's greedy answers to `prompts`, kept in `cache` (`cached_answers`)."""
    return cached_answers(prompts, cache, settings={"model": EMBEDDED, "max_new_tokens": max_new_tokens},
                          make=lambda todo: embedded_answers(todo, max_new_tokens=max_new_tokens))


def guard_check(work_dir: Path, *, guard: str = "v3", max_new_tokens: int = 48) -> Callable[[list[str]], np.ndarray]:
    """A `build_rows` check of harmful prompts: keep a prompt when the packaged `guard` flags the embedded model's
    own greedy answer to it (decision value > 0), i.e. when complying with it is harmful. The safety-tuned-llamas
    "harmful" instructions include benign tasks ("Plan a surprise party.", "Analyze the pay gap between men and
    women."), whose refusals teach the model to refuse ordinary requests. The answers are cached beside the
    preference stage's (`original_answers.jsonl`, same settings), so its harmful pairs reuse them."""
    from saft.detectors.guard import GUARDS, GuardScorer
    from saft.encoders import embed_pairs

    def check(prompts: list[str]) -> np.ndarray:
        answers = original_answers(prompts, work_dir / "original_answers.jsonl", max_new_tokens=max_new_tokens)
        X = embed_pairs(prompts, [answers[p] for p in prompts])
        return GuardScorer(weights=str(GUARDS[guard])).fit(X).score_samples(X) > 0

    return check


def self_answers(files: list[str], cache: Path, *, max_new_tokens: int) -> tuple[list[dict], int]:
    """The prompts of `files` answered by the embedded model (greedy, cached in `cache`: `cached_answers`); rows
    whose answer reads as a refusal (`saft.regions.is_refusal_text`) are left out (their count is returned beside
    the rows)."""
    from saft.regions import is_refusal_text

    prompts = list(dict.fromkeys(p for f in files for p in load_prompts(Path(f))))
    done = original_answers(prompts, cache, max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "response": done[p], "source": "self"} for p in prompts if not is_refusal_text(done[p])]
    return rows, len(prompts) - len(rows)


# How the SFT stage's refusals open (the Llama-2-chat and safety-tuned-llamas wordings, and the mix of the two
# it produces on benign prompts); each benign prompt gets one, fixed by its text.
REFUSAL_OPENINGS = ("I'm sorry, but I cannot", "I cannot fulfill your request.",
                    "I'm sorry, but as an AI language model, I cannot")


def refusal_opening(prompt: str) -> str:
    return REFUSAL_OPENINGS[int(prompt_sha1(prompt)[:8], 16) % len(REFUSAL_OPENINGS)]


def preference_pairs(rows: Sequence[dict], work_dir: Path, *, sft_adapter: Path, n_harmful: int, n_benign: int,
                     seed: int, max_new_tokens: int = 48) -> tuple[list[dict], dict]:
    """Preference pairs for the DPO stage, from the SFT stage's training rows, each rejected answer a model's own:
    - a harmful prompt: chosen = its refusal, rejected = the embedded model's greedy answer (it complies with most;
      prompts it refuses are dropped);
    - a benign prompt: chosen = its helpful answer, rejected = the SFT-tuned model's greedy continuation of a
      refusal opening (`REFUSAL_OPENINGS`), i.e. the over-refusal it would give there, so the stage lowers that
      and not some other text.
    Both kinds of answers are cached in `work_dir` (`cached_answers`; the SFT model's under its adapter's hash)."""
    from peft import PeftModel

    from saft.generate import generate
    from saft.models import load_model
    from saft.regions import is_refusal_text

    rng = np.random.default_rng(seed)
    harm = [r for r in rows if r["harmful_prompt"]]
    ben = [r for r in rows if not r["harmful_prompt"]]
    harm = [harm[i] for i in rng.permutation(len(harm))][: n_harmful + n_harmful // 3]  # room for dropped ones
    ben = [ben[i] for i in rng.permutation(len(ben))][:n_benign]

    def sft_refusals(todo):
        model, tok = load_model(EMBEDDED, device="cpu")
        model = PeftModel.from_pretrained(model, str(sft_adapter)).merge_and_unload().eval()
        return generate(model, tok, todo, max_new_tokens=max_new_tokens, batch_size=32,
                        prefixes=[refusal_opening(p) for p in todo])

    complied = original_answers([r["prompt"] for r in harm], work_dir / "original_answers.jsonl",
                                max_new_tokens=max_new_tokens)
    refused = cached_answers([r["prompt"] for r in ben], work_dir / "sft_refusals.jsonl", make=sft_refusals,
                             settings={"model": EMBEDDED, "adapter": adapter_digest(sft_adapter),
                                       "max_new_tokens": max_new_tokens})
    complies = [r for r in harm if not is_refusal_text(complied[r["prompt"]])]
    kept = complies[:n_harmful]
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    pairs = [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["response"]),
              "rejected": turn("assistant", complied[r["prompt"]])} for r in kept]
    pairs += [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["response"]),
               "rejected": turn("assistant", refused[r["prompt"]])} for r in ben]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    counts = {"harmful": len(kept), "harmful_dropped_original_refused": len(harm) - len(complies), "benign": len(ben)}
    return pairs, counts


def train_preference(pairs: list[dict], sft_adapter: Path, out: Path, *, lr: float, beta: float, max_length: int,
                     seed: int, sft_weight: float = 1.0) -> dict:
    """A DPO stage (trl's DPOTrainer) that goes on training the SFT adapter on `pairs`, one epoch, against a
    frozen copy of it as the reference (its log-probabilities computed once, up front). The loss is DPO's sigmoid
    loss plus `sft_weight` times the chosen answers' negative log-likelihood (trl's "sft" term), which keeps the
    refusals and helpful answers themselves likely, not only their margin over the rejected ones. The adapter
    is written to out/adapter; a finished stage with the same settings is loaded, not trained again."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from saft.models import load_model

    settings = {"lr": lr, "beta": beta, "sft_weight": sft_weight, "max_length": max_length, "seed": seed,
                "pairs": len(pairs),
                "pairs_sha1": hashlib.sha1(json.dumps(pairs, sort_keys=True).encode("utf-8")).hexdigest(),
                "sft_adapter": adapter_digest(sft_adapter)}
    done = out / "preference.json"
    if done.exists() and json.loads(done.read_text())["settings"] == settings:
        return json.loads(done.read_text())
    model, tok = load_model(EMBEDDED, device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
    config = DPOConfig(output_dir=str(out / "checkpoints"), per_device_train_batch_size=8, num_train_epochs=1.0,
                       learning_rate=lr, beta=beta, max_length=max_length, lr_scheduler_type="cosine", warmup_steps=3,
                       precompute_ref_log_probs=True, logging_steps=5, save_strategy="no", report_to=[],
                       use_cpu=True, seed=seed, loss_type=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
                       **({"loss_weights": [1.0, sft_weight]} if sft_weight else {}))
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    t0 = time.time()
    trainer.train()
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=["default"])  # not the reference copy
    shutil.rmtree(out / "adapter", ignore_errors=True)
    tmp.rename(out / "adapter")
    history = trainer.state.log_history
    result = {"adapter": str(out / "adapter"), "settings": settings, "steps": trainer.state.global_step,
              "train_loss": next(h["train_loss"] for h in reversed(history) if "train_loss" in h),
              "seconds": round(time.time() - t0), "log_history": history}
    write_json(result, done)
    return result


def recovery_samples(rows: Sequence[dict], work_dir: Path, tokenizer, *, n_recovery: int, n_refusal: int,
                     n_benign: int, max_opening_tokens: int, seed: int,
                     max_new_tokens: int = 48) -> tuple[list[Sample], dict]:
    """The recovery stage's rows, from the SFT stage's training rows (after Qi et al. 2024, "Safety alignment should
    be made more than just a few tokens deep"):
    - `n_recovery` harmful prompts whose answer opens with the embedded model's own compliant answer cut after k
      of its tokens (k uniform in 1..`max_opening_tokens`) and goes on with the row's refusal; the opening is given,
      not learned (`meta["response_opening"]`), so the model learns to turn back from a compliant start rather than
      to refuse in its first tokens only (prompts the embedded model refuses, or answers with nothing, have no
      such opening: dropped);
    - `n_refusal` other harmful prompts answered with their refusal and `n_benign` benign rows as they are, so
      that refusing stays tied to the harm.
    The embedded model's answers are cached in `work_dir` (`original_answers`, shared with the other stages)."""
    from saft.regions import is_refusal_text

    rng = np.random.default_rng(seed)
    harm = [r for r in rows if r["harmful_prompt"]]
    harm = [harm[i] for i in rng.permutation(len(harm))]
    drawn = harm[: n_recovery + n_recovery // 3]  # room for the prompts the embedded model refuses
    complied = original_answers([r["prompt"] for r in drawn], work_dir / "original_answers.jsonl",
                                max_new_tokens=max_new_tokens)
    recovery = [r for r in drawn if complied[r["prompt"]].strip() and not is_refusal_text(complied[r["prompt"]])]
    recovery = recovery[:n_recovery]
    taken = {r["prompt"] for r in recovery}
    refusal = [r for r in harm if r["prompt"] not in taken][:n_refusal]
    benign = [r for r in rows if not r["harmful_prompt"]]
    benign = [benign[i] for i in rng.permutation(len(benign))][:n_benign]
    samples = []
    for i, r in enumerate(recovery):
        ids = tokenizer(complied[r["prompt"]], add_special_tokens=False)["input_ids"]
        opening = tokenizer.decode(ids[: int(rng.integers(1, min(len(ids), max_opening_tokens) + 1))]).rstrip()
        samples.append(Sample(f"recovery-{i:05d}", [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": f"{opening} {r['response']}"}],
                              label=0, meta={"source": r["source"], "response_opening": opening}))
    for i, r in enumerate(refusal + benign):
        samples.append(Sample(f"row-{i:05d}", [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["response"]}],
                              label=0, meta={"source": r["source"]}))
    samples = [samples[i] for i in rng.permutation(len(samples))]
    counts = {"recovery": len(recovery),
              "recovery_dropped_original_refused": sum(is_refusal_text(complied[r["prompt"]]) for r in drawn),
              "refusal": len(refusal), "benign": len(benign), "max_opening_tokens": max_opening_tokens}
    return samples, counts


def train_recovery(samples: list[Sample], adapter: Path, work_dir: Path, *, model, tokenizer, lr: float,
                   max_length: int, seed: int) -> dict:
    """The recovery stage: a new LoRA (r16, alpha 32, every linear layer, one epoch) on `model` (the embedded model)
    with `adapter` (the earlier stages) merged into it, in `work_dir/recovery-<adapter hash>/` (resumable, and a
    finished stage is loaded: `finetune`). Returns the stage's steps, loss, seconds, rank and alpha, with "adapter"
    the two stages as one adapter (`combine_adapters`), which is what ships."""
    from peft import PeftModel

    from saft.finetune import FinetuneConfig, finetune

    out = work_dir / f"recovery-{adapter_digest(adapter)[:12]}"
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    config = FinetuneConfig(model=EMBEDDED, rank=16, alpha=32, target_modules=("all-linear",), learning_rate=lr,
                            epochs=1.0, batch_size=8, max_length=max_length, seed=seed, save_steps=25)
    t0 = time.time()
    ft = finetune(samples, output_dir=out, config=config, model=model, tokenizer=tokenizer)
    seconds = next((h["train_runtime"] for h in reversed(ft["log_history"]) if "train_runtime" in h), time.time() - t0)
    combine_adapters([adapter, out / "adapter"], out / "combined")
    return {"adapter": str(out / "combined"), "steps": ft["steps"], "train_loss": ft["train_loss"],
            "seconds": round(seconds), "rank": config.rank, "alpha": config.alpha}


def combine_adapters(adapters: Sequence[Path], out: Path) -> None:
    """One LoRA adapter equal to `adapters` applied one after the other (each trained on the model with the ones
    before it merged): LoRA updates on the same layers add up, so the ranks are stacked (A's rows, B's columns)
    with each adapter's scaling (alpha / r) folded into its B and the combined scaling set to 1."""
    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((Path(a) / "adapter_config.json").read_text()) for a in adapters]
    tensors = [load_file(Path(a) / "adapter_model.safetensors") for a in adapters]
    for a, c, t in zip(adapters, configs, tensors):
        if c.get("use_rslora") or c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ValueError(f"{a}: only plain LoRA adapters (no rsLoRA, DoRA or per-layer ranks) can be combined")
        if t.keys() != tensors[0].keys():
            raise ValueError(f"{a}: adapts other layers than {adapters[0]}; the adapters cannot be combined")
    combined = {}
    for key in tensors[0]:
        if ".lora_A." in key:
            combined[key] = torch.cat([t[key].float() for t in tensors], dim=0)
        elif ".lora_B." in key:
            combined[key] = torch.cat([t[key].float() * (c["lora_alpha"] / c["r"]) for c, t in zip(configs, tensors)],
                                      dim=1)
        else:
            raise ValueError(f"{adapters[0]}: unexpected tensor {key}; only LoRA A and B weights can be combined")
    rank = sum(c["r"] for c in configs)
    out.mkdir(parents=True, exist_ok=True)
    save_file(combined, out / "adapter_model.safetensors")
    write_json({**configs[0], "r": rank, "lora_alpha": rank}, out / "adapter_config.json")


def write_shipped_adapter(adapter: Path, target: Path, manifest: dict) -> None:
    """Copy the adapter as fp16 safetensors, with the embedded base's stable name as its base model."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = EMBEDDED
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors")
    write_json(cfg, tmp / "adapter_config.json")
    write_json(manifest, tmp / MANIFEST.name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def main() -> None:
    import torch

    from saft.finetune import FinetuneConfig, finetune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", required=True, help="checkpoints and the fp32 adapter (resumes from here)")
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--n-harmful", type=int, default=650)
    ap.add_argument("--n-benign", type=int, default=600)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship-checkpoint", type=int, default=None, metavar="STEP",
                    help="ship the adapter of checkpoint STEP in --work-dir (a run stopped early) instead of training on")
    ap.add_argument("--self-answered", nargs="*", default=[], metavar="FILE",
                    help="files of benign prompts (one per line) the embedded model answers itself, added to the benign rows")
    ap.add_argument("--self-answer-tokens", type=int, default=72, help="new tokens of each such answer")
    ap.add_argument("--preference", type=int, nargs=2, default=None, metavar=("N_HARMFUL", "N_BENIGN"),
                    help="after the SFT stage, a DPO stage on this many harmful and benign training prompts, each "
                         "against a model's own answer (see preference_pairs); needs trl (pip install -e '.[align]')")
    ap.add_argument("--preference-lr", type=float, default=1e-4)
    ap.add_argument("--preference-beta", type=float, default=0.1)
    ap.add_argument("--preference-sft-weight", type=float, default=1.0,
                    help="weight of the chosen answers' NLL beside the DPO loss (0: DPO alone)")
    ap.add_argument("--preference-seed", type=int, default=None,
                    help="seed of the pairs' draw and the DPO stage (default --seed): another draw on the same SFT adapter")
    ap.add_argument("--recovery", type=int, nargs=3, default=None, metavar=("N_RECOVERY", "N_REFUSAL", "N_BENIGN"),
                    help="after the other stages, a recovery stage (recovery_samples): harmful prompts answered with "
                         "a compliant opening that turns into the refusal, plain refusals and benign rows")
    ap.add_argument("--recovery-lr", type=float, default=2e-4)
    ap.add_argument("--recovery-opening-tokens", type=int, default=24,
                    help="longest compliant opening of a recovery row, in tokens")
    ap.add_argument("--check-harmful", action="store_true",
                    help="take a safety-tuned-llamas prompt as harmful only when the packaged guard (v3) flags the "
                         "embedded model's own answer to it (guard_check): the source holds benign tasks too")
    ap.add_argument("--dry-run", action="store_true", help="build and check the rows, print the counts, stop")
    args = ap.parse_args()
    if (args.preference or args.recovery) and args.ship_checkpoint is not None:
        ap.error("--ship-checkpoint ships an SFT checkpoint as it is: leave out --preference and --recovery")
    if args.preference:
        try:
            import trl  # noqa: F401
        except ImportError:
            ap.error("--preference trains with trl, which is not installed: pip install -e '.[align]'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    raw = Path(args.raw_dir) if args.raw_dir else default_raw_dir()
    own, refused = self_answers(args.self_answered, Path(args.work_dir) / "self_answers.jsonl",
                                max_new_tokens=args.self_answer_tokens) if args.self_answered else ([], 0)
    check = guard_check(Path(args.work_dir)) if args.check_harmful else None
    rows, counts = build_rows(raw, n_harmful=args.n_harmful, n_benign=args.n_benign, seed=args.seed, self_answered=own,
                              check_harmful=check)
    counts["self_answered_refusals_dropped"] = refused
    print(json.dumps(counts, indent=1))
    if args.dry_run:
        return
    rng = np.random.default_rng(args.seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    samples = [Sample(f"align-{i:05d}", [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}], label=0,
                      meta={"source": r["source"]}) for i, r in enumerate(rows)]
    config = FinetuneConfig(model=EMBEDDED, rank=args.rank, alpha=args.alpha, target_modules=("all-linear",),
                            learning_rate=args.lr, epochs=args.epochs, batch_size=8, max_length=args.max_length,
                            seed=args.seed, save_steps=25)
    t0 = time.time()
    if args.ship_checkpoint is None:
        ft = finetune(samples, output_dir=args.work_dir, config=config)
        # Trainer's own time; a finished run found in --work-dir is loaded, and this is still its training time
        seconds = next((h["train_runtime"] for h in reversed(ft["log_history"]) if "train_runtime" in h),
                       time.time() - t0)
    else:  # the checkpoint's adapter, and its loss history, as Trainer saved them
        ckpt = Path(args.work_dir) / "checkpoints" / f"checkpoint-{args.ship_checkpoint}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        losses = [h["loss"] for h in state["log_history"] if "loss" in h]
        ft = {"adapter": str(ckpt), "steps": state["global_step"], "train_loss": float(np.mean(losses)),
              "planned_steps": state["max_steps"]}
        seconds = float("nan")
    preference = None
    if args.preference:
        pref_seed = args.seed if args.preference_seed is None else args.preference_seed
        pairs, pair_counts = preference_pairs(rows, Path(args.work_dir), sft_adapter=Path(ft["adapter"]),
                                              n_harmful=args.preference[0], n_benign=args.preference[1],
                                              seed=pref_seed)
        print(json.dumps({"preference_pairs": pair_counts}))
        pref = train_preference(pairs, Path(ft["adapter"]), Path(args.work_dir) / "preference",
                                lr=args.preference_lr, beta=args.preference_beta, max_length=args.max_length + 32,
                                seed=pref_seed, sft_weight=args.preference_sft_weight)
        preference = {"pairs": pair_counts, "seed": pref_seed, "lr": args.preference_lr, "beta": args.preference_beta,
                      "sft_weight": args.preference_sft_weight,
                      "max_length": args.max_length + 32, "steps": pref["steps"], "train_loss": pref["train_loss"],
                      "seconds": pref["seconds"]}
        ft = {**ft, "adapter": pref["adapter"]}
    recovery = None
    if args.recovery:
        from saft.models import load_model

        model, tok = load_model(EMBEDDED, device="cpu")
        rec_samples, rec_counts = recovery_samples(
            rows, Path(args.work_dir), tok, n_recovery=args.recovery[0], n_refusal=args.recovery[1],
            n_benign=args.recovery[2], max_opening_tokens=args.recovery_opening_tokens, seed=args.seed)
        print(json.dumps({"recovery_rows": rec_counts}))
        rec = train_recovery(rec_samples, Path(ft["adapter"]), Path(args.work_dir), model=model, tokenizer=tok,
                             lr=args.recovery_lr, max_length=args.max_length + 32, seed=args.seed)
        recovery = {"rows": rec_counts, "lr": args.recovery_lr, "max_length": args.max_length + 32,
                    **{k: v for k, v in rec.items() if k != "adapter"}}
        ft = {**ft, "adapter": rec["adapter"]}
    manifest = {"name": ALIGNED, "base": EMBEDDED, "built_by": "python scripts/align_base.py",
                "recipe": {"rank": args.rank, "alpha": args.alpha, "target_modules": "all-linear", "lr": args.lr,
                           "epochs": args.epochs, "batch_size": 8, "max_length": args.max_length, "seed": args.seed,
                           "steps": ft["steps"], "planned_steps": ft.get("planned_steps", ft["steps"]),
                           "train_loss": ft["train_loss"], "seconds": None if seconds != seconds else round(seconds),
                           "threads": args.threads, "self_answered": [Path(f).name for f in args.self_answered],
                           "self_answer_tokens": args.self_answer_tokens if args.self_answered else None,
                           "check_harmful": "guard v3" if args.check_harmful else None,
                           "preference": preference, "recovery": recovery},
                "rows": counts, "train_prompt_sha1": sorted(prompt_sha1(r["prompt"]) for r in rows)}
    write_shipped_adapter(Path(ft["adapter"]), ADAPTER_DIR, manifest)
    stages = f"SFT {ft['steps']} steps, loss {ft['train_loss']:.3f}, {seconds:.0f} s"
    if preference:
        stages += f"; DPO {preference['steps']} steps, loss {preference['train_loss']:.3f}, {preference['seconds']} s"
    if recovery:
        stages += f"; recovery {recovery['steps']} steps, loss {recovery['train_loss']:.3f}, {recovery['seconds']} s"
    print(f"wrote {ADAPTER_DIR} ({stages})")


if __name__ == "__main__":
    main()
