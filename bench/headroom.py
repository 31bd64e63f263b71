"""Headroom of the candidate sets: true_sat@k / true_click@k of a random ranking, the click oracle and the
satisfaction oracle, read from DIR/candidates alone (no model, no training). Prints ONE JSON line.

Why: `satrank.jobs.evaluate` reports a model's true_sat@k between these bounds (true_sat@k_headroom_share);
the bounds themselves say how much a world leaves to win by ranking for satisfaction rather than clicks,
before any model is trained. "random" is the exact expectation of a uniformly random ranking (a constant
score: one tie block per request, which `topk_true_mean` scores by its mean truth). The figures use the
same functions as the evaluation (satrank.models.metrics.ranking), so they match its oracle keys exactly.

    python bench/headroom.py --data DIR [--data DIR2 ...] [--k 10]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from satrank.models.metrics.ranking import headroom_share, oracle_topk_metrics, truth_topk_metrics

COLUMNS = ["request_id", "true_p_satisfied", "true_p_click"]


def headroom(data: Path, k: int) -> dict:
    """{random, oracle_click, oracle_sat: {true_sat@k, true_click@k}} and the random ranking's headroom share."""
    files = sorted((data / "candidates").glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{data / 'candidates'}: no part-*.parquet (is --data a simulator output?)")
    cols = {c: [] for c in COLUMNS}
    for f in files:
        t = pq.read_table(f, columns=COLUMNS)
        for c in COLUMNS:
            cols[c].append(t.column(c).to_numpy())
    g, sat, click = (np.concatenate(cols[c]) for c in COLUMNS)
    truth = {"true_p_satisfied": sat, "true_p_click": click}
    rand = truth_topk_metrics(np.zeros(len(g)), truth, g, k)
    oracle = oracle_topk_metrics(truth, g, k)
    keys = (f"true_sat@{k}", f"true_click@{k}")
    out = {"random": rand}
    for name in ("oracle_click", "oracle_sat"):
        out[name] = {key: oracle[f"{key}_{name}"] for key in keys}
    s = keys[0]
    out["random_headroom_share"] = headroom_share(rand[s], out["oracle_click"][s], out["oracle_sat"][s])
    out["requests"], out["rows"] = int(np.unique(g).size), int(len(g))
    world = data / "world.json"
    if world.is_file():
        st = json.loads(world.read_text())["stats"]
        out["click_rate"], out["answer_rate"] = st["click_rate"], st["answer_rate"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, action="append", required=True, help="simulator output (repeatable)")
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    try:
        res = {str(d): headroom(d, args.k) for d in args.data}
    except (OSError, KeyError, ValueError) as exc:
        print(f"headroom: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"bench": "headroom", "k": args.k, "worlds": res}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
