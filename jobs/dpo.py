"""`satrank.jobs.dpo`: stage 3, EASQ online alignment of a trained stage-2 ranker (docs/easq.md, "The online job").

    torchrun --nproc_per_node=N -m satrank.jobs.dpo --data DIR --init RUN_MAIN --out RUN [--propensity RUN_P]
        [--config CFG] [--set k=v] [--follow --max-wait-s S] [--poll-s S] [--checkpoint-every STEPS]
        [--sat-only] [--log-keys]

- Model: RUN_MAIN (a satrank.jobs.train run: its checkpoint, config.yaml, teacher.json) rebuilt from its own config,
  EASQ pathway installed (satrank.models.easq.task.EasqTask, `easq:` from --config/--set), weights loaded (DCP, any
  world size), then sharded. Optimizers per group: fused tables (in backward), `backbone` (backbone dense +
  data-parallel tables, train.dense_optimizer / dpo_train overrides), `lora` (Adam, easq.lr). The backbone
  optimizer is never stepped on an L_sat-only step (behaviour off and DPO weight x ramp = 0) of the isolated
  pathway; with `easq.pathway: shared` (the baseline) L_sat trains the backbone, so it is stepped every step.
- Stream: the Parquet shards of DIR/train in file-name order (the simulator's names are time-ordered; the
  job checks the timestamp min/max of consecutive files and records `timestamp_ordered`), each shard read
  once, no shuffle, no epochs; row groups of a shard are split over ranks (satrank.pipeline.reader slots).
  --follow re-lists DIR/train after the known shards and waits for new ones until --max-wait-s passes without
  one (rank 0 lists and decides, every rank follows; caught up, it checkpoints before it waits unless
  --checkpoint-every is 0).
- Prequential: the satisfaction head's logits of each batch come from the forward that trains on it
  (before its update): `prequential_sat_auc` on the answered rows of all ranks.
- rho: with --propensity RUN_P (a satrank.jobs.propensity run, checked: exists, job, feature fingerprint), the FROZEN
  stage-1 propensity model (satrank.models.stage1.tasks.PropensityModel built from RUN_P's own config.yaml, sharded in a
  DMP of its own, eval mode, no_grad: its tables stay bit-identical, checked) scores every batch: rho_hat
  gives L_sat's IPS weights 1 / max(rho_hat, easq.clip) and the pair buffer's weights. Without it rho = 1
  (L_sat is the plain BCE on answered rows); the log says so and metrics.json has `propensity: null`.
- Checkpoints every --checkpoint-every steps and at the end: RUN/checkpoint (satrank.jobs.engine.checkpoint: model +
  every optimizer, extra: step, shards done, before-metrics; rank_extra: shard + reader position) and
  RUN/easq_state/step-<S>/rank<r>.pt (pair buffer, EasqLoss ramp, prequential columns, theta_0, keys).
  A run with RUN/checkpoint resumes there (same world size and reader workers).
- RUN/metrics.json: `before`, `after` (satrank.jobs.evaluate.evaluate_all on DIR/test + candidates + leave-one-out,
  plus `sat_head`: the satisfaction head's AUC on the answered rows of DIR/valid and DIR/test),
  prequential_sat_auc, backbone_drift = ||theta_t - theta_0|| / ||theta_0|| (backbone dense), counts,
  `propensity` (null without --propensity).
- Serving: RUN/checkpoint carries config.yaml and RUN/teacher.json is copied from RUN_MAIN, so satrank.jobs.score
  and satrank.jobs.export take RUN like a satrank.jobs.train run (satrank.models.serving.module kind `easq`, adapters folded).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.cli import build_parser
from satrank.jobs.evaluate import TEACHER_FILE, build_task, checkpoint_config, evaluate_all, run_checkpoint, teacher_from_dict
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.runtime import finite_or_none, get_logger, write_json_atomic
from satrank.models.metrics.stage1_eval import auc_vs_drawn_truth, canonical_order, row_ids
from satrank.jobs.engine.checkpoint import (all_gather_objects, check_checkpoint, load_prefixed, local_tables, propensity_run,
                             tables_changed)
from satrank.jobs.engine.readers import first_batch, stage_train_config
from satrank.jobs.engine.trainer import run_job
from satrank.models.easq.pathway import GROUP_LORA
from satrank.models.easq.task import EasqTask, pad_rows, pair_batch
from satrank.models.metrics.ranker_eval import EvaluationConfig
from satrank.models.easq.pair_buffer import PairBuffer
from satrank.models.ranker.task import needs_teacher
from satrank.models.metrics.ranking import auc_or_nan
from satrank.pipeline.errors import DataError
from satrank.pipeline.reader import BatchLoader, list_shards

TRUE_P_SATISFIED = "true_p_satisfied"  # truth column of the simulator (satrank.pipeline.sim.simulate)

JOB = "dpo"
STATE = "easq_state"
MAP = {"sparse_arch.": "task.sparse_arch.", "ranker.ranker.": "task.ranker.ranker.ranker."}
log = get_logger("dpo")


def pending_shards(split: Path, done: List[str], follow: bool) -> List[str]:
    """The shards of `split` not consumed yet, in file-name (= time) order. Names starting with '.' or '_' are
    writes in flight (`satrank.pipeline.reader.list_shards`: a producer writes `.part-N.parquet` and renames it). With
    --follow an empty split is waited on instead of refused."""
    try:
        files = list_shards(str(split))[1]
    except DataError:
        if not follow:
            raise
        files = []
    return [f for f in files if Path(f).name not in done]


def next_shards(split: Path, done: List[str], args, last_seen: float, rt) -> tuple:
    """(shards to consume now, stop?), decided by rank 0 and broadcast: the ranks read the same shards and leave
    the loop together. Ranks listing on their own could disagree (a shard landing between two listings, one
    rank's --max-wait-s running out first) and then wait in different collectives forever."""
    decision = None
    if rt.is_main:
        files = pending_shards(split, done, args.follow)
        decision = (files, not files and (not args.follow or time.monotonic() - last_seen > args.max_wait_s))
    return ckpt.broadcast_object(decision)


def timestamp_ordered(files: List[str]) -> bool:
    """Each file's smallest timestamp >= the previous file's largest (Parquet row-group statistics)."""
    prev = None
    for f in files:
        md = pq.ParquetFile(f).metadata
        col = md.schema.to_arrow_schema().get_field_index("timestamp")
        stats = [md.row_group(i).column(col).statistics for i in range(md.num_row_groups)]
        if col < 0 or any(s is None or not s.has_min_max for s in stats):
            return False
        lo, hi = min(s.min for s in stats), max(s.max for s in stats)
        if prev is not None and lo < prev:
            return False
        prev = hi
    return True


class FrozenPropensity:
    """The stage-1 propensity model of --propensity RUN_P, FROZEN: satrank.models.stage1.tasks.PropensityModel built from
    RUN_P's config (its `embeddings:` and `propensity:` sections; `data:` is the stream's, fingerprint-checked),
    sharded in a DMP of its own, weights loaded strictly (every key, any world size), always in eval mode and
    called under no_grad, so no optimizer can ever reach it. `rho(batch)` = its `propensity` output (collective:
    every rank calls it every step). Not part of the EASQ checkpoint (a resumed run reloads RUN_P)."""

    def __init__(self, run_p: Path, data, rt, seed: int) -> None:
        from satrank.embeddings.sharding import shard_model
        from satrank.models.stage1.tasks import PropensityModel

        self.run = str(run_p)
        self.path, pcfg = propensity_run(run_p, data)
        torch.manual_seed(seed)
        model = PropensityModel(data, pcfg.embeddings, pcfg.propensity)
        self.dmp, _ = shard_model(model, pcfg.embeddings, rt, seed=seed)
        self.keys = load_prefixed(self.path, self.dmp, {"": ""}, data, pcfg.embeddings, what="--propensity",
                                  expect_job="propensity")
        self.dmp.eval()
        self.tables = local_tables(self.dmp)
        self.dense = {k: v.detach().clone() for k, v in self.dmp.state_dict().items()
                      if k not in self.tables and torch.is_tensor(v) and not hasattr(v, "local_shards")}
        self.answered, self.rho_sum, self.clipped = 0, 0.0, 0

    @torch.no_grad()
    def rho(self, batch) -> torch.Tensor:
        self.dmp.eval()
        _, out = self.dmp(batch)
        return out["propensity"].detach().float()

    def observe(self, rho: torch.Tensor, answered: torch.Tensor, clip: float) -> None:
        r = rho[answered > 0.5].double()
        self.answered += int(r.numel())
        self.rho_sum += float(r.sum())
        self.clipped += int((r < clip).sum())

    def report(self, clip: float) -> Dict[str, Any]:
        """Collective: where the model came from, whether anything in it moved, rho on the answered rows."""
        now = self.dmp.state_dict()
        dense_moved = sorted(k for k, v in self.dense.items() if not torch.equal(now[k], v))
        parts = all_gather_objects({"n": self.answered, "sum": self.rho_sum, "clipped": self.clipped,
                                    "dense": dense_moved})
        changed = tables_changed(self.tables, self.dmp)
        n = sum(p["n"] for p in parts)
        return {"run": self.run, "checkpoint": str(self.path), "keys_loaded": len(self.keys),
                "tables": sorted(self.tables), "tables_changed": changed,
                "dense_changed": sorted({k for p in parts for k in p["dense"]}), "clip": clip,
                "answered_rows": n, "rho_mean_answered": sum(p["sum"] for p in parts) / n if n else None,
                "clipped_share_answered": sum(p["clipped"] for p in parts) / n if n else None}


def _sat_head_columns(dmp, cfg, uri: Path, rt) -> Optional[Dict[str, torch.Tensor]]:
    """The satisfaction head's logit, `answered`, `satisfied`, `true_p_satisfied` (when the data has it) and the
    row ids of every row of the split `uri`, gathered from all ranks (collective); None without rows."""
    if not uri.exists():
        return None
    rcfg = dataclasses.replace(cfg.reader, shuffle=False, drop_last=False)
    loader = BatchLoader(uri, cfg.data, rcfg)
    try:
        template = first_batch(loader)
    except DataError:
        template = None
    if not all(all_gather_objects(template is not None)):
        return None
    cols: Dict[str, List[torch.Tensor]] = {}
    was = dmp.training
    dmp.eval()
    try:
        with torch.no_grad():
            for batch, real in synced_pairs(loader, rt.device, "pad", template):
                _, out = dmp(batch)
                if real:
                    got = {"logit": out["sat_head_logit"], "satisfied": batch.labels["satisfied"],
                           "answered": batch.labels["questionnaire_answered"], **row_ids(batch)}
                    if TRUE_P_SATISFIED in batch.truth:
                        got["true_p"] = batch.truth[TRUE_P_SATISFIED]
                    for k, v in got.items():
                        cols.setdefault(k, []).append(v.detach().cpu())
    finally:
        dmp.train(was)
    parts = all_gather_objects({k: torch.cat(v) for k, v in cols.items()})
    keys = {k for p in parts for k in p}
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys} if keys else None


