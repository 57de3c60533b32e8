"""Detection benchmark: the paper's SAFT configuration on fixed pools built from shared/data/raw.

Pools (1000 rows each, seed 0; see saft.pools):
  T10, T30: benign Alpaca + Dolly with BeaverTails unsafe pairs at 10% / 30%, plus 10% safe refusals;
  B10, B30: BeaverTails safe and unsafe pairs, 10% / 30% unsafe;
  H10, H30: held out (added after every option was chosen on T and B): GSM8K + SST-2 benign rows with
  BeaverTails unsafe pairs of the experiment prompt half at 10% / 30%, plus 10% safe refusals.
For each pool: AUROC of the paper's score (k = 1..4, prompt_last) at every layer of the model, and the paper's
F1 rule (k and tau on 100 labels drawn from the pool) at the default layer over 5 label draws: mean and spread
of F1 and of the removed count. Also times feature extraction against a naive loop (one sample at a time, the
full model with every hidden state and the LM head) on the same rows, and prints the ratio.

    python benchmarks/detect.py [--n 1000] [--raw-dir ../shared/data/raw] [--naive-rows 64]

Features are cached in benchmarks/.cache (all layers and positions, reusable by other benchmarks). The markdown
section between the detect markers in benchmarks/RESULTS.md is rewritten, and results/detect.json saved.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from saft import SubspaceScorer, draw_labeled, extract_features, load_model, select_by_f1
from saft.data import write_json
from saft.features import POSITIONS, num_layers
from saft.metrics import detection_metrics
from saft.pipeline import versions
from saft.pools import beavertails_pool, heldout_pool, task_pool

HERE = Path(__file__).resolve().parent
# The benchmark pools by name, drawn with any seed (seed 0 = the pools of this script).
SEEDED_POOLS = {
    "T10": lambda n, seed, raw=None: task_pool(n, harmful_rate=0.1, refusal_rate=0.1, seed=seed, raw_dir=raw),
    "T30": lambda n, seed, raw=None: task_pool(n, harmful_rate=0.3, refusal_rate=0.1, seed=seed, raw_dir=raw),
    "B10": lambda n, seed, raw=None: beavertails_pool(n, harmful_rate=0.1, seed=seed, raw_dir=raw),
    "B30": lambda n, seed, raw=None: beavertails_pool(n, harmful_rate=0.3, seed=seed, raw_dir=raw),
    "H10": lambda n, seed, raw=None: heldout_pool(n, harmful_rate=0.1, refusal_rate=0.1, seed=seed, raw_dir=raw),
    "H30": lambda n, seed, raw=None: heldout_pool(n, harmful_rate=0.3, refusal_rate=0.1, seed=seed, raw_dir=raw),
}
POOLS = {name: (lambda n, raw, build=build: build(n, 0, raw)) for name, build in SEEDED_POOLS.items()}
LABEL_SEEDS = (0, 1, 2, 3, 4)
KS = (1, 2, 3, 4)


def pool_features(model, tok, samples, *, max_length: int, cache: Path, progress: bool):
    return extract_features(model, tok, samples, layers="all", positions=list(POSITIONS), max_length=max_length,
                            batch_size=8, cache_dir=cache, progress=progress)


def paper_rule(X: np.ndarray, labels: list[int], seed: int) -> dict:
    """k in 1..4 and tau by F1 on 100 labels drawn from the pool (the paper's rule), evaluated on the pool."""
    scores = {k: SubspaceScorer(n_components=k).fit(X).score_samples(X) for k in KS}
    idx = draw_labeled(labels, 100, seed=seed)
    sel = select_by_f1(scores, {k: v[idx] for k, v in scores.items()}, [labels[i] for i in idx])
    k = sel.params["candidate"]
    m = detection_metrics(scores[k], labels, sel.removed)
    return {"seed": seed, "k": k, "threshold": sel.threshold, "removed": sel.n_removed, "f1": m["f1"],
            "precision": m["precision"], "recall": m["recall"], "auroc": m["auroc"]}


def time_extraction(model, tok, samples, *, max_length: int, layer: int) -> dict:
    """Seconds for our extractor (one layer, batched, truncated forward) vs the naive per-sample loop."""
    import torch

    from saft.render import encode

    t0 = time.perf_counter()
    ours = extract_features(model, tok, samples, layers=[layer], positions="prompt_last", max_length=max_length,
                            batch_size=8, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = []
    with torch.inference_mode():
        for s in samples:
            e = encode(s, tok, max_length=max_length)
            out = model(torch.tensor([e.ids]), output_hidden_states=True)  # full model + LM head
            naive.append(out.hidden_states[layer][0, e.prompt_len - 1].numpy())
    t_naive = time.perf_counter() - t0
    max_diff = float(np.abs(np.stack(naive) - ours.get(layer)).max())
    n_tokens = sum(len(encode(s, tok, max_length=max_length).ids) for s in samples)
    return {"rows": len(samples), "tokens": n_tokens, "ours_s": round(t_ours, 2), "naive_s": round(t_naive, 2),
            "speedup": round(t_naive / t_ours, 2), "ours_tokens_per_s": round(n_tokens / t_ours, 1),
            "naive_tokens_per_s": round(n_tokens / t_naive, 1), "max_abs_diff": max_diff}


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def render_markdown(res: dict) -> str:
    L = res["n_layers"]
    pools = list(res["pools"])
    lines = [f"Command: `{res['command']}`  ", f"Model: {res['model']} ({L} layers), position prompt_last, "
             f"max_length {res['max_length']}, pools of {res['n']} rows built with seed 0, label draws seeds "
             f"{', '.join(map(str, LABEL_SEEDS))}.  ", f"Versions: {json.dumps(res['versions'])}  ",
             f"Date: {res['date']}, {res['seconds']:.0f} s on {res['machine']}.", "",
             "### AUROC of the paper's score by layer (k = 1; best k in 1..4 in brackets)", "",
             "| layer | " + " | ".join(pools) + " |", "|---|" + "---|" * len(pools)]
    for layer in range(L + 1):
        cells = []
        for p in pools:
            a = res["pools"][p]["auroc_by_layer"][str(layer)]
            cells.append(f"{a['1']:.3f} ({max(a.values()):.3f})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", f"### The paper's F1 rule at layer {res['layer']} (k, tau by F1 on 100 labels from the pool; 5 draws)",
              "", "| pool | harmful | AUROC (chosen k) | F1 mean ± sd | removed mean ± sd (min..max) | k chosen |",
              "|---|---|---|---|---|---|"]
    for p in pools:
        d = res["pools"][p]["f1_rule"]
        removed = [r["removed"] for r in d]
        lines.append(f"| {p} | {res['pools'][p]['n_harmful']} | {fmt([r['auroc'] for r in d])} | "
                     f"{fmt([r['f1'] for r in d])} | {np.mean(removed):.0f} ± {np.std(removed):.0f} "
                     f"({min(removed)}..{max(removed)}) | {', '.join(str(r['k']) for r in d)} |")
    t = res["timing"]
    lines += ["", "### Feature extraction time (same rows, same machine, same run)", "",
              f"{t['rows']} rows of {t['pool']} ({t['tokens']} tokens), layer {res['layer']}, prompt_last: "
              f"ours (batched by length, forward stopped after layer {res['layer']}, no LM head) {t['ours_s']} s "
              f"({t['ours_tokens_per_s']} tokens/s); naive loop (one sample at a time, full model, all hidden "
              f"states, LM head) {t['naive_s']} s ({t['naive_tokens_per_s']} tokens/s). **Speed-up "
              f"{t['speedup']}x**; largest feature difference {t['max_abs_diff']:.2e}."]
    return "\n".join(lines)


def write_results_md(section: str, *, key: str = "detect",
                     title: str = "Detection: the paper's configuration (benchmarks/detect.py)") -> None:
    """Replace the block between this key's markers in RESULTS.md, or append it under `title`."""
    path = HERE / "RESULTS.md"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SAFT detection benchmark")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--raw-dir", default=None, help="shared/data/raw (default: found from the working directory)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--naive-rows", type=int, default=64)
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(None, device="cpu")
    L = num_layers(model)
    layer = L // 2
    res = {"command": "python benchmarks/detect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": "SmolLM2-135M-Instruct (embedded)", "n_layers": L, "layer": layer, "n": args.n,
           "max_length": args.max_length, "versions": versions(), "machine": f"{platform.machine()} CPU",
           "date": time.strftime("%Y-%m-%d"), "pools": {}}
    pools = {}
    for name, build in POOLS.items():
        samples = build(args.n, args.raw_dir)
        pools[name] = samples
        labels = [s.label for s in samples]
        feats = pool_features(model, tok, samples, max_length=args.max_length, cache=Path(args.cache), progress=not args.quiet)
        by_layer = {}
        for lay in feats.layers:
            X = feats.get(lay, "prompt_last")
            by_layer[str(lay)] = {str(k): float(roc_auc_score(labels, SubspaceScorer(n_components=k).fit(X).score_samples(X)))
                                  for k in KS}
        rule = [paper_rule(feats.get(layer, "prompt_last"), labels, seed) for seed in LABEL_SEEDS]
        res["pools"][name] = {"n_harmful": int(sum(labels)), "n_truncated": feats.n_truncated,
                              "auroc_by_layer": by_layer, "f1_rule": rule}
        best = max(by_layer, key=lambda lay: by_layer[lay]["1"])
        print(f"{name}: AUROC(k=1) layer {layer} {by_layer[str(layer)]['1']:.3f}, best layer {best} "
              f"{by_layer[best]['1']:.3f}; F1 rule F1 {fmt([r['f1'] for r in rule])}, removed "
              f"{fmt([r['removed'] for r in rule])}", flush=True)
    timing = time_extraction(model, tok, pools["T30"][: args.naive_rows], max_length=args.max_length, layer=layer)
    res["timing"] = {"pool": "T30", **timing}
    print(f"extraction: ours {timing['ours_s']} s, naive {timing['naive_s']} s, speed-up {timing['speedup']}x "
          f"(max diff {timing['max_abs_diff']:.1e})")
    res["seconds"] = time.time() - t0
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        write_json(res, HERE / "results" / "detect.json")
        write_results_md(render_markdown(res))
        print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'results' / 'detect.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
