"""`jobs.dpo`: stage 3, EASQ online alignment of a trained stage-2 ranker (docs/easq.md, "The online job").

    torchrun --nproc_per_node=N -m jobs.dpo --data DIR --init RUN_MAIN --out RUN [--config CFG] [--set k=v]
        [--follow --max-wait-s S] [--poll-s S] [--checkpoint-every STEPS] [--sat-only] [--log-keys]

- Model: RUN_MAIN (a jobs.train run: its checkpoint, config.yaml, teacher.json) rebuilt from its own config,
  EASQ pathway installed (models.easq_task.EasqTask, `easq:` from --config/--set), weights loaded (DCP, any
  world size), then sharded. Optimizers per group: fused tables (in backward), `backbone` (backbone dense +
  data-parallel tables, train.dense_optimizer / ranker_train overrides), `lora` (Adam, easq.lr). The backbone
  optimizer is never stepped on an L_sat-only step (behaviour off and DPO weight x ramp = 0).
- Stream: the Parquet shards of DIR/train in file-name order (the simulator's names are time-ordered; the
  job checks the timestamp min/max of consecutive files and records `timestamp_ordered`), each shard read
  once, no shuffle, no epochs; row groups of a shard are split over ranks (pipeline.reader slots).
  --follow re-lists DIR/train after the known shards and waits for new ones until --max-wait-s passes.
- Prequential: the satisfaction head's logits of each batch come from the forward that trains on it
  (before its update): `prequential_sat_auc` on the answered rows of all ranks.
- rho: constant 1 (no propensity model is loaded yet: L_sat is the naive BCE on answered rows, clipped
  weights 1); see docs/easq.md "left to do".
- Checkpoints every --checkpoint-every steps and at the end: RUN/checkpoint (jobs.checkpoint: model +
  every optimizer, extra: step, shards done, before-metrics; rank_extra: shard + reader position) and
  RUN/easq_state/step-<S>/rank<r>.pt (pair buffer, EasqLoss ramp, prequential columns, theta_0, keys).
  A run with RUN/checkpoint resumes there (same world size and reader workers).
- RUN/metrics.json: `before`, `after` (jobs.evaluate.evaluate_all on DIR/test + candidates + leave-one-out),
  prequential_sat_auc, backbone_drift = ||theta_t - theta_0|| / ||theta_0|| (backbone dense), counts.
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

from jobs import checkpoint as ckpt
from jobs.cli import build_parser
from jobs.evaluate import TEACHER_FILE, build_task, checkpoint_config, evaluate_all, run_checkpoint, teacher_from_dict
from jobs.loop import synced_pairs
from jobs.runtime import get_logger, write_json_atomic
from jobs.checkpoint import all_gather_objects
from jobs.trainer import finite_or_none, first_batch, load_prefixed, run_job, stage_train_config
from models.dpo import auc
from models.easq import GROUP_LORA
from models.easq_task import EasqTask, pad_rows, pair_batch
from models.evaluation import EvaluationConfig
from models.pair_buffer import PairBuffer
from models.ranker_task import needs_teacher
from pipeline.reader import BatchLoader, list_shards

JOB = "dpo"
STATE = "easq_state"
MAP = {"sparse_arch.": "task.sparse_arch.", "ranker.ranker.": "task.ranker.ranker.ranker."}
log = get_logger("dpo")


def shard_files(split: Path) -> List[str]:
    return list_shards(str(split))[1]


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


def build(args, cfg_cli, rt):
    """(dmp, EasqTask, run cfg, optimizers) with RUN_MAIN's weights."""
    from embeddings.sharding import shard_model
    from embeddings.tables import TABLE_KEY
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from embeddings.sharding import _dense_factory, _torch_embedding_factory

    path = run_checkpoint(args.init)
    cfg = checkpoint_config(path)
    cfg.reader, cfg.easq = cfg_cli.reader, cfg_cli.easq
    cfg.train = cfg_cli.train
    tfile = Path(args.init) / TEACHER_FILE
    teacher = teacher_from_dict(__import__("json").loads(tfile.read_text())) if tfile.is_file() else None
    if needs_teacher(cfg.model) and teacher is None:
        raise ckpt.CheckpointError(f"--init {args.init}: the model needs its satisfaction model g but {tfile} is missing")
    train = stage_train_config(cfg, "ranker")
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


def save(args, rt, dmp, combined, module, buf, st: State, theta0, before) -> None:
    d = args.out / STATE / f"step-{st.step}"
    d.mkdir(parents=True, exist_ok=True)
    blob = {"buffer": buf.state_dict(), "loss": module.loss.state_dict(), "theta0": theta0,
            "logits": torch.cat(st.logits) if st.logits else torch.zeros(0),
            "labels": torch.cat(st.labels) if st.labels else torch.zeros(0),
            "keys": torch.cat(st.keys) if st.keys else torch.zeros(0, 3, dtype=torch.long)}
    tmp = d / f".rank{rt.rank}.pt.tmp"
    torch.save(blob, tmp)
    tmp.replace(d / f"rank{rt.rank}.pt")
    extra = finite_or_none({"job": JOB, "step": st.step, "done": st.done, "rows": st.rows, "before": before})
    ckpt.save_checkpoint(args.out, dmp, combined, extra=extra, rank_extra={"file": st.current, "reader": st.reader},
                         config=None, data=module.task.data, emb=None)
    if rt.is_main:  # keep the state of this checkpoint only (older ones are unreachable)
        for old in (args.out / STATE).glob("step-*"):
            if old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)