def sat_head_auc(dmp, cfg, uri: Path, rt) -> Dict[str, Any]:
    """The satisfaction head's AUC on the split `uri`: `auc` against `satisfied` on the ANSWERED rows (the only
    observed labels: a small, biased sample) and, where the data has `true_p_satisfied` (the simulator),
    `auc_true_all` against a label drawn from it with a fixed seed over ALL rows in a canonical row order (the
    same draw as stage 1's `auc_true_all`, whatever the world size; `auc_true_all_ceiling` is the truth's own
    AUC on that draw). One pass over the split. Collective. {"auc": None, "rows": 0} without answers."""
    a = _sat_head_columns(dmp, cfg, uri, rt)
    out: Dict[str, Any] = {"auc": None, "rows": 0}
    m = a["answered"] > 0.5 if a is not None else None
    if m is not None and bool(m.any()):
        lg, lb = a["logit"][m], a["satisfied"][m]
        out = {"auc": auc_or_nan(lg, lb), "rows": int(lg.numel()), "satisfied_share": float(lb.mean())}
    if a is not None and "true_p" in a:
        order = torch.from_numpy(canonical_order(a))
        out.update(auc_vs_drawn_truth(a["logit"][order], a["true_p"][order], 0))
    return out


def evaluate_run(dmp, cfg, ecfg, data_dir: Path, rt) -> Dict[str, Any]:
    """satrank.jobs.evaluate.evaluate_all (main heads, DIR/test) + the satisfaction head on DIR/valid and DIR/test."""
    out = evaluate_all(dmp, cfg, ecfg, data_dir, rt)
    out["sat_head"] = {split: sat_head_auc(dmp, cfg, data_dir / split, rt) for split in ("valid", "test")}
    return out


