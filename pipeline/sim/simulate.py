"""`satrank simulate`: write a simulated short-video impression log plus candidate sets to Parquet.

Why: the pipeline, SAQRec-style satisfaction models and EASQ-style alignment are all tested
against a world with known ground truth (`true_p_*` columns). Impressions are generated in
rounds (each taking user gets one impression per round), so per-user history ring buffers
update vectorised and every history is causal. Output is streamed shard by shard (bounded
memory), deterministic for a seed, in the canonical schema (docs/HELPERS_BRIEF.md,
docs/simulator.md). World and formulas: pipeline/sim/world.py.

    python -m satrank.pipeline.sim.simulate --out DIR --users U --items I --impressions N --seed S \
        [--config CFG] [--set key.path=value ...] [--overwrite]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from satrank.pipeline.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from satrank.pipeline.features import DataConfig
from satrank.pipeline.sim.world import (HISTORY_CAPS, N_ACTIVITY, HistoryBuffers, SimulateConfig, World, _sigmoid,
                                build_world, exposure_probs, feed_back, sample_exposures, true_probs, watch_fraction)

__all__ = ["SimulateConfig", "simulate", "main", "IMPRESSION_SCHEMA", "CANDIDATE_SCHEMA", "ITEM_SCHEMA", "ITEMS_PATH",
           "check_vocab"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sim.yaml"
SPLITS = ("train", "valid", "test")
HIST = list(HISTORY_CAPS)
_L = pa.list_(pa.int64())
_KEYS = [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
         ("request_id", pa.int64()), ("author_id", pa.int64()), ("category_id", pa.int64()),
         ("user_activity", pa.int64())]
_TRUTH = [("true_p_click", pa.float32()), ("true_p_satisfied", pa.float32()), ("true_p_answered", pa.float32())]
IMPRESSION_SCHEMA = pa.schema(
    _KEYS + [(h, _L) for h in HIST] + [("duration_s", pa.float32()), ("click", pa.int8()),
    ("watch_time_s", pa.float32()), ("skip", pa.int8()), ("questionnaire_answered", pa.int8()),
    ("satisfied", pa.int8())] + _TRUTH)
CANDIDATE_SCHEMA = pa.schema(
    [("request_id", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
     ("author_id", pa.int64()), ("category_id", pa.int64()), ("user_activity", pa.int64())]
    + [(h, _L) for h in HIST] + [("duration_s", pa.float32())] + _TRUTH)
# the item attribute table (one row per item id 0..items-1), like the video feature table industrial logs ship
ITEM_SCHEMA = pa.schema([("item_id", pa.int64()), ("author_id", pa.int64()), ("category_id", pa.int64()),
                         ("duration_s", pa.float32())])
ITEMS_PATH = "items/part-00000.parquet"


class ShardWriter:
    """Streams time-ordered tables into DIR/part-NNNNN.parquet: `shard_rows` rows per shard, row
    groups of `row_group_rows`; each shard is written under a temp name and renamed when complete."""

    def __init__(self, directory: Path, schema: pa.Schema, shard_rows: int, row_group_rows: int, compression: str):
        self.dir, self.schema = directory, schema
        self.shard_rows, self.rg, self.compression = shard_rows, row_group_rows, compression
        self.pending: List[pa.Table] = []
        self.pending_rows = self.written = self.shards = self.rows = 0
        self.writer: Optional[pq.ParquetWriter] = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def _tmp(self) -> Path:
        return self.dir / f".part-{self.shards:05d}.parquet.tmp"

    def _write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._tmp(), self.schema, compression=self.compression)
        self.writer.write_table(table.combine_chunks(), row_group_size=self.rg)
        self.written += table.num_rows

    def _flush(self, final: bool) -> None:
        while self.pending_rows >= self.rg or (final and self.pending_rows):
            t = pa.concat_tables(self.pending)
            n = min(self.rg, t.num_rows)
            self._write(t.slice(0, n))
            rest = t.slice(n)
            self.pending = [rest] if rest.num_rows else []
            self.pending_rows -= n

    def _close_shard(self) -> None:
        self._flush(final=True)
        if self.writer is not None:
            self.writer.close()
            os.replace(self._tmp(), self.dir / f"part-{self.shards:05d}.parquet")
            self.writer, self.written = None, 0
            self.shards += 1

    def write(self, table: pa.Table) -> None:
        off = 0
        while off < table.num_rows:
            take = min(self.shard_rows - self.written - self.pending_rows, table.num_rows - off)
            self.pending.append(table.slice(off, take))
            self.pending_rows += take
            self.rows += take
            off += take
            self._flush(final=False)
            if self.written + self.pending_rows == self.shard_rows:
                self._close_shard()

    def close(self) -> None:
        self._close_shard()


def _hist_columns(hist: HistoryBuffers, users: np.ndarray) -> List[pa.Array]:
    cols = []
    for name in HIST:
        offsets, values = hist.snapshot(name, users)
        cols.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64())))
    return cols


def _f32(x: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(x, dtype=np.float32))


class _Stats:
    """Running sums over all impressions, including latent (unwritten) satisfaction."""

    def __init__(self) -> None:
        self.s: Dict[str, float] = {}
        self.by_act = np.zeros((3, N_ACTIVITY))  # impressions, answered, clicked per activity bucket

    def add(self, **kw: float) -> None:
        for k, v in kw.items():
            self.s[k] = self.s.get(k, 0.0) + float(v)

    def summary(self, users_per_bucket: np.ndarray) -> Dict[str, object]:
        s, n = self.s, max(self.s.get("n", 0.0), 1.0)
        r = lambda a, b: (s.get(a, 0.0) / s[b]) if s.get(b, 0.0) > 0 else None  # noqa: E731
        imp, ans, clk = self.by_act
        return {
            "impressions": int(s.get("n", 0)), "click_rate": s.get("click", 0) / n,
            "satisfied_rate_latent": s.get("sat", 0) / n, "skip_rate": s.get("skip", 0) / n,
            "answer_rate": s.get("ans", 0) / n, "mean_watch_time_s": s.get("watch", 0) / n,
            "clicked_dissatisfied_share": r("click_dis", "click"),
            "expected_clicked_dissatisfied_share": r("pc_dis", "pc"),
            "answer_rate_given_satisfied": r("ans_sat", "sat"),
            "answer_rate_given_dissatisfied": r("ans_dis", "dis"),
            "answer_rate_given_click": r("ans_click", "click"),
            "observed_satisfied_rate_answered": r("ans_sat", "ans"),
            "mean_true_p_satisfied_answered": r("ps_ans", "ans"),
            "mean_true_p_satisfied": s.get("ps", 0) / n, "mean_true_p_click": s.get("pc", 0) / n,
            "mean_true_p_answered": s.get("pa", 0) / n,
            "impressions_per_user_by_activity": (imp / np.maximum(users_per_bucket, 1)).tolist(),
            "answer_rate_by_activity": (ans / np.maximum(imp, 1)).tolist(),
            "click_rate_by_activity": (clk / np.maximum(imp, 1)).tolist(),
        }


def _round(world: World, cfg: SimulateConfig, hist: HistoryBuffers, rng: np.random.Generator,
           rnd: int, row0: int, limit: int, stats: _Stats) -> Optional[pa.Table]:
    """One round: users take part w.p. their activity's participation; one impression each."""
    users = np.flatnonzero(rng.random(cfg.users) < world.participation).astype(np.int64)
    offs = rng.integers(0, cfg.round_seconds, size=len(users))
    order = np.lexsort((users, offs))[:limit]
    users, offs = users[order], offs[order]
    b = len(users)
    if b == 0:
        return None
    items = sample_exposures(world, cfg, users, rng)
    pc, ps, pa_, base = true_probs(world, cfg, users, items)
    u_click, u_sat, u_ans = rng.random((3, b))
    click, sat = u_click < pc, u_sat < ps
    dur = world.duration[items]
    f_sat = rng.beta(*cfg.watch_beta_satisfied, size=b)
    f_dis = rng.beta(*cfg.watch_beta_dissatisfied, size=b)
    scroll = rng.exponential(cfg.scroll_mean_s, size=b)
    watch = np.where(click, dur * np.where(sat, f_sat, f_dis), np.minimum(scroll, dur)).astype(np.float32)
    answer_logit = base + cfg.answer_w_click * click + cfg.answer_w_satisfied * sat
    if cfg.answer_w_watch != 0.0:
        answer_logit = answer_logit + cfg.answer_w_watch * watch_fraction(watch.astype(np.float64), dur)
    answered = u_ans < _sigmoid(answer_logit)
    skip = watch < cfg.skip_threshold_s
    feed_back(world, cfg, users, items, click, sat)  # sat_feedback > 0: later rounds' clicks (not this one's)
    hcols = _hist_columns(hist, users)  # histories strictly before this round
    for name, mask in (("hist_click", click), ("hist_satisfied", answered & sat),
                       ("hist_dissatisfied", answered & ~sat), ("hist_skip", skip)):
        hist.push(name, users[mask], items[mask])
    act = world.activity[users]
    stats.add(n=b, click=click.sum(), sat=sat.sum(), dis=(~sat).sum(), skip=skip.sum(), ans=answered.sum(),
              watch=watch.sum(dtype=np.float64), click_dis=(click & ~sat).sum(), ans_sat=(answered & sat).sum(),
              ans_dis=(answered & ~sat).sum(), ans_click=(answered & click).sum(), pc=pc.sum(), ps=ps.sum(),
              pa=pa_.sum(), pc_dis=(pc * (1 - ps)).sum(), ps_ans=ps[answered].sum())
    for k, v in enumerate((np.ones(b), answered, click)):
        stats.by_act[k] += np.bincount(act, weights=v.astype(np.float64), minlength=N_ACTIVITY)
    ts = cfg.start_timestamp + rnd * cfg.round_seconds + offs
    arrays = [pa.array(users), pa.array(items), pa.array(ts.astype(np.int64)),
              pa.array(np.arange(row0, row0 + b, dtype=np.int64)), pa.array(world.item_author[items]),
              pa.array(world.item_topic[items]), pa.array(act), *hcols, _f32(dur),
              pa.array(click.astype(np.int8)), pa.array(watch), pa.array(skip.astype(np.int8)),
              pa.array(answered.astype(np.int8)), pa.array(sat.astype(np.int8), mask=~answered),
              _f32(pc), _f32(ps), _f32(pa_)]
    return pa.Table.from_arrays(arrays, schema=IMPRESSION_SCHEMA)