def restore(args, rt, dmp, combined, module, buf, st: State):
    meta = ckpt.load_checkpoint(args.out / "checkpoint", dmp, combined, data=module.task.data)
    if meta["world_size"] != rt.world_size:
        raise ckpt.CheckpointError(f"{args.out}/checkpoint was written by {meta['world_size']} ranks; resume with as many")
    ex = meta["extra"]
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
    buf, st = PairBuffer.from_config(ecfg_e), State()
    rows_fixed = cfg.reader.batch_size
    pair_rows = 2 * ecfg_e.pairs_per_step
    rcfg = dataclasses.replace(cfg.reader, shuffle=False, drop_last=False)
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "checkpoint" / "meta.json").is_file():
        theta0, before = restore(args, rt, dmp, combined, module, buf, st)
    else:
        theta0 = {k: p.detach().clone() for k, p in backbone.items()}
        before = evaluate_all(dmp, ecfg_cfg, ecfg, args.data, rt)
    split = args.data / "train"
    bw = 0.0 if args.sat_only else 1.0
    template = None
    last_seen, since_ckpt = time.monotonic(), 0
    dmp.train()
    while True:
        files = [f for f in shard_files(split) if Path(f).name not in st.done]
        if not files:
            if not args.follow or time.monotonic() - last_seen > args.max_wait_s:
                break
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
            for batch, real in synced_pairs(loader, rt.device, "pad", template):
                n = batch.size
                b = pad_rows(batch, rows_fixed, data)
                rho = None
                if real:
                    buf_rho = torch.ones(n)
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
                if bw > 0 or dpo_on:  # never on an L_sat-only step (keeps the backbone bit-identical)
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
                    if args.log_keys:
                        st.keys.append(torch.stack([batch.ids[k] for k in ("user_id", "item_id", "timestamp")], 1))
                st.step += 1
                since_ckpt += 1
                st.reader = loader.state_dict()
                if args.checkpoint_every and since_ckpt >= args.checkpoint_every:
                    save(args, rt, dmp, combined, module, buf, st, theta0, before)
                    since_ckpt = 0
            st.done.append(name)
            st.current, st.reader = None, None
    save(args, rt, dmp, combined, module, buf, st, theta0, before)
    num = sum(float((p.detach() - theta0[k]).pow(2).sum()) for k, p in backbone.items())
    den = sum(float(v.pow(2).sum()) for v in theta0.values())
    parts = all_gather_objects({"logits": torch.cat(st.logits) if st.logits else torch.zeros(0),
                         "labels": torch.cat(st.labels) if st.labels else torch.zeros(0), "rows": st.rows,
                         "keys": torch.cat(st.keys) if st.keys else torch.zeros(0, 3, dtype=torch.long)})
    after = evaluate_all(dmp, ecfg_cfg, ecfg, args.data, rt)
    if args.log_keys:
        np.save(args.out / f"keys-rank{rt.rank}.npy", (torch.cat(st.keys) if st.keys else torch.zeros(0, 3)).numpy())
    if rt.is_main:
        lg, lb = torch.cat([p["logits"] for p in parts]), torch.cat([p["labels"] for p in parts])
        metrics = {"job": JOB, "world_size": rt.world_size, "init": str(args.init), "before": before, "after": after,
                   "prequential_sat_auc": auc(lg, lb) if lg.numel() else None,
                   "prequential_answered_rows": int(lg.numel()),
                   "backbone_drift": (num ** 0.5) / (den ** 0.5) if den > 0 else None,
                   "rows": sum(p["rows"] for p in parts), "steps": st.step, "shards": st.done,
                   "timestamp_ordered": timestamp_ordered([str(split / n) for n in st.done]),
                   "dpo_ramp": module.loss.ramp.weight, "sat_only": bool(args.sat_only),
                   "total_s": round(time.perf_counter() - started, 2)}
        write_json_atomic(args.out / "metrics.json", finite_or_none(metrics))
        log.info("before: %s", {k: before.get(k) for k in ("true_sat@10", "click_auc", "sat_auc_answered")})
        log.info("after:  %s", {k: after.get(k) for k in ("true_sat@10", "click_auc", "sat_auc_answered")})
    del dmp, combined, opts, module


def precheck(args, cfg) -> None:
    if not (args.data / "train").is_dir():
        raise ckpt.CheckpointError(f"--data {args.data}: no train/ split")
    run_checkpoint(args.init)
    if args.follow and args.max_wait_s is None:
        raise ckpt.CheckpointError("--follow needs --max-wait-s S (stop after S seconds without a new shard)")
    if args.checkpoint_every < 0:
        raise ckpt.CheckpointError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank dpo", __doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="jobs.train run directory (RUN_MAIN)")
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