def build(args, cfg_cli, rt):
    """(dmp, EasqTask, run cfg, optimizers) with RUN_MAIN's weights."""
    from satrank.embeddings.sharding import shard_model
    from satrank.embeddings.tables import TABLE_KEY
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from satrank.embeddings.sharding import _dense_factory, _torch_embedding_factory

    path = run_checkpoint(args.init)
    cfg = checkpoint_config(path)
    cfg.reader, cfg.easq = cfg_cli.reader, cfg_cli.easq
    cfg.train = cfg_cli.train
    tfile = Path(args.init) / TEACHER_FILE
    teacher = teacher_from_dict(__import__("json").loads(tfile.read_text())) if tfile.is_file() else None
    if needs_teacher(cfg.model) and teacher is None:
        raise ckpt.CheckpointError(f"--init {args.init}: the model needs its satisfaction model g but {tfile} is missing")
    train = stage_train_config(cfg, "dpo")
    module = EasqTask(build_task(cfg, teacher, seed=train.seed), cfg.easq)
    dmp, _ = shard_model(module, cfg.embeddings, rt, dense_lr=train.dense_lr, seed=train.seed)
    mapping = dict(MAP)
    if module.task.g is not None:
        mapping["g."] = "task.g."
    load_prefixed(path, dmp, mapping, cfg.data, cfg.embeddings, what="--init")
    lora_ids = {id(p) for p in module.easq.lora_parameters()}
    plain = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    lora = {k: p for k, p in plain.items() if id(p) in lora_ids}
    dp_tables = {k: p for k, p in plain.items() if id(p) not in lora_ids and TABLE_KEY.match(k)}
    backbone = {k: p for k, p in plain.items() if id(p) not in lora_ids and k not in dp_tables and p.requires_grad}
    opts = {GROUP_LORA: KeyedOptimizerWrapper(lora, lambda ps: torch.optim.Adam(ps, lr=cfg.easq.lr,
                                                                                   weight_decay=cfg.easq.weight_decay)),
            "backbone": KeyedOptimizerWrapper(backbone, _dense_factory(train.dense_optimizer, train.dense_lr,
                                                                       train.dense_weight_decay))}
    parts = [("fused", dmp.fused_optimizer), ("lora", opts[GROUP_LORA]), ("backbone", opts["backbone"])]
    if dp_tables:
        opts["dp_tables"] = KeyedOptimizerWrapper(dp_tables, _torch_embedding_factory(cfg.embeddings.optimizer))
        parts.append(("dp_tables", opts["dp_tables"]))
    bb_names = sorted(k for k in backbone if k.startswith("task.ranker.ranker.ranker."))
    return dmp, module, cfg, opts, CombinedOptimizer(parts), {k: backbone[k] for k in bb_names}


