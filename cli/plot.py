"""`gradstore plot`: one PNG with the score distribution per encoding and the selection's make-up.

Left: a histogram of every row's score for each encoding (the same query at each encoding).
Right: the share of each source/category value in the top-k selection (at the first
encoding) beside its share of the whole pool, so enrichment is visible at a glance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from gradstore.ops import parse_k


def plot_selection(store, out_path, tasks: Sequence[str], encodings: Sequence[str] | None = None,
                   k: str = "5%", set_name: str | None = None, field: str = "category") -> dict:
    """Write the PNG to `out_path`; return the plotted numbers (per-encoding scores summary, shares).

    `encodings` defaults to every encoding the train set holds.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from gradstore.query import compose, default_train_set

    set_name = set_name or default_train_set(store)
    encodings = list(encodings or store.set_info(set_name)["encodings"])
    base = compose(store, tasks, "100%", set_name=set_name).replace("TOP 100%", "SCORE", 1)
    scores = {enc: store.query(f"{base} ENCODING {enc}").scores for enc in encodings}
    first = store.query(f"{base} ENCODING {encodings[0]}")
    order = np.lexsort((first.rows, -first.scores.astype(np.float64)))
    chosen = order[:parse_k(k, len(order))]
    values = [r.get(field) for r in first.records]
    pool = Counter(values)
    picked = Counter(values[i] for i in chosen)
    labels = [v for v, _ in pool.most_common()]

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for enc, s in scores.items():
        left.hist(s, bins=50, histtype="step", linewidth=1.5, label=enc)
    left.set(title=f"scores by {', '.join(tasks)}", xlabel="score", ylabel="rows")
    left.legend()
    x = np.arange(len(labels))
    right.bar(x - 0.2, [pool[v] / len(values) for v in labels], 0.4, label="pool")
    right.bar(x + 0.2, [picked[v] / len(chosen) for v in labels], 0.4, label=f"top {k} ({encodings[0]})")
    right.set_xticks(x, [str(v) for v in labels], rotation=40, ha="right")
    right.set(title=f"selection by {field}", ylabel="share")
    right.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return {"rows": len(values), "selected": len(chosen),
            "scores": {enc: {"mean": float(s.mean()), "std": float(s.std())} for enc, s in scores.items()},
            "pool_share": {str(v): pool[v] / len(values) for v in labels},
            "selection_share": {str(v): picked[v] / len(chosen) for v in labels}}
