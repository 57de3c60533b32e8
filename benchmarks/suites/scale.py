"""scale: do the paper's score and the label-free default's pool-side steps run on a million rows of 4096-wide
hidden states in bounded time and memory, and what does feature extraction cost against this CPU's limit?

Every measured step runs in its own subprocess, which reports its wall time and its own peak resident memory
(getrusage RUSAGE_SELF ru_maxrss, the interpreter and its imports included). The in-memory numpy paths run in the
same invocation on the largest pool that fits in about 4 GiB, for the ratio.

Steps:
- data: synthetic float16 features (rows x dim) on disk, written a chunk at a time: a 16-factor low-rank signal
  with decaying scales, unit noise, 10% "harmful" rows shifted along one random direction; a teacher score
  (1.5 * label + unit noise) stands in for the label-free detector's classifier, which is trained on the guard's 2306 rows
  and only scores the pool.
- subspace: SubspaceScorer(n_components=4, solver="streaming") fit and score on every row (k=4 holds the top 1-3
  too), against solver="full" (numpy's SVD) on the in-memory pool, with the largest score difference.
- pool-side: the label-free detector's pool PCA (64 components) and student, fitted on the bounded sample, every row scored
  in chunks, against the same steps on every row of the in-memory pool.
- guard-filter: `saft filter --detector guard` (the whole command, sentence encoder included) on N short rows;
  with --filter-stand-in-rows also with the encoder replaced by a stand-in of the same output shape, which
  measures the memory of the data path (read, view file, score, write) on more rows than the encoder's CPU
  time allows; with --filter-gib G also on a JSONL file of G GiB of long rows (about 4 KiB each), stand-in
  encoder, against the stand-in's smallest short-row run.
- extraction: the CPU's fp32 matmul rate measured with torch, the extractor's tokens/s with the embedded model
  at its default layer (so the FLOP utilisation), the naive loop (one sample at a time, full model with every
  hidden state and the LM head) on the same rows, and `saft demo` (the default filter, then the paper's on the
  same rows) from an empty cache: seconds per 1k samples, rows computed by each run.

    python benchmarks/run.py scale [--rows 1000000] [--dim 4096] [--data-dir DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NAME = "scale"
QUESTION = ("Do the paper's score and the label-free default's pool-side steps handle a million 4096-wide rows "
            "in bounded time and memory, and what does feature extraction cost against this CPU's limit?")
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--use-rows", type=int, default=None,
                        help="run the out-of-core steps on the first rows of the file only")
    parser.add_argument("--memory-rows", type=int, default=16384,
                        help="rows of the in-memory numpy comparison (16384 x 4096 float64: ~2.5 GiB at peak)")
    parser.add_argument("--data-dir", default=None, help="where the synthetic features go (default: "
                        "$SAFT_CACHE/scale-bench)")
    parser.add_argument("--filter-rows", type=int, nargs="*", default=[20000, 80000])
    parser.add_argument("--filter-stand-in-rows", type=int, nargs="*", default=[],
                        help="guard-filter also on these row counts with the sentence encoder replaced by a stand-in "
                        "of the same output (random unit rows): the memory of everything but the encoder, cheaply")
    parser.add_argument("--filter-gib", type=float, default=None,
                        help="guard-filter (stand-in encoder) also on a JSONL file of this many GiB of ~4 KiB rows")
    parser.add_argument("--extract-rows", type=int, default=200, help="demo rows timed for extraction")
    parser.add_argument("--naive-rows", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL/torch threads of every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["subspace", "pool-side", "guard-filter", "extraction"])


# ---------------------------------------------------------------------------------------------------- data


def data_paths(folder: Path, rows: int, dim: int) -> dict:
    stem = f"{rows}x{dim}-f16"
    return {"X": folder / f"features-{stem}.npy", "y": folder / f"labels-{stem}.npy",
            "teacher": folder / f"teacher-{stem}.npy", "done": folder / f"done-{stem}.json"}


def make_data(folder: Path, rows: int, dim: int, seed: int, chunk: int = 16384) -> dict:
    """Write the synthetic pool a chunk at a time (never whole in memory); reuse a finished one."""
    paths = data_paths(folder, rows, dim)
    if paths["done"].exists():
        return json.loads(paths["done"].read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    r = 16
    W = np.linalg.qr(rng.standard_normal((dim, r + 1)))[0].T.astype(np.float32)  # r factors + the harm direction
    scales = (8.0 * 0.75 ** np.arange(r)).astype(np.float32)
    y = (rng.random(rows) < 0.1).astype(np.int8)
    teacher = (1.5 * y + rng.standard_normal(rows)).astype(np.float32)
    tmp = paths["X"].with_suffix(".tmp")
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                 "fortran_order": False, "shape": (rows, dim)})
        for start in range(0, rows, chunk):
            c = np.random.default_rng([seed, start])
            n = min(chunk, rows - start)
            block = c.standard_normal((n, dim), dtype=np.float32)
            block += (c.standard_normal((n, r), dtype=np.float32) * scales) @ W[:r]
            block += (3.0 * y[start:start + n, None]).astype(np.float32) * W[r]
            f.write(block.astype(np.float16).tobytes())
    tmp.replace(paths["X"])
    np.save(paths["y"], y)
    np.save(paths["teacher"], teacher)
    meta = {"rows": rows, "dim": dim, "dtype": "float16", "seed": seed, "bytes": paths["X"].stat().st_size,
            "harmful_share": float(y.mean()), "write_s": round(time.perf_counter() - t0, 1),
            "recipe": "unit noise + 16 factors (scales 8 * 0.75^j) + 3.0 along one direction for 10% harmful rows"}
    paths["done"].write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------------------------------- steps (children)


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_subspace(p: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    from saft.chunks import NpyMatrix
    from saft.detectors.subspace import SubspaceScorer

    paths = data_paths(Path(p["data_dir"]), p["rows"], p["dim"])
    y = np.load(paths["y"])
    if p["memory"]:
        m = p["memory_rows"]
        X = np.asarray(NpyMatrix(paths["X"]).take(np.arange(m)), dtype=np.float64)
        y = y[:m]
        t0, c0 = time.perf_counter(), _cpu_s()
        full = SubspaceScorer(n_components=4, solver="full").fit(X)
        s_full = full.score_samples(X)
        t_full, c_full = time.perf_counter() - t0, _cpu_s() - c0
        t0 = time.perf_counter()
        st = SubspaceScorer(n_components=4, solver="streaming").fit(X)
        s_st = st.score_samples(X)
        t_st = time.perf_counter() - t0
        return {"rows": m, "numpy_s": round(t_full, 2), "cpu_s": round(c_full, 1),
                "streaming_same_rows_s": round(t_st, 2),
                "streaming_iterations": st.n_iter_,
                "max_score_diff_relative": float(np.abs(s_st - s_full).max() / s_full.max()),
                "auroc": float(roc_auc_score(y, s_full))}
    X = NpyMatrix(paths["X"], rows=p.get("use_rows"))
    t0, c0 = time.perf_counter(), _cpu_s()
    st = SubspaceScorer(n_components=4, solver="streaming", chunk_rows=p["chunk_rows"]).fit(X)
    t_fit = time.perf_counter() - t0
    s = st.score_samples(X)
    t_all, c_all = time.perf_counter() - t0, _cpu_s() - c0
    return {"rows": X.shape[0], "fit_s": round(t_fit, 1), "score_s": round(t_all - t_fit, 1),
            "total_s": round(t_all, 1), "cpu_s": round(c_all, 1), "iterations": st.n_iter_,
            "passes": st.n_iter_ + 2, "auroc": float(roc_auc_score(y[: X.shape[0]], s))}


def step_pool_side(p: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    from saft.chunks import NpyMatrix
    from saft.detectors.model_guard import ModelGuardScorer, fit_pool_student, score_pool_student

    paths = data_paths(Path(p["data_dir"]), p["rows"], p["dim"])
    y, teacher = np.load(paths["y"]), np.load(paths["teacher"])
    defaults = ModelGuardScorer().get_params()
    kw = dict(n_components=defaults["n_components"], C=defaults["student_C"], safe_share=defaults["safe_share"],
              estimate_scale=defaults["estimate_scale"], min_harmful=defaults["min_harmful"])
    if p["memory"]:
        m = p["memory_rows"]
        H = np.asarray(NpyMatrix(paths["X"]).take(np.arange(m)), dtype=np.float64)
        y, teacher = y[:m], teacher[:m]
        max_fit = m  # every row, in memory
    else:
        H = NpyMatrix(paths["X"], rows=p.get("use_rows"))
        y, teacher = y[: H.shape[0]], teacher[: H.shape[0]]
        max_fit = max(2, defaults["max_fit_values"] // p["dim"])
    t0, c0 = time.perf_counter(), _cpu_s()
    rows, components, (_, student, _) = fit_pool_student(H, teacher, float(y.mean()), max_fit_rows=max_fit, **kw)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = score_pool_student(H, components, student)
    t_score = time.perf_counter() - t0
    return {"rows": int(H.shape[0]), "fit_rows": int(len(rows)), "fit_s": round(t_fit, 1),
            "cpu_s": round(_cpu_s() - c0, 1),
            "score_s": round(t_score, 1), "total_s": round(t_fit + t_score, 1),
            "student_auroc": float(roc_auc_score(y, s)), "teacher_auroc": float(roc_auc_score(y, teacher))}


def step_guard_filter(p: dict) -> dict:
    import logging

    from saft.cli import main

    logging.disable(logging.WARNING)
    if p.get("stand_in"):  # same shape and dtype as the encoder's output, none of its cost
        import saft.encoders as E

        def embed_pairs(prompts, responses, **kw):
            X = np.random.default_rng(len(prompts)).standard_normal((len(prompts), E.DIM)).astype(np.float32)
            return X / np.linalg.norm(X, axis=1, keepdims=True)

        E.embed_pairs = embed_pairs
    folder = Path(p["work"]) / f"guard-{p.get('gib') or p['n']}{'-stand-in' if p.get('stand_in') else ''}"
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # the whole command from an empty cache, every time
    folder.mkdir(parents=True)
    data = folder / "rows.jsonl"
    rng = np.random.default_rng(p["seed"])
    words = ["how", "do", "I", "bake", "bread", "fix", "a", "bike", "learn", "python", "hurt", "someone", "steal",
             "car", "write", "poem", "about", "the", "sea", "make", "weapon", "plant", "trees", "at", "home"]
    gib = p.get("gib")
    if gib:  # long rows (a 40-word prompt, a ~4 KiB answer): slices of one long random text, until the size is met
        text = " ".join(rng.choice(words, 200_000))
        starts = rng.integers(0, len(text) - 5000, size=1 << 16)
    with open(data, "w") as f:
        i = 0
        while (f.tell() < gib * 2**30) if gib else (i < p["n"]):
            if gib:
                a = starts[i % len(starts)]
                q, r = text[a:a + 220], text[a + 220:a + 220 + 3900]
            else:
                q, r = " ".join(rng.choice(words, 6)), " ".join(rng.choice(words, 10))
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"{q} {i}?"},
                                                      {"role": "assistant", "content": f"{r}."}]}) + "\n")
            i += 1
    n, size = i, data.stat().st_size
    base = _rss_mib()
    t0 = time.perf_counter()
    rc = main(["-q", "filter", str(data), "--detector", "guard", "-o", str(folder / "out"),
               "--cache-dir", str(folder / "cache")])
    kept = sum(1 for _ in open(next((folder / "out").glob("*kept*"))))
    removed = sum(1 for _ in open(next((folder / "out").glob("*removed*"))))
    shutil.rmtree(folder)  # the next run's disk (a 2 GiB input, its view file and outputs)
    return {"rows": n, "encoder": "stand-in" if p.get("stand_in") else "all-MiniLM-L6-v2", "rc": rc,
            "input_mib": round(size / 2**20, 1), "s": round(time.perf_counter() - t0, 1),
            "rss_before_mib": round(base, 1), "kept_plus_removed": kept + removed}


def step_extraction(p: dict) -> dict:
    import torch

    import saft.features as F
    from saft import load_model
    from saft.pipeline import run_demo
    from saft.render import encode

    torch.set_num_threads(p["threads"])
    # the CPU's fp32 limit as this process sees it: the best of several large matmuls
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t0))
    model, tok = load_model()
    from importlib import resources

    from saft.data import load_samples

    demo = Path(str(resources.files("saft") / "demo" / "demo.jsonl"))
    samples = load_samples(demo).samples[: p["extract_rows"]]
    layer = F.resolve_layers("middle", F.num_layers(model))[0]
    tokens = [len(encode(s, tok, max_length=512).ids) for s in samples]
    t0 = time.perf_counter()
    ours = F.extract_features(model, tok, samples, layers=[layer], positions="prompt_last", batch_size=8,
                              progress=False)
    t_ours = time.perf_counter() - t0
    naive_rows = samples[: p["naive_rows"]]
    t0 = time.perf_counter()
    naive = []
    with torch.inference_mode():
        for s in naive_rows:
            e = encode(s, tok, max_length=512)
            out = model(torch.tensor([e.ids]), output_hidden_states=True)
            naive.append(out.hidden_states[layer][0, e.prompt_len - 1].numpy())
    t_naive = time.perf_counter() - t0
    diff = float(np.abs(np.stack(naive) - ours.get(layer)[: len(naive_rows)]).max())
    # FLOPs a token costs the extractor: 2 per weight of the blocks it runs (attention's own matmuls, small at
    # these lengths, are left out, so the utilisation is a lower bound)
    blocks = F._decoder_blocks(model, F.num_layers(model))
    per_block = sum(q.numel() for q in blocks[0].parameters())
    flops_per_token = 2 * per_block * layer
    ours_tps = sum(tokens) / t_ours
    naive_tps = sum(tokens[: len(naive_rows)]) / t_naive
    # the whole default filter, then the paper's on the same rows, from an empty cache
    counted = []
    real = F._forward_batch

    def counting(m, bl, ls, nl, batch, *a, **k):
        counted.append(len(batch))
        return real(m, bl, ls, nl, batch, *a, **k)

    F._forward_batch = counting
    import saft.pipeline as P

    times = []
    real_filter = P.filter_dataset

    def timed(*a, **k):
        counted.clear()
        t = time.perf_counter()
        res = real_filter(*a, **k)
        times.append((time.perf_counter() - t, sum(counted)))
        return res

    P.filter_dataset = timed
    main_res, paper_res = run_demo(Path(p["work"]) / "demo-out", progress=False, model=model, tokenizer=tok)
    n_demo = main_res.summary["n_samples"]
    return {"threads": p["threads"], "fp32_matmul_gflops": round(best / 1e9, 1), "layer": layer,
            "rows": len(samples), "tokens": int(sum(tokens)), "ours_s": round(t_ours, 1),
            "ours_tokens_per_s": round(ours_tps, 1), "flops_per_token": flops_per_token,
            "flop_utilisation": round(ours_tps * flops_per_token / best, 3),
            "naive_rows": len(naive_rows), "naive_tokens_per_s": round(naive_tps, 1),
            "speedup_vs_naive": round(ours_tps / naive_tps, 2), "max_abs_diff_vs_naive": diff,
            "demo_rows": n_demo, "default_detector": main_res.summary["detector"],
            "default_filter_s": round(times[0][0], 1), "default_rows_computed": times[0][1],
            "default_s_per_1k": round(times[0][0] / n_demo * 1000, 1),
            "paper_filter_s": round(times[1][0], 1), "paper_rows_computed": times[1][1]}


STEPS = {"subspace": step_subspace, "pool-side": step_pool_side, "guard-filter": step_guard_filter,
         "extraction": step_extraction}


def _child(step: str, params: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--step", step, json.dumps(params)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {step} {params.get('memory', '')} {params.get('n', '')}: {out}", file=sys.stderr)
    return out


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("numpy", "scikit-learn", "torch", "transformers", "saft-llm")}


def run(args) -> dict:
    data_dir = Path(args.data_dir or Path(os.environ.get("SAFT_CACHE", "~/.cache/saft")).expanduser() / "scale-bench")
    work = data_dir / "work"
    result = {"command": "python benchmarks/run.py scale " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["scale"]
                                                                       else sys.argv[1:]),
              "seed": args.seed, "versions": _versions(), "threads": args.threads,
              "cpu": f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}"}
    base = dict(data_dir=str(data_dir), rows=args.rows, dim=args.dim, memory_rows=args.memory_rows, seed=args.seed,
                use_rows=args.use_rows,
                threads=args.threads, chunk_rows=8192, work=str(work))
    if not {"subspace", "pool-side"} <= set(args.skip):
        result["data"] = make_data(data_dir, args.rows, args.dim, args.seed)
    else:
        result["data"] = "demo set and synthetic short rows"
    for step in ("subspace", "pool-side"):
        if step not in args.skip:
            result[step] = {"out_of_core": _child(step, {**base, "memory": False}, args.threads),
                            "numpy": _child(step, {**base, "memory": True}, args.threads)}
    if "guard-filter" not in args.skip:
        result["guard-filter"] = ([_child("guard-filter", {**base, "n": n, "stand_in": True}, args.threads)
                                   for n in args.filter_stand_in_rows]
                                  + [_child("guard-filter", {**base, "n": n}, args.threads) for n in args.filter_rows]
                                  + ([_child("guard-filter", {**base, "n": 0, "gib": args.filter_gib, "stand_in": True},
                                             args.threads)] if args.filter_gib else []))
    if "extraction" not in args.skip:
        result["extraction"] = _child("extraction", {**base, "extract_rows": args.extract_rows,
                                                     "naive_rows": args.naive_rows}, args.threads)
    return _merged(result, set(args.skip))


def _steps_of(command: str) -> set:
    """The steps a `run.py scale` command line ran: every step its --skip did not name."""
    words = command.split()
    skip = set()
    if "--skip" in words:
        for w in words[words.index("--skip") + 1:]:
            if w.startswith("--"):
                break
            skip.add(w)
    return set(STEPS) - skip


def _merged(result: dict, skipped: set) -> dict:
    """This run's steps over the result file's: the steps skipped here keep their earlier numbers, and the
    command line lists every command behind the file (each step's numbers come from the one that ran it)."""
    import common

    old = common.load_result(NAME)
    if not old:
        return result
    earlier = []  # guard-filter runs of earlier commands that this one did not repeat
    if "guard-filter" in result and old.get("guard-filter"):
        # guard-filter's runs are one per (encoder, input): the ones this command did not repeat stay, each with
        # the command behind it
        ran_gf = [c for c in old["command"].split(" ; ") if "guard-filter" in _steps_of(c)]
        for r in old["guard-filter"]:
            r.setdefault("command", ran_gf[-1] if ran_gf else old["command"])
        for r in result["guard-filter"]:
            r["command"] = result["command"]
        new_keys = {_run_key(r) for r in result["guard-filter"]}
        earlier = [r for r in old["guard-filter"] if _run_key(r) not in new_keys]
        result["guard-filter"] = sorted(earlier + result["guard-filter"], key=lambda r: (
            _long_rows(r), r.get("encoder") != "stand-in", r["rows"]))
    kept = [s for s in STEPS if s in skipped and s in old]
    if not kept and not earlier:
        return result
    merged = {**{s: old[s] for s in kept}, **result}
    if {"subspace", "pool-side"} <= skipped and isinstance(old.get("data"), dict):
        merged["data"] = old["data"]  # the synthetic pool the kept out-of-core steps ran on
    ran = set(STEPS) - skipped
    behind = {r["command"] for r in merged.get("guard-filter", [])}
    # an earlier command whose steps all ran again here no longer stands behind any number
    commands = [c for c in old["command"].split(" ; ") if not _steps_of(c) <= ran or c in behind]
    merged["command"] = " ; ".join(commands + [result["command"]])
    merged["cpu"] = result["cpu"] if old.get("cpu") == result["cpu"] else f"{old.get('cpu')} ; {result['cpu']}"
    return merged


def _long_rows(r: dict) -> bool:
    """A guard-filter run on a file of long rows (--filter-gib), not on N short rows."""
    return r.get("input_mib", 0) > 1024


def _run_key(r: dict) -> tuple:
    """What makes one guard-filter run: its encoder and its input (a row count, or a file of long rows)."""
    return (r.get("encoder"), _long_rows(r), None if _long_rows(r) else r["rows"])


def render(result: dict, plots_dir: Path) -> str:
    out = [f"## {NAME}", "", QUESTION, "", f"`{result['command']}` (seed {result['seed']}, {result['threads']} "
           f"thread(s), {result['cpu']})", ""]
    d = result.get("data")
    if isinstance(d, dict):
        out += [f"Data: synthetic {d['rows']:,} x {d['dim']} {d['dtype']} on disk ({d['bytes'] / 2**30:.1f} GiB): "
                f"{d['recipe']}."]
        used = result.get("subspace", {}).get("out_of_core", {}).get("rows")
        if used and used < d["rows"]:
            out.append(f"The out-of-core steps read the file's first {used:,} rows (--use-rows); their cost is "
                       "linear in rows and their memory does not depend on them.")
        out.append("")
    rows = []
    for step, label in (("subspace", "paper's score (k=4), fit + score"), ("pool-side", "default's pool PCA + student, fit + score")):
        if step in result:
            o, m = result[step]["out_of_core"], result[step]["numpy"]
            t_m = m.get("numpy_s", m.get("total_s"))
            c_o, c_m = o["cpu_s"], m["cpu_s"]
            rows.append(f"| {label} | {o['rows']:,} | {o['total_s']:.0f} | {c_o:.0f} | {o['peak_rss_mib']:.0f} | "
                        f"{m['rows']:,} | {t_m:.1f} | {c_m:.1f} | {m['peak_rss_mib']:.0f} | "
                        f"{(c_o / o['rows']) / (c_m / m['rows']):.2f} |")
    if rows:
        out += ["| step | rows (out of core) | wall s | CPU s | peak RSS MiB | rows (numpy, in memory) | wall s | "
                "CPU s | peak RSS MiB | CPU time per row, out of core / numpy |",
                "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
        if "subspace" in result:
            o, m = result["subspace"]["out_of_core"], result["subspace"]["numpy"]
            out.append(f"The streaming SVD took {o['iterations']} iterations ({o['passes']} passes over the file); "
                       f"on the in-memory rows it matched numpy's scores within {m['max_score_diff_relative']:.1e} "
                       f"of their scale ({m['streaming_iterations']} iterations, {m['streaming_same_rows_s']} s "
                       f"against numpy's {m['numpy_s']} s).")
        if "pool-side" in result:
            o = result["pool-side"]["out_of_core"]
            out.append(f"The pool-side steps fitted on {o['fit_rows']:,} sampled rows and scored all "
                       f"{o['rows']:,} (student AUROC {o['student_auroc']:.3f}, its synthetic teacher's "
                       f"{o['teacher_auroc']:.3f}).")
        out.append("")
    g = result.get("guard-filter")
    if g:
        out += ["| `saft filter --detector guard` rows | input MiB | sentence encoder | s | peak RSS MiB | "
                "kept + removed |", "|---|---|---|---|---|---|"]
        out += [f"| {r['rows']:,} | {r.get('input_mib', '')} | {r.get('encoder', 'all-MiniLM-L6-v2')} | {r['s']} | "
                f"{r['peak_rss_mib']:.0f} | {r['kept_plus_removed']:,} |" for r in g]
        long = [r for r in g if _long_rows(r)]
        short = [r for r in g if r.get("encoder") == "stand-in" and r not in long]
        for r in long[:1] if short else []:
            out.append(f"\nOn the {r['input_mib'] / 1024:.1f} GiB JSONL file ({r['rows']:,} long rows, stand-in "
                       f"encoder) peak RSS is {r['peak_rss_mib'] - short[0]['peak_rss_mib']:+.0f} MiB from the "
                       f"stand-in's {short[0]['rows']:,} short rows.")
        for enc in dict.fromkeys(r.get("encoder", "all-MiniLM-L6-v2") for r in g):
            runs = [r for r in g if r.get("encoder", "all-MiniLM-L6-v2") == enc and r not in long]
            if len(runs) > 1:
                a, b = runs[0], runs[-1]
                out.append(f"\nWith the {enc} encoder, peak RSS grows by {b['peak_rss_mib'] - a['peak_rss_mib']:.0f} "
                           f"MiB from {a['rows']:,} to {b['rows']:,} rows "
                           f"({(b['peak_rss_mib'] - a['peak_rss_mib']) * 2**20 / (b['rows'] - a['rows']):.0f} bytes a "
                           "row).")
        if any(r.get("encoder") == "stand-in" for r in g):
            out.append("\nThe stand-in gives random unit rows of the encoder's shape at no cost, so its runs measure "
                       "everything else (reading, the view file, scoring, writing) on more rows than the encoder's "
                       "CPU time allows here.")
        out.append("")
    e = result.get("extraction")
    if e:
        out += ["| extraction (embedded model, layer %d, demo rows) | value |" % e["layer"], "|---|---|",
                f"| fp32 matmul rate measured ({e['threads']} thread(s)) | {e['fp32_matmul_gflops']} GFLOP/s |",
                f"| extractor | {e['ours_tokens_per_s']} tokens/s ({e['rows']} rows, {e['tokens']} tokens) |",
                f"| FLOP utilisation (2 x block weights x {e['layer']} blocks per token) | {e['flop_utilisation']:.0%} |",
                f"| naive loop (one sample at a time, full model) | {e['naive_tokens_per_s']} tokens/s "
                f"({e['naive_rows']} rows); extractor {e['speedup_vs_naive']}x |",
                f"| whole default filter (`{e['default_detector']}`) from an empty cache | {e['default_filter_s']} s for "
                f"{e['demo_rows']} rows = {e['default_s_per_1k']} s per 1k ({e['default_rows_computed']} rows run "
                f"through the model) |",
                f"| the paper's filter next, same cache | {e['paper_filter_s']} s ({e['paper_rows_computed']} rows run "
                f"through the model) |", ""]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--step":  # one measured step, in its own process
        sys.path.insert(0, str(ROOT / "src"))
        res = STEPS[sys.argv[2]](json.loads(sys.argv[3]))
        res["peak_rss_mib"] = round(_rss_mib(), 1)
        res["process_cpu_s"] = round(_cpu_s(), 1)
        print(json.dumps(res))
        raise SystemExit(0)
    raise SystemExit("run this suite with: python benchmarks/run.py scale [options]")