def _candidates(world: World, cfg: SimulateConfig, hist: HistoryBuffers, rng: np.random.Generator,
                t_end: int, first_request: int, sink: ShardWriter) -> Dict[str, int]:
    """One request per sampled user after the log ends; K distinct candidates drawn without replacement
    (Gumbel top-K) from (1 - e) * exposure policy + e * uniform, in draw order."""
    R, K, I = min(cfg.candidate_requests, cfg.users), cfg.candidates_per_request, cfg.items
    users = rng.choice(cfg.users, size=R, replace=False).astype(np.int64)
    ts = t_end + rng.integers(0, cfg.round_seconds, size=R)
    order = np.lexsort((users, ts))
    users, ts = users[order], ts[order]
    chunk = max(1, 2_000_000 // I)
    for lo in range(0, R, chunk):
        u = users[lo:lo + chunk]
        p = (1.0 - cfg.candidate_exploration) * exposure_probs(world, cfg, u) + cfg.candidate_exploration / I
        keys = np.log(p) + rng.gumbel(size=p.shape)
        top = np.argpartition(-keys, K - 1, axis=1)[:, :K]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1, kind="stable"), 1)
        items, ru = top.reshape(-1).astype(np.int64), np.repeat(u, K)
        pc, ps, pa_, _ = true_probs(world, cfg, ru, items)
        rid = np.repeat(np.arange(first_request + lo, first_request + lo + len(u), dtype=np.int64), K)
        arrays = [pa.array(rid), pa.array(ru), pa.array(items), pa.array(np.repeat(ts[lo:lo + chunk], K)),
                  pa.array(world.item_author[items]), pa.array(world.item_topic[items]),
                  pa.array(world.activity[ru]), *_hist_columns(hist, ru), _f32(world.duration[items]),
                  _f32(pc), _f32(ps), _f32(pa_)]
        sink.write(pa.Table.from_arrays(arrays, schema=CANDIDATE_SCHEMA))
    sink.close()
    return {"requests": R, "per_request": K, "rows": sink.rows, "shards": sink.shards,
            "first_request_id": first_request, "min_ts": int(ts.min()) if R else None,
            "max_ts": int(ts.max()) if R else None}


