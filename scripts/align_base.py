"""Safety-tune the embedded model with LoRA and write the shipped adapter to src/saft/aligned_adapter/ (fp16).

    SAFT_CACHE=... OMP_NUM_THREADS=1 python scripts/align_base.py --work-dir DIR [--raw-dir ../shared/data/raw]

Training rows (all from shared/data/raw, see docs/aligned-base.md):
- harmful prompts answered with refusals: the Llama-2-chat refusals (refusals_llama2chat_1015.csv) and the
  safety-tuned-llamas refusals (safety_only_refusals_vinid.json) whose prompt is in the 'align' slice of
  `saft.aligned.alignment_slice`;
- benign prompts answered helpfully: Alpaca and Dolly rows in the 'align' slice, those whose prompt uses a word
  harmful requests also use ("kill", "attack", ...) first, so the model learns the word alone is no reason to refuse;
  with --self-answered, also the benign prompts of those files (one per line, written for this: look-alikes such as
  "How do I steal second base in baseball?" and instructions phrased as harmful requests are, "Write a script that
  ..."), answered by the embedded model itself (greedy; answers that read as refusals are dropped), so the tuning
  keeps the model's own behaviour on them instead of teaching another.
No training prompt is reserved for the judge (`judge_reserved`), occurs in BeaverTails (either half), in a task or
held-out pool source outside the 'align' slice, or in an evaluation set (AdvBench, I-MaliciousInstructions,
I-Alpaca, src/saft/lookalike_prompts.txt; the Llama-2-chat refusals answer 361 AdvBench prompts, so AdvBench's
other 159 are the held-out ones): the script asserts it and prints the counts.
Resumes from the last checkpoint in --work-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from saft.aligned import ADAPTER_DIR, ALIGNED, LOOKALIKES, MANIFEST, alignment_slice, prompt_sha1
from saft.data import Sample, load_prompts, write_json
from saft.models import EMBEDDED
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
            "lookalike": {norm(p) for p in load_prompts(LOOKALIKES)}}


def build_rows(raw: Path, *, n_harmful: int, n_benign: int, seed: int,
               self_answered: Sequence[dict] = ()) -> tuple[list[dict], dict]:
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
              "available": {"llama2": len(llama), "vinid_align": len(vinid)},
              "overlap_checked_against": {k: len(v) for k, v in {**evals, **others}.items()},
              "overlaps": overlaps}
    return rows, counts


def self_answers(files: list[str], cache: Path, *, max_new_tokens: int) -> tuple[list[dict], int]:
    """The prompts of `files` answered by the embedded model (greedy), kept in `cache` (JSONL, each answer with
    the model and token budget it was made with) so a rerun with the same settings reuses them; rows whose answer
    reads as a refusal (`saft.regions.is_refusal_text`) are left out (their count is returned beside the rows)."""
    from saft.data import write_jsonl
    from saft.generate import generate
    from saft.models import load_model
    from saft.regions import is_refusal_text

    prompts = list(dict.fromkeys(p for f in files for p in load_prompts(Path(f))))
    settings = {"model": EMBEDDED, "max_new_tokens": max_new_tokens}
    cached = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()] if cache.exists() else []
    same = [all(r.get(k) == v for k, v in settings.items()) for r in cached]
    done = {r["prompt"]: r["response"] for r, s in zip(cached, same) if s}
    todo = [p for p in prompts if p not in done]
    if todo:
        model, tok = load_model(EMBEDDED, device="cpu")
        done.update(zip(todo, generate(model, tok, todo, max_new_tokens=max_new_tokens, batch_size=32)))
        # answers made with other settings stay in the cache beside these
        other = [r for r, s in zip(cached, same) if not s]
        write_jsonl(other + [{"prompt": p, "response": done[p], **settings} for p in done], cache)
    rows = [{"prompt": p, "response": done[p], "source": "self"} for p in prompts if not is_refusal_text(done[p])]
    return rows, len(prompts) - len(rows)


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
    ap.add_argument("--dry-run", action="store_true", help="build and check the rows, print the counts, stop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    raw = Path(args.raw_dir) if args.raw_dir else default_raw_dir()
    own, refused = self_answers(args.self_answered, Path(args.work_dir) / "self_answers.jsonl",
                                max_new_tokens=args.self_answer_tokens) if args.self_answered else ([], 0)
    rows, counts = build_rows(raw, n_harmful=args.n_harmful, n_benign=args.n_benign, seed=args.seed, self_answered=own)
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
        seconds = time.time() - t0
    else:  # the checkpoint's adapter, and its loss history, as Trainer saved them
        ckpt = Path(args.work_dir) / "checkpoints" / f"checkpoint-{args.ship_checkpoint}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        losses = [h["loss"] for h in state["log_history"] if "loss" in h]
        ft = {"adapter": str(ckpt), "steps": state["global_step"], "train_loss": float(np.mean(losses)),
              "planned_steps": state["max_steps"]}
        seconds = float("nan")
    manifest = {"name": ALIGNED, "base": EMBEDDED, "built_by": "python scripts/align_base.py",
                "recipe": {"rank": args.rank, "alpha": args.alpha, "target_modules": "all-linear", "lr": args.lr,
                           "epochs": args.epochs, "batch_size": 8, "max_length": args.max_length, "seed": args.seed,
                           "steps": ft["steps"], "planned_steps": ft.get("planned_steps", ft["steps"]),
                           "train_loss": ft["train_loss"], "seconds": None if seconds != seconds else round(seconds),
                           "threads": args.threads, "self_answered": [Path(f).name for f in args.self_answered],
                           "self_answer_tokens": args.self_answer_tokens if args.self_answered else None},
                "rows": counts, "train_prompt_sha1": sorted(prompt_sha1(r["prompt"]) for r in rows)}
    write_shipped_adapter(Path(ft["adapter"]), ADAPTER_DIR, manifest)
    print(f"wrote {ADAPTER_DIR} ({ft['steps']} steps, loss {ft['train_loss']:.3f}, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