class State:
    """Per-rank online state saved next to each checkpoint."""

    def __init__(self) -> None:
        self.step, self.done, self.current, self.reader = 0, [], None, None
        self.logits: List[torch.Tensor] = []
        self.labels: List[torch.Tensor] = []
        self.keys: List[torch.Tensor] = []
        self.rows = 0


def save(args, rt, dmp, combined, module, buf, st: State, theta0, before, cfg) -> None:
    d = args.out / STATE / f"step-{st.step}"
    d.mkdir(parents=True, exist_ok=True)
    blob = {"buffer": buf.state_dict(), "loss": module.loss.state_dict(), "theta0": theta0,
            "logits": torch.cat(st.logits) if st.logits else torch.zeros(0),
            "labels": torch.cat(st.labels) if st.labels else torch.zeros(0),
            "keys": torch.cat(st.keys) if st.keys else torch.zeros(0, 3, dtype=torch.long)}
    tmp = d / f".rank{rt.rank}.pt.tmp"
    torch.save(blob, tmp)
    tmp.replace(d / f"rank{rt.rank}.pt")
    extra = finite_or_none({"job": JOB, "step": st.step, "done": st.done, "rows": st.rows, "before": before,
                            "propensity": None if args.propensity is None else str(args.propensity)})
    ckpt.save_checkpoint(args.out, dmp, combined, extra=extra, rank_extra={"file": st.current, "reader": st.reader},
                         config=cfg, data=cfg.data, emb=cfg.embeddings)
    if rt.is_main:  # keep the state of this checkpoint only (older ones are unreachable)
        for old in (args.out / STATE).glob("step-*"):
            if old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)