def _items(world: World, cfg: SimulateConfig, out: Path) -> Dict[str, object]:
    """DIR/items/part-00000.parquet: item_id, author_id, category_id, duration_s of every item (the values
    the impression and candidate rows carry), one file written under a temp name and renamed."""
    ids = np.arange(cfg.items, dtype=np.int64)
    table = pa.Table.from_arrays([pa.array(ids), pa.array(world.item_author.astype(np.int64)),
                                  pa.array(world.item_topic.astype(np.int64)), _f32(world.duration)],
                                 schema=ITEM_SCHEMA)
    sink = ShardWriter(out / "items", ITEM_SCHEMA, cfg.items, min(cfg.row_group_rows, cfg.items), cfg.compression)
    sink.write(table)
    sink.close()
    return {"rows": sink.rows, "path": ITEMS_PATH}


def _prepare_out(out: Path, overwrite: bool) -> None:
    targets = [out / d for d in (*SPLITS, "candidates", "items")] + [out / "world.json"]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out {str(out)!r} already holds simulator output ({existing[0].name}); "
                          f"pass --overwrite to replace it")
    for t in existing:
        shutil.rmtree(t) if t.is_dir() else t.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def simulate(out_dir: str | Path, cfg: SimulateConfig, overwrite: bool = False,
             progress: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Write DIR/{train,valid,test,candidates}/part-NNNNN.parquet, DIR/items/part-00000.parquet and DIR/world.json;
    return the summary
    (world.json content plus `wall_s` and `rows_per_s`)."""
    cfg.validate("simulate")
    t0 = time.perf_counter()
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    world = build_world(cfg)
    rng_log, rng_cand = (np.random.default_rng(np.random.SeedSequence([cfg.seed, k])) for k in (1, 2))
    hist = HistoryBuffers(cfg.users)
    N = cfg.impressions
    n_train = int(round(N * cfg.split_fractions[0]))
    n_valid = min(int(round(N * cfg.split_fractions[1])), N - n_train)
    bounds = [0, n_train, n_train + n_valid, N]
    sinks = [ShardWriter(out / s, IMPRESSION_SCHEMA, cfg.shard_rows, cfg.row_group_rows, cfg.compression)
             for s in SPLITS]
    ts_range = [[None, None] for _ in SPLITS]
    stats, done, rnd, next_report = _Stats(), 0, 0, N // 10
    while done < N:
        table = _round(world, cfg, hist, rng_log, rnd, done, N - done, stats)
        rnd += 1
        if table is None:
            continue
        lo, hi = done, done + table.num_rows
        for k in range(3):
            a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
            if a < b:
                part = table.slice(a - lo, b - a)
                sinks[k].write(part)
                col = part.column("timestamp")
                first, last = col[0].as_py(), col[-1].as_py()
                ts_range[k] = [first if ts_range[k][0] is None else ts_range[k][0], last]
        done = hi
        if progress is not None and done >= next_report:
            progress(done, N, time.perf_counter() - t0)
            next_report += max(N // 10, 1)
    for s in sinks:
        s.close()
    t_end = cfg.start_timestamp + rnd * cfg.round_seconds
    cand = _candidates(world, cfg, hist, rng_cand, t_end, N,
                       ShardWriter(out / "candidates", CANDIDATE_SCHEMA, cfg.shard_rows, cfg.row_group_rows,
                                   cfg.compression))
    items = _items(world, cfg, out)
    summary = {
        "format": "satrank-sim/1", "seed": cfg.seed,
        "sizes": {"users": cfg.users, "items": cfg.items, "impressions": N, "topics": cfg.topics,
                  "authors": cfg.authors, "rounds": rnd},
        "splits": {s: {"rows": sinks[k].rows, "shards": sinks[k].shards, "min_ts": ts_range[k][0],
                       "max_ts": ts_range[k][1]} for k, s in enumerate(SPLITS)},
        "candidates": cand,
        "items": items,
        "stats": stats.summary(np.bincount(world.activity, minlength=N_ACTIVITY)),
        "config": to_dict(cfg),
    }
    _write_json_atomic(out / "world.json", summary)
    wall = time.perf_counter() - t0
    return {**summary, "wall_s": wall, "rows_per_s": N / wall if wall > 0 else None}


_FLAGS = {"users": "--users", "items": "--items", "impressions": "--impressions", "seed": "--seed"}
_COUNTS = {"user_id": ("users", "--users"), "item_id": ("items", "--items"),
           "author_id": ("authors", "simulate.authors"), "category_id": ("topics", "simulate.topics")}


def check_vocab(cfg: SimulateConfig, data: DataConfig, warn: Callable[[str], None] = lambda m: None) -> None:
    """Refuse a world whose ids would not fit the data config's vocabularies (user/item always;
    other features when their out_of_range policy is `error`, otherwise warn)."""
    counts = {col: (getattr(cfg, key), flag) for col, (key, flag) in _COUNTS.items()}
    counts["user_activity"] = (N_ACTIVITY, "user_activity buckets")
    for col in HIST:
        counts[col] = (cfg.items, "--items")
    for kind, feats in (("sparse", data.sparse), ("sequence", data.sequence)):
        for f in feats:
            if f.column not in counts:
                continue
            n, flag = counts[f.column]
            if n <= f.vocab_size:
                continue
            msg = (f"{flag} {n} exceeds data.{kind}.{f.name}.vocab_size {f.vocab_size} (ids 0..{n - 1} "
                   f"would not fit); lower {flag} or raise it with --set data.{kind}.{f.name}.vocab_size={n}")
            if f.out_of_range == "error" or f.column in ("user_id", "item_id") or kind == "sequence":
                raise ConfigError(msg)
            warn(f"warning: {msg} (out_of_range: {f.out_of_range})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="satrank simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--users", type=int, help="number of users (overrides simulate.users)")
    p.add_argument("--items", type=int, help="number of items (overrides simulate.items)")
    p.add_argument("--impressions", type=int, help="impression rows to generate (overrides simulate.impressions)")
    p.add_argument("--seed", type=int, help="random seed (overrides simulate.seed)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/sim.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. --set simulate.topics=30 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace existing simulator output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    return p


def load_simulate_config(config: str | Path, overrides: Sequence[str] = (),
                         flags: Optional[Dict[str, Optional[int]]] = None) -> tuple[SimulateConfig, DataConfig]:
    """Config file + `--set` overrides + CLI flags -> (SimulateConfig, DataConfig), vocabularies checked."""
    for key, value in (flags or {}).items():
        if value is not None and (value < 0 if key == "seed" else value <= 0):
            raise ConfigError(f"{_FLAGS[key]} must be {'>= 0' if key == 'seed' else '> 0'}, got {value}")
    raw = apply_overrides(load_yaml(config), overrides)
    if not isinstance(raw.get("simulate"), dict):
        raise ConfigError(f"config {str(config)!r} has no `simulate:` section")
    sim_raw = dict(raw["simulate"])
    sim_raw.update({k: v for k, v in (flags or {}).items() if v is not None})
    cfg = from_dict(SimulateConfig, sim_raw, "simulate")
    data = from_dict(DataConfig, raw.get("data") or {}, "data")
    check_vocab(cfg, data, warn=lambda m: print(m, file=sys.stderr))
    return cfg, data


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        flags = {k: getattr(args, k) for k in _FLAGS}
        cfg, _ = load_simulate_config(args.config, args.overrides, flags)
        # a rows/s bar drawn only on a terminal (tqdm disable=None), erased when done: the rule of
        # satrank.jobs.engine.progress, which pipeline cannot import (imports point down only)
        with tqdm(total=cfg.impressions, desc="simulate", unit="rows", unit_scale=True, dynamic_ncols=True,
                  leave=False, disable=True if args.quiet else None, file=sys.stderr) as bar:
            res = simulate(args.out, cfg, overwrite=args.overwrite, progress=lambda d, n, s: bar.update(d - bar.n))
    except ConfigError as exc:
        print(f"satrank simulate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"satrank simulate: error: cannot write {args.out!r}: {exc}", file=sys.stderr)
        return 1
    st = res["stats"]
    print(f"simulate: wrote {cfg.impressions} impressions + {res['candidates']['rows']} candidate rows to "
          f"{args.out} in {res['wall_s']:.1f}s ({res['rows_per_s']:,.0f} rows/s); click rate "
          f"{st['click_rate']:.3f}, answer rate {st['answer_rate']:.4f}, clicked-but-dissatisfied "
          f"{st['clicked_dissatisfied_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
