"""Ratings baseline bench (issue 18): stage-1 satisfaction g (naive and IPS) against a logistic matrix
factorisation trained on the same rows, both scored on the MAR (randomly assigned) test ratings.

    .venv/bin/python bench/ratings_baseline.py [DIR] [--seeds 0,1] [--tables frozen,fine_tune] [--out RUNS]
        [--out-json FILE] [--set k=v ...]

DIR: the output of `python -m satrank.pipeline.sources.ratings` (train/ valid/ test/ Parquet + satrank.yaml).
Without DIR, per seed, a rating set is simulated in the Yahoo! R3 triplet layout (`user<TAB>item<TAB>rating`
train / test files; `simulate_triplets`), converted with the converter's main, and the bench runs on that:
users x items with latent-factor ratings 1..5; the training file is self-selected (whether a user rated an item
rises with the rating, and with the item's popularity), the test file holds `--test-per-user` items per user
assigned uniformly at random (MAR), as in the public sets.

Per seed it runs, as a user would (torchrun, `--nproc` gloo ranks, `--config DIR/satrank.yaml`, train.seed = the
seed): jobs.pretrain -> jobs.propensity -> jobs.satisfaction with satisfaction.loss=naive and =ips, once per
`--tables` variant (satisfaction.tables: frozen = the paper's g on the click model's frozen tables, as the written
config has it; fine_tune / own = g trains its tables; mf = g as a logistic MF on its own tables with Adam on the
user table; TABLES holds each variant's settings); and the
baseline `logistic_mf` (plain torch, one process): on the answered training rows (label = satisfied),
logit = <p_u, q_i> + b_u + b_i + b, where p_u / q_i also sum an embedding of each of the converter's side features
(user_* / item_* columns, Coat), Adam with L2, early-stopped on the valid split's AUC. Every figure is the MAR-test
AUC: the satisfaction job's metrics.json `test.auc_answered` (every MAR row is answered) and the same AUC
(satrank.models.metrics.ranking.auc) of the baseline's predictions on DIR/test.

Prints ONE JSON line: {"bench": "ratings_baseline", "satrank_naive_auc", "satrank_ips_auc" (the last --tables
variant's), "mf_auc" (means over seeds), "satrank_<loss>_auc_<variant>" for every variant, "per_seed": {...},
"seeds", "sizes", "overrides", "wall_s"}; docs/benchmarks.md "Ratings baseline" has the figures. Runs live under --out/seed<k>/; a job whose
metrics.json exists is reused (bench/alignment.stage), so an interrupted bench resumes; --fresh starts over.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import stage  # noqa: E402  (bench/_stages.py: one torchrun stage, reused when it has metrics.json)

TRAIN_FILE, TEST_FILE = "ydata-ymusic-rating-study-v1_0_train.txt", "ydata-ymusic-rating-study-v1_0_test.txt"
# P(rated | rating r) relative weights: self-selection on the rating (Yahoo! R3's users rate mostly what they love
# or hate; here monotone, as in Marlin & Zemel's analysis: high ratings are over-represented in the MNAR file)
SELECT_W = (0.15, 0.2, 0.35, 0.7, 1.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate_triplets(root: Path, seed: int = 0, users: int = 300, items: int = 300, dim: int = 4,
                      train_per_user: float = 30.0, test_per_user: int = 15) -> Dict[str, object]:
    """root/{TRAIN_FILE, TEST_FILE}: Yahoo! R3 triplets (raw ids 1..users, 1..items) of a latent-factor world.

    Rating of (u, i): z = b_u + b_i + <x_u, y_i> / sqrt(dim) + N(0, 0.5), cut at fixed thresholds into 1..5 (about
    20% each over all cells). Train (MNAR): each cell is rated with probability c * pop_i * SELECT_W[r - 1], c set
    so a user rates `train_per_user` items on average. Test (MAR): `test_per_user` items per user, uniformly
    without replacement, every one rated (as Yahoo! R3's survey). Returns the world's summary."""
    rng = np.random.default_rng(seed)
    xu, yi = rng.normal(0, 1, (users, dim)), rng.normal(0, 1, (items, dim))
    bu, bi = rng.normal(0, 0.5, users), rng.normal(0, 0.8, items)
    z = bu[:, None] + bi[None, :] + xu @ yi.T / np.sqrt(dim) + rng.normal(0, 0.5, (users, items))
    cuts = np.quantile(z, [0.2, 0.4, 0.6, 0.8])
    rating = 1 + np.searchsorted(cuts, z)  # users x items, 1..5
    pop = rng.lognormal(0.0, 0.6, items)
    weight = pop[None, :] * np.asarray(SELECT_W)[rating - 1]
    p_rate = np.minimum(1.0, weight * (train_per_user * users / weight.sum()))
    rated = rng.random((users, items)) < p_rate
    tu, ti = np.nonzero(rated)
    mu = np.repeat(np.arange(users), test_per_user)
    mi = np.concatenate([rng.choice(items, test_per_user, replace=False) for _ in range(users)])
    root.mkdir(parents=True, exist_ok=True)
    for name, (u, i) in ((TRAIN_FILE, (tu, ti)), (TEST_FILE, (mu, mi))):
        lines = [f"{a + 1}\t{b + 1}\t{r}\n" for a, b, r in zip(u.tolist(), i.tolist(), rating[u, i].tolist())]
        (root / name).write_text("".join(lines))
    return {"users": users, "items": items, "dim": dim, "train_ratings": int(len(tu)),
            "test_ratings": int(len(mu)), "mean_rating_train": round(float(rating[tu, ti].mean()), 3),
            "mean_rating_test": round(float(rating[mu, mi].mean()), 3),
            "mean_rating_all": round(float(rating.mean()), 3)}


def convert(src: Path, out: Path, seed: int, threshold: int = 4) -> dict:
    """The converter's main on Yahoo! R3 triplets (in this process, its summary line kept off stdout)."""
    from satrank.pipeline.sources import ratings

    with contextlib.redirect_stdout(io.StringIO()):
        code = ratings.main(["--format", "triplets", "--src", str(src), "--out", str(out), "--overwrite",
                             "--positive-threshold", str(threshold), "--seed", str(seed)])
    if code != 0:
        raise SystemExit(f"bench/ratings_baseline: the converter failed on {src} (exit {code})")
    return json.loads((out / "convert.json").read_text())


# ------------------------------------------------------------------------------------------ the MF baseline
def side_features(data: Path) -> List[str]:
    """The converter's side features: the sparse features of DIR/satrank.yaml other than the ids."""
    import yaml

    cfg = yaml.safe_load((data / "satrank.yaml").read_text())
    return [f["column"] for f in cfg["data"]["sparse"] if f["column"] not in ("user_id", "item_id")]


def read_split(data: Path, split: str, columns: Sequence[str], answered_only: bool = True) -> Dict[str, np.ndarray]:
    files = sorted((data / split).glob("*.parquet"))
    t = pq.read_table(files, columns=[*columns, "questionnaire_answered", "satisfied"]) if len(files) > 1 else \
        pq.read_table(files[0], columns=[*columns, "questionnaire_answered", "satisfied"])
    out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    if answered_only:
        keep = out["questionnaire_answered"] == 1
        out = {c: v[keep] for c, v in out.items()}
    out["satisfied"] = out["satisfied"].astype(np.float32)
    return out


class LogisticMF(torch.nn.Module):
    """logit = <p_u, q_i> + b_u + b_i + b; p_u (q_i) sums the user (item) embedding and one per side feature."""

    def __init__(self, sizes: Dict[str, int], dim: int):
        super().__init__()
        self.emb = torch.nn.ModuleDict({c: torch.nn.Embedding(n, dim) for c, n in sizes.items()})
        self.bias = torch.nn.ModuleDict({c: torch.nn.Embedding(n, 1) for c, n in sizes.items()})
        for m in [*self.emb.values()]:
            torch.nn.init.normal_(m.weight, std=0.1)
        for m in self.bias.values():
            torch.nn.init.zeros_(m.weight)
        self.b = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        p = sum(self.emb[c](x[c]) for c in x if c == "user_id" or c.startswith("user_"))
        q = sum(self.emb[c](x[c]) for c in x if c == "item_id" or c.startswith("item_"))
        return (p * q).sum(-1) + sum(self.bias[c](x[c]).squeeze(-1) for c in x) + self.b


def logistic_mf(data: Path, seed: int = 0, dim: int = 16, weight_decay: float = 1e-4, lr: float = 0.01,
                epochs: int = 60, batch_size: int = 256, patience: int = 5) -> Dict[str, object]:
    """Train on DIR/train's answered rows (label satisfied), early-stop on DIR/valid's AUC, score DIR/test."""
    from satrank.models.metrics.ranking import auc

    cols = ["user_id", "item_id", *side_features(data)]
    tr, va, te = (read_split(data, s, cols) for s in ("train", "valid", "test"))
    sizes = {c: int(max(tr[c].max(), va[c].max(), te[c].max())) + 1 for c in cols}
    torch.manual_seed(seed)
    model = LogisticMF(sizes, dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    as_t = lambda d: {c: torch.from_numpy(d[c].astype(np.int64)) for c in cols}  # noqa: E731
    xtr, xva, xte = as_t(tr), as_t(va), as_t(te)
    ytr = torch.from_numpy(tr["satisfied"])
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, bad = -1.0, None, -1, 0
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(batch_size):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model({c: v[idx] for c, v in xtr.items()}), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            v = auc(model(xva).numpy(), va["satisfied"])
        if v > best:
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        test_auc = auc(model(xte).numpy(), te["satisfied"])
    return {"test_auc": round(test_auc, 4), "valid_auc": round(best, 4), "best_epoch": best_epoch,
            "train_rows": int(len(ytr)), "test_rows": int(len(te["satisfied"])), "side_features": cols[2:],
            "dim": dim, "weight_decay": weight_decay}


# ------------------------------------------------------------------------------------------ satrank's stage 1
# satisfaction.tables variants (models/stage1/config.py) -> the satisfaction job's extra settings. frozen is the
# paper's g (and the converter's config as written); trained tables need drop_last (gloo, row-wise tables) and, as
# they overfit within a few epochs on a few thousand ratings, a validation every epoch over 10 epochs instead of
# every 5 over 30 (docs/benchmarks.md "Ratings baseline"). mf is the variant that matches the MF (docs/stage1.md).
TABLES = {
    "frozen": [],
    "fine_tune": ["satisfaction.tables=fine_tune", "satisfaction_train.drop_last=true", "satisfaction_train.epochs=10",
                  "satisfaction_train.eval_every=1"],
    "own": ["satisfaction.tables=own", "satisfaction_train.drop_last=true", "satisfaction_train.epochs=10",
            "satisfaction_train.eval_every=1"],
    # g as a logistic MF straight off its own tables (satisfaction.form: mf), with the optimisers the MF needs on CPU:
    # Adam + L2 on the user table (data_parallel, so torch's Adam updates it), element-wise Adagrad + L2 on the item
    # table (fused; it also serves the histories); slower to peak, so 40 epochs with early stopping (patience 5)
    "mf": ["satisfaction.tables=own", "satisfaction.form=mf", "satisfaction_train.drop_last=true",
           "satisfaction_train.epochs=40", "satisfaction_train.eval_every=1", "satisfaction_train.patience=5",
           "embeddings.tables.user.sharding=data_parallel",
           "embeddings.data_parallel_optimizer={type: adam, lr: 0.01, weight_decay: 3.0e-4}",
           "embeddings.optimizer.type=exact_adagrad", "embeddings.optimizer.weight_decay=3.0e-4"],
}
# per (variant, loss) settings on top of TABLES: the ips loss weighs each answer by 1/rho_hat, so its value (and the
# gradient of its data term) is ~8x naive's on this set (4.75 vs 0.58 at seed 0); the tables' L2, applied by the
# optimisers beside that gradient, is scaled by the same factor to keep its relative strength (docs/benchmarks.md)
LOSS_SETS = {
    ("mf", "ips"): ["embeddings.data_parallel_optimizer={type: adam, lr: 0.01, weight_decay: 2.4e-3}",
                    "embeddings.optimizer.weight_decay=2.4e-3"],
}


def run_stage1(data: Path, run: Path, seed: int, nproc: int, overrides: Sequence[str],
               tables: Sequence[str] = ("frozen",)) -> Dict[str, Dict[str, dict]]:
    """pretrain -> propensity -> satisfaction (naive, ips) per satisfaction.tables variant on DIR with
    DIR/satrank.yaml; {variant: {loss: metrics.json}}."""
    run.mkdir(parents=True, exist_ok=True)
    common = [f"--config={data / 'satrank.yaml'}", f"--set=train.seed={seed}", *[f"--set={o}" for o in overrides]]
    d = ["--data", str(data)]
    stage(run, "pretrain", nproc, "satrank.jobs.pretrain", d, common)
    stage(run, "propensity", nproc, "satrank.jobs.propensity", d, common)
    init = ["--init", str(run / "pretrain"), "--propensity", str(run / "propensity")]
    out: Dict[str, Dict[str, dict]] = {}
    for t in tables:
        sets = [f"--set={x}" for x in TABLES[t]]
        suffix = "" if t == "frozen" else f"_{t}"
        out[t] = {loss: stage(run, f"sat_{loss}{suffix}", nproc, "satrank.jobs.satisfaction", [*d, *init],
                              [*common, *sets, *[f"--set={x}" for x in LOSS_SETS.get((t, loss), [])],
                               f"--set=satisfaction.loss={loss}"]) for loss in ("ips", "naive")}
    return out


def _test_auc(m: dict) -> Optional[float]:
    v = (m.get("test") or {}).get("auc_answered")
    return None if v is None else round(float(v), 4)


def _mean(xs: List[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 4) if xs else None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/ratings_baseline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", type=Path, default=None,
                   help="a converter output dir (satrank.pipeline.sources.ratings); none: simulate one per seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (and world seeds when simulating)")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--train-per-user", type=float, default=30.0, help="mean self-selected ratings per user")
    p.add_argument("--test-per-user", type=int, default=15, help="randomly assigned (MAR) ratings per user")
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks per job")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ratings")
    p.add_argument("--out-json", type=Path, default=None, help="also write the JSON line here")
    p.add_argument("--fresh", action="store_true", help="delete the seeds' earlier runs first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every satrank job (repeatable), e.g. satisfaction_train.epochs=50")
    p.add_argument("--tables", default="frozen,fine_tune",
                   help=f"satisfaction.tables variants to run, from {','.join(TABLES)}; the last one gives "
                        "satrank_naive_auc / satrank_ips_auc (each variant also reports satrank_<loss>_auc_<variant>)")
    p.add_argument("--mf-weight-decays", default="", help="comma-separated extra L2 settings of the MF, each "
                   "reported as mf_auc_wd<x> (mf_auc stays at the bench's 1e-4)")
    p.add_argument("--mf-bias-only", action="store_true",
                   help="also report mf_bias_only_auc: the MF with dim 0 (user, item and feature biases only)")
    p.add_argument("--mf-only", action="store_true", help="skip satrank's jobs (the MF lines only)")
    a = p.parse_args(argv)
    a.mf_weight_decays = [float(x) for x in a.mf_weight_decays.split(",") if x]
    tables = [t for t in a.tables.split(",") if t]
    if not tables or any(t not in TABLES for t in tables):
        p.error(f"--tables: choose from {list(TABLES)}, got {a.tables!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",") if s != ""]
    started = time.time()
    per_seed: Dict[int, dict] = {}
    for seed in seeds:
        run = a.out / f"seed{seed}"
        if a.fresh and run.exists():
            shutil.rmtree(run)
        res: Dict[str, object] = {}
        data = a.data
        if data is None:
            data = run / "data"
            if not (data / "convert.json").is_file():
                res["world"] = simulate_triplets(run / "raw", seed, a.users, a.items,
                                                 train_per_user=a.train_per_user, test_per_user=a.test_per_user)
                (run / "world.json").write_text(json.dumps(res["world"]))
                convert(run / "raw", data, seed)
            res["world"] = json.loads((run / "world.json").read_text())
        conv = json.loads((data / "convert.json").read_text())
        res["rows"] = conv["rows_written_by_split"]
        res["satisfied_rate"] = conv.get("satisfied_rate")
        t0 = time.time()
        mf = logistic_mf(data, seed)
        mf["wall_s"] = round(time.time() - t0, 1)
        res["mf"] = mf
        for wd in a.mf_weight_decays:  # the MF's sensitivity to its L2 (docs/benchmarks.md "Ratings baseline")
            res[f"mf_wd{wd:g}"] = logistic_mf(data, seed, weight_decay=wd)
        if a.mf_bias_only:  # user + item biases only: what a model that learns no interaction reaches
            res["mf_bias_only"] = logistic_mf(data, seed, dim=0, weight_decay=0.0)
        if a.mf_only:
            per_seed[seed] = res
            continue
        t0 = time.time()
        sat = run_stage1(data, run, seed, a.nproc, a.overrides, tables)
        res["satrank_wall_s"] = round(time.time() - t0, 1)
        for t, by_loss in sat.items():
            for loss, m in by_loss.items():
                res[f"satrank_{loss}_{t}"] = {
                    "test_auc": _test_auc(m), "valid_auc": m.get("auc_answered"),
                    "test_answered_logloss": (m.get("test") or {}).get("answered_logloss"),
                    "best_epoch": (m.get("fit") or {}).get("best_epoch")}
        per_seed[seed] = res
        print(f"[ratings_baseline] seed {seed}: " + ", ".join(
            f"{loss}/{t} {res[f'satrank_{loss}_{t}']['test_auc']}" for t in tables for loss in ("naive", "ips"))
            + f", mf {mf['test_auc']}", file=sys.stderr, flush=True)

    def mean_of(key: str) -> Optional[float]:
        return _mean([r[key]["test_auc"] for r in per_seed.values() if key in r])

    head = tables[-1]
    out = {"bench": "ratings_baseline",
           "satrank_naive_auc": mean_of(f"satrank_naive_{head}"), "satrank_ips_auc": mean_of(f"satrank_ips_{head}"),
           "mf_auc": mean_of("mf"), "satrank_tables": head,
           **{f"mf_auc_wd{wd:g}": mean_of(f"mf_wd{wd:g}") for wd in a.mf_weight_decays},
           **({"mf_bias_only_auc": mean_of("mf_bias_only")} if a.mf_bias_only else {}),
           **{f"satrank_{loss}_auc_{t}": mean_of(f"satrank_{loss}_{t}") for t in tables for loss in ("naive", "ips")},
           "data": str(a.data) if a.data else "simulated",
           "seeds": seeds, "overrides": a.overrides, "nproc": a.nproc,
           "sizes": None if a.data else {"users": a.users, "items": a.items, "train_per_user": a.train_per_user,
                                         "test_per_user": a.test_per_user},
           "per_seed": per_seed, "wall_s": round(time.time() - started, 1)}
    line = json.dumps(out, default=str)
    if a.out_json is not None:
        a.out_json.parent.mkdir(parents=True, exist_ok=True)
        a.out_json.write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