def restore(args, rt, dmp, combined, module, buf, st: State, cfg):
    meta = ckpt.load_checkpoint(args.out / "checkpoint", dmp, combined, data=cfg.data, emb=cfg.embeddings)
    if meta["world_size"] != rt.world_size:
        raise ckpt.CheckpointError(f"{args.out}/checkpoint was written by {meta['world_size']} ranks; resume with as many")
    ex = meta["extra"]
    mine_p = None if args.propensity is None else str(args.propensity)
    if ex.get("propensity") != mine_p:
        raise ckpt.CheckpointError(f"{args.out}/checkpoint was trained with --propensity {ex.get('propensity')}; "
                                   f"resume with the same (got {mine_p})")
    st.step, st.done, st.rows = ex["step"], list(ex["done"]), ex["rows"]
    mine = meta["rank_extra"][rt.rank]
    st.current, st.reader = mine["file"], mine["reader"]
    blob = torch.load(args.out / STATE / f"step-{st.step}" / f"rank{rt.rank}.pt", weights_only=True)
    buf.load_state_dict(blob["buffer"])
    module.loss.load_state_dict(blob["loss"])
    st.logits, st.labels, st.keys = [blob["logits"]], [blob["labels"]], [blob["keys"]]
    log.info("resumed from %s at step %d (%d shards done)", meta["path"], st.step, len(st.done))
    return blob["theta0"], ex.get("before")


