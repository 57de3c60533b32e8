"""Sensitivity of guard-knn to its layer and neighbour count, on the cached pools of benchmarks/detect.py.

    python benchmarks/guard_knn_sweep.py

Label-free AUROC at prompt_last for layers 10/15/20/24 and n_neighbors 5/10/20/40, on the rows whose prompt the
guard never saw. The shipped default (middle layer = 15, 10 neighbours) was fixed before this sweep; the table
shows how much a choice tuned on these pools would add, which is why it is not used to move the default.
Rewrites the guard-knn-sweep section of RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import write_results_md  # noqa: E402
from detect_plus import unseen_pools  # noqa: E402

from saft import get_detector  # noqa: E402

LAYERS, NEIGHBOURS = (10, 15, 20, 24), (5, 10, 20, 40)


def main() -> int:
    t0 = time.time()
    pools = unseen_pools(LAYERS)
    lines = ["Command: `python benchmarks/guard_knn_sweep.py`; pools and seeds as in detect.py, unseen rows only.", "",
             "| layer | n_neighbors | " + " | ".join(pools) + " | mean T+B |", "|---|---|" + "---|" * (len(pools) + 1)]
    for layer in LAYERS:
        for k in NEIGHBOURS:
            aucs = {}
            for name, (y, S, H) in pools.items():
                X = np.hstack([S, H[layer]])
                aucs[name] = roc_auc_score(y, get_detector("guard-knn", n_neighbors=k).fit(X).score_samples(X))
            dev = np.mean([v for p, v in aucs.items() if p[0] in "TB"])
            row = f"| {layer} | {k} | " + " | ".join(f"{v:.3f}" for v in aucs.values()) + f" | {dev:.3f} |"
            print(row, flush=True)
            lines.append(row)
    lines.append(f"\n{time.time() - t0:.0f} s.")
    write_results_md("\n".join(lines), key="guard-knn-sweep", title="guard-knn: layer and neighbours (benchmarks/guard_knn_sweep.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
