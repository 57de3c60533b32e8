"""Probe (not committed): a 'deep alignment' stage on top of the shipped aligned base (L3).

Qi et al. 2024 ("Safety alignment should be made more than just a few tokens deep"): train on harmful prompts whose
answer begins with a few tokens of a compliant answer and then recovers into a refusal, loss on the refusal only,
so that refusing does not hinge on the first tokens. Question: does benign fine-tuning erode such a base less?

Rows: recovery rows (L3's harmful training prompts, the embedded model's own compliant answer cut after k tokens,
k uniform in 1..MAXK, then the row's refusal), plain refusal rows, benign rows (L3's benign training rows).
A new LoRA (r16 all-linear) on the merged aligned base, merged and saved as a model folder.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "/work/main/scripts")
import align_base as ab  # noqa: E402
import saft.finetune as sf  # noqa: E402
from saft.data import Sample  # noqa: E402
from saft.pools import default_raw_dir  # noqa: E402
from saft.regions import is_refusal_text  # noqa: E402
from saft.render import encode  # noqa: E402

WORK = Path("/work/s21/L3work")
OUT = Path(sys.argv[1])
N_REC, N_PLAIN, N_BEN, MAXK = 300, 100, 400, 24
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 2e-4
torch.set_num_threads(2)

files = ["scripts/align_prompts/lookalikes.txt", "scripts/align_prompts/instructions.txt",
         "scripts/align_prompts/instructions_templated.txt"]
own, _ = ab.self_answers([f"/work/main/{f}" for f in files], WORK / "self_answers.jsonl", max_new_tokens=72)
rows, counts = ab.build_rows(default_raw_dir(), n_harmful=650, n_benign=558, seed=0, self_answered=own,
                             check_harmful=ab.guard_check(WORK))
orig = {}
for line in open(WORK / "original_answers.jsonl"):
    r = json.loads(line)
    orig[r["prompt"]] = r["response"]
rng = np.random.default_rng(0)
harm = [r for r in rows if r["harmful_prompt"]]
harm = [harm[i] for i in rng.permutation(len(harm))]
rec = [r for r in harm if r["prompt"] in orig and not is_refusal_text(orig[r["prompt"]])][:N_REC]
plain = [r for r in harm if r not in rec][:N_PLAIN]
ben = [r for r in rows if not r["harmful_prompt"]]
ben = [ben[i] for i in rng.permutation(len(ben))][:N_BEN]
print(json.dumps({"recovery": len(rec), "plain": len(plain), "benign": len(ben)}), flush=True)

from transformers import AutoTokenizer  # noqa: E402

from saft.models import resolve_model_path  # noqa: E402

tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-aligned"))
samples, prefix_of = [], {}
for i, r in enumerate(rec):
    ids = tok(orig[r["prompt"]], add_special_tokens=False)["input_ids"]
    k = int(rng.integers(1, min(len(ids), MAXK) + 1))
    prefix = tok.decode(ids[:k])
    sid = f"rec-{i:04d}"
    prefix_of[sid] = prefix
    samples.append(Sample(sid, [{"role": "user", "content": r["prompt"]},
                                {"role": "assistant", "content": prefix.rstrip() + " " + r["response"]}], label=0))
for i, r in enumerate(plain + ben):
    samples.append(Sample(f"row-{i:04d}", [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]}], label=0))
samples = [samples[i] for i in rng.permutation(len(samples))]

orig_features = sf.training_features


def training_features(samples, tokenizer, *, max_length):
    """As saft's, but a recovery row's compliant prefix is masked too: the loss is on the refusal only."""
    out = []
    for s in samples:
        feats = orig_features([s], tokenizer, max_length=max_length)
        if not feats:
            continue
        f = feats[0]
        if s.id in prefix_of:
            pre = encode(Sample(s.id, [s.messages[0], {"role": "assistant", "content": prefix_of[s.id].rstrip()}],
                                label=0), tokenizer)
            n = 0
            for a, b in zip(pre.ids, f["input_ids"]):
                if a != b:
                    break
                n += 1
            f["labels"] = [sf.IGNORE] * n + f["input_ids"][n:]
        out.append(f)
    return out


sf.training_features = training_features
cfg = sf.FinetuneConfig(model="embedded:smollm2-135m-aligned", rank=16, alpha=32, target_modules=("all-linear",),
                        learning_rate=LR, epochs=1.0, batch_size=8, max_length=112, seed=0, save_steps=25)
t0 = time.time()
ft = sf.finetune(samples, output_dir=str(OUT / "work"), config=cfg)
print("trained", ft["steps"], ft["train_loss"], round(time.time() - t0), flush=True)

from peft import PeftModel  # noqa: E402

from saft.models import load_model  # noqa: E402

model, tok2 = load_model("embedded:smollm2-135m-aligned", device="cpu")
model = PeftModel.from_pretrained(model, ft["adapter"]).merge_and_unload()
model.save_pretrained(OUT / "model")
tok2.save_pretrained(OUT / "model")
print("saved", OUT / "model", flush=True)