def run(rt, args, cfg_cli) -> None:
    started = time.perf_counter()
    ecfg = getattr(cfg_cli, "evaluate", None) or EvaluationConfig()
    dmp, module, cfg, opts, combined, backbone = build(args, cfg_cli, rt)
    ecfg_cfg = cfg
    data, ecfg_e = cfg.data, cfg.easq
    prop = FrozenPropensity(args.propensity, data, rt, stage_train_config(cfg, "dpo").seed) \
        if args.propensity is not None else None
    if prop is None:
        log.info("no --propensity: rho = 1 for every row (L_sat is the unweighted BCE on answered rows, "
                 "pair weights 1)")
    else:
        log.info("rho from the frozen propensity model of %s (%d tensors); IPS clip M = %s", prop.path,
                 len(prop.keys), ecfg_e.clip)
    buf, st = PairBuffer.from_config(ecfg_e), State()
    rows_fixed = cfg.reader.batch_size
    pair_rows = 2 * ecfg_e.pairs_per_step
    rcfg = dataclasses.replace(cfg.reader, shuffle=False, drop_last=False)
    args.out.mkdir(parents=True, exist_ok=True)
    tfile = Path(args.init) / TEACHER_FILE
    if rt.is_main and tfile.is_file():  # satrank.jobs.score / satrank.jobs.export rebuild g from it, as for a satrank.jobs.train run
        write_json_atomic(args.out / TEACHER_FILE, __import__("json").loads(tfile.read_text()))
    if (args.out / "checkpoint" / "meta.json").is_file():
        theta0, before = restore(args, rt, dmp, combined, module, buf, st, cfg)
    else:
        theta0 = {k: p.detach().clone() for k, p in backbone.items()}
        before = evaluate_run(dmp, ecfg_cfg, ecfg, args.data, rt)
    split = args.data / "train"
    bw = 0.0 if args.sat_only else 1.0
    shared = module.easq.shared  # the baseline: L_sat itself trains the backbone
    template = None
    last_seen, since_ckpt = time.monotonic(), 0
    dmp.train()
    while True:
        files, stop = next_shards(split, st.done, args, last_seen, rt)
        if stop:
            break
        if not files:  # --follow, caught up: checkpoint once, then poll for the next shard
            if since_ckpt and args.checkpoint_every:
                log.info("caught up after %d shards; checkpointing and waiting for new shards in %s "
                         "(up to %ss)", len(st.done), split, args.max_wait_s)
                save(args, rt, dmp, combined, module, buf, st, theta0, before, cfg)
                since_ckpt = 0
            time.sleep(args.poll_s)
            continue
        last_seen = time.monotonic()
        for f in files:
            name = Path(f).name
            loader = BatchLoader(f, data, rcfg)
            if st.current == name and st.reader is not None:
                loader.load_state_dict(st.reader)
            st.current = name
            template = template or first_batch(loader)
            bar = loader_bar(f"dpo {name}", loader, main=rt.is_main)
            for batch, real in synced_pairs(loader, rt.device, "pad", template):
                n = batch.size
                b = pad_rows(batch, rows_fixed, data)
                rho = prop.rho(b) if prop is not None else None  # every rank, every step (collective)
                if real:
                    buf_rho = rho[:n].cpu() if rho is not None else torch.ones(n)
                    if prop is not None:
                        prop.observe(buf_rho, batch.labels["questionnaire_answered"].cpu(), ecfg_e.clip)
                    sample = buf.sample(ecfg_e.pairs_per_step) if len(buf) else None
                else:
                    buf_rho, sample = None, None
                pb = pair_batch(sample, b, pair_rows, data)
                ramp = module.loss.ramp.weight
                dpo_on = ecfg_e.dpo_weight * ramp > 0 and sample is not None and sample.num_pairs > 0
                flag = torch.tensor([int(dpo_on)])
                if torch.distributed.is_initialized():  # the backbone steps on every rank or on none
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                dpo_on = bool(flag.item())
                loss, out = dmp(b, pb, sample, n, rho, bw, 1.0 if real else 0.0)
                loss.backward()
                opts[GROUP_LORA].step()
                if bw > 0 or dpo_on or shared:  # never on an isolated L_sat-only step (backbone bit-identical)
                    opts["backbone"].step()
                    if "dp_tables" in opts:
                        opts["dp_tables"].step()
                combined.zero_grad()
                if real:
                    module.loss.update()
                    buf.add_batch(batch, data, buf_rho)
                    ans = batch.labels["questionnaire_answered"] > 0.5
                    st.logits.append(out["sat_head_logit"][:n][ans].cpu())
                    st.labels.append(batch.labels["satisfied"][ans].cpu())
                    st.rows += n
                    bar.update(n)
                    if args.log_keys:
                        st.keys.append(torch.stack([batch.ids[k] for k in ("user_id", "item_id", "timestamp")], 1))
                st.step += 1
                since_ckpt += 1
                st.reader = loader.state_dict()
                if args.checkpoint_every and since_ckpt >= args.checkpoint_every:
                    save(args, rt, dmp, combined, module, buf, st, theta0, before, cfg)
                    since_ckpt = 0
            bar.close()
            st.done.append(name)
            st.current, st.reader = None, None
    save(args, rt, dmp, combined, module, buf, st, theta0, before, cfg)
    num = sum(float((p.detach() - theta0[k]).pow(2).sum()) for k, p in backbone.items())
    den = sum(float(v.pow(2).sum()) for v in theta0.values())
    parts = all_gather_objects({"logits": torch.cat(st.logits) if st.logits else torch.zeros(0),
                         "labels": torch.cat(st.labels) if st.labels else torch.zeros(0), "rows": st.rows,
                         "keys": torch.cat(st.keys) if st.keys else torch.zeros(0, 3, dtype=torch.long)})
    after = evaluate_run(dmp, ecfg_cfg, ecfg, args.data, rt)
    prop_report = prop.report(ecfg_e.clip) if prop is not None else None
    if prop_report is not None and (prop_report["tables_changed"] or prop_report["dense_changed"]):
        log.error("the frozen propensity model changed: %s %s", prop_report["tables_changed"],
                  prop_report["dense_changed"])
    if args.log_keys:
        np.save(args.out / f"keys-rank{rt.rank}.npy", (torch.cat(st.keys) if st.keys else torch.zeros(0, 3)).numpy())
    if rt.is_main:
        lg, lb = torch.cat([p["logits"] for p in parts]), torch.cat([p["labels"] for p in parts])
        metrics = {"job": JOB, "world_size": rt.world_size, "init": str(args.init), "before": before, "after": after,
                   "prequential_sat_auc": auc_or_nan(lg, lb) if lg.numel() else None,
                   "prequential_answered_rows": int(lg.numel()),
                   "backbone_drift": (num ** 0.5) / (den ** 0.5) if den > 0 else None,
                   "rows": sum(p["rows"] for p in parts), "steps": st.step, "shards": st.done,
                   "timestamp_ordered": timestamp_ordered([str(split / n) for n in st.done]),
                   "dpo_ramp": module.loss.ramp.weight, "sat_only": bool(args.sat_only),
                   "pathway": ecfg_e.pathway, "propensity": prop_report,
                   "total_s": round(time.perf_counter() - started, 2)}
        write_json_atomic(args.out / "metrics.json", finite_or_none(metrics))
        log.info("before: %s", {k: before.get(k) for k in ("true_sat@10", "click_auc", "sat_auc_answered")})
        log.info("after:  %s", {k: after.get(k) for k in ("true_sat@10", "click_auc", "sat_auc_answered")})
        log.info("satisfaction head (%s pathway), answered-row AUC before %s, after %s", ecfg_e.pathway,
                 {k: v["auc"] for k, v in before.get("sat_head", {}).items()},
                 {k: v["auc"] for k, v in after["sat_head"].items()})
    del dmp, combined, opts, module, prop


def precheck(args, cfg) -> None:
    if not (args.data / "train").is_dir():
        raise ckpt.CheckpointError(f"--data {args.data}: no train/ split")
    run_checkpoint(args.init)
    if args.propensity is not None:
        propensity_run(args.propensity, checkpoint_config(run_checkpoint(args.init)).data)
    if args.follow and args.max_wait_s is None:
        raise ckpt.CheckpointError("--follow needs --max-wait-s S (stop after S seconds without a new shard)")
    if args.checkpoint_every < 0:
        raise ckpt.CheckpointError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank dpo", __doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="satrank.jobs.train run directory (RUN_MAIN)")
    parser.add_argument("--propensity", type=Path, default=None,
                        help="satrank.jobs.propensity run (RUN_P): rho for L_sat's IPS weights and the pair weights "
                             "(default: rho = 1)")
    parser.add_argument("--follow", action="store_true", help="wait for new shards in DIR/train")
    parser.add_argument("--max-wait-s", type=float, default=None, help="--follow: stop after this long without new data")
    parser.add_argument("--poll-s", type=float, default=1.0, help="--follow: polling interval")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: end only)")
    parser.add_argument("--sat-only", action="store_true", help="behaviour losses off (L_sat + DPO only)")
    parser.add_argument("--log-keys", action="store_true",
                        help="write RUN/keys-rank<r>.npy: (user_id, item_id, timestamp) of every consumed row")
    return run_job(parser, argv, run, stage=None, precheck=precheck)


if __name__ == "__main__":
    sys.exit(main())
