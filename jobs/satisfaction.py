"""`satrank.jobs.satisfaction`: the satisfaction model g(u, i) of SAQRec (eqs. 1, 6; Algorithm 1 lines 5-7) on the
click model's FROZEN embedding tables, trained on questionnaire answers with the loss `satisfaction.loss`
(naive eq. 3 | ips eq. 6 | snips | dr); rho comes from a frozen copy of the propensity model.

    torchrun --nproc_per_node=N -m satrank.jobs.satisfaction --data DIR --init RUN_BASE [--propensity RUN_P] --out RUN
        [--config CFG] [--set k=v ...] [--resume RUN_OLD]

--init: a satrank.jobs.pretrain run; its tables (and, with satisfaction.init_tower_from_pretrain, its towers) are
loaded into the sharded model and stay bit-identical (checked: `frozen_tables_changed`). satisfaction.tables:
fine_tune trains the loaded tables with g's loss, own loads nothing from --init (optional then) and trains fresh
tables; the propensity submodule's tables stay frozen and checked either way. --propensity: a
satrank.jobs.propensity run loaded into the `propensity.` submodule (needed by ips / snips / dr, ignored by naive).
Both are DCP checkpoints loaded at any world size; a missing path, a directory that is no checkpoint, a
run of another job, one written for another feature config (fingerprint) or one whose weights do not fit the
model this config builds (keys, shapes: e.g. another pretrain.tower) is a one-line error before anything is
written.

naive / ips / snips read only answered training rows (reader row_filter questionnaire_answered): every
batch then holds B answered rows, so ips with ips_normalizer=all is the full-data estimator of Thm 4.1
rescaled by the constant |D|/B per epoch (same minimiser). dr needs every row (imputation over D).
Evaluation is on EVERY row of DIR/valid: RUN/metrics.json has `ideal_loss_all` (eq. 2 against
true_p_satisfied), `auc_true_all` (AUC against satisfaction sampled from true_p_satisfied, fixed seed
train.seed), `auc_answered`, and the counts `answered_rows`, `batches_no_answered`, `clipped_propensities`;
the same on DIR/test under `test` when it exists. RUN/best selects on `auc_answered` (satisfaction_train.monitor)
where every validation row is answered (missing at random), on `answered_logloss` where those answers have one
class, and on the (weighted) `loss` where some rows are unanswered (satisfaction.mnar_monitor); metrics.json
records it (`monitor_used`, `monitor_fallback_reason`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch

from satrank.jobs.config_checks import build_on_meta
from satrank.jobs.engine.checkpoint import (check_checkpoint, check_prefixed, checkpoint_config, local_tables,
                                            propensity_run, resolve, tables_changed)
from satrank.jobs.engine.cli import build_parser
from satrank.jobs.engine.readers import evaluation_loader, stage_train_config, training_loader
from satrank.jobs.engine.runtime import get_logger
from satrank.jobs.engine.job import run_job
from satrank.jobs.engine.trainer import Trainer
from satrank.jobs.stage1_checks import evaluate_test, stage1_evaluator
from satrank.models.stage1.tasks import SatisfactionModel
from satrank.pipeline.config import ConfigError

STAGE = "satisfaction"
logger = get_logger("satisfaction")


PROPENSITY_MAP = {"sparse_arch.": "propensity.sparse_arch.", "arch.": "propensity.arch."}  # RUN_P -> g's rho


def _needs_propensity(cfg) -> bool:
    return cfg.satisfaction.loss != "naive"


def init_map(sat) -> dict:
    """RUN_BASE's weights g starts from: its tables, and its towers with satisfaction.init_tower_from_pretrain."""
    return {"sparse_arch.": "sparse_arch.", **({"arch.tower.": "arch.tower."} if sat.init_tower_from_pretrain else {})}


def precheck(args, cfg) -> None:
    """Every path argument, and that --init / --propensity fit the model this config builds (their keys and
    shapes, against the model built on the meta device): before any process group exists (same failure on every
    rank) and before anything is written. Sets cfg.propensity (propensity_config)."""
    if args.resume is not None:  # checked by run_job (satrank.jobs.engine.job); --init / --propensity are not loaded
        cfg.propensity = propensity_config(args, cfg)  # recorded in RUN/config.yaml
        return
    sat = cfg.satisfaction
    if sat.tables != "frozen" and not stage_train_config(cfg, STAGE).drop_last:
        raise ConfigError(f"satisfaction.tables={sat.tables} trains g's tables, and row-wise pooled tables need equal "
                          "batch sizes on every rank (gloo all_gather in backward): set satisfaction_train.drop_last="
                          "true (--set satisfaction_train.drop_last=true)")
    if args.init is None and sat.tables != "own":
        raise ConfigError("--init RUN_BASE (a satrank.jobs.pretrain run) is required unless --resume is given "
                          "(or satisfaction.tables=own)")
    if args.init is not None:
        check_checkpoint(args.init, cfg.data, cfg.embeddings, what="--init", expect_job="pretrain")
    if _needs_propensity(cfg) and args.propensity is None:
        raise ConfigError(f"--propensity RUN_P (a satrank.jobs.propensity run) is required for satisfaction.loss="
                          f"{cfg.satisfaction.loss}")
    cfg.propensity = propensity_config(args, cfg)
    model = build_on_meta(STAGE, lambda: SatisfactionModel(cfg.data, cfg.embeddings, cfg.pretrain.tower,
                                                           cfg.satisfaction, cfg.propensity))
    if args.init is not None and sat.tables != "own":
        check_prefixed(args.init, model, init_map(sat), cfg.data, cfg.embeddings, what="--init",
                       expect_job="pretrain")
    if _needs_propensity(cfg):
        check_prefixed(args.propensity, model, PROPENSITY_MAP, cfg.data, cfg.embeddings, what="--propensity",
                       expect_job="propensity")


def propensity_config(args, cfg):
    """The `propensity:` section the frozen rho model is built from: RUN_P's own (RUN_OLD's on --resume, which
    recorded it), so a propensity run trained with other inputs loads without repeating its --set."""
    if not _needs_propensity(cfg):
        return cfg.propensity
    src = args.resume if args.resume is not None else args.propensity
    return (checkpoint_config(resolve(src)) if args.resume is not None else propensity_run(src, cfg.data)[1]).propensity


def run(rt, args, cfg) -> None:
    train = stage_train_config(cfg, STAGE)
    sat = cfg.satisfaction
    if _needs_propensity(cfg):  # set by precheck (propensity_config)
        logger.info("propensity model built from %s's config: %s", args.resume or args.propensity, cfg.propensity)
    torch.manual_seed(train.seed)
    trainer = Trainer(rt, SatisfactionModel(cfg.data, cfg.embeddings, cfg.pretrain.tower, sat, cfg.propensity),
                      emb=cfg.embeddings, train=train, out_dir=args.out, job=STAGE, run_config=cfg)
    try:
        row_filter = None if sat.loss == "dr" else cfg.data.labels.questionnaire_answered
        train_loader = training_loader(cfg, args.data / "train", train, row_filter=row_filter)
        valid_loader = evaluation_loader(cfg, args.data / "valid")
        loaded = {}
        if args.resume is not None:
            trainer.restore(args.resume, train_loader)
        else:
            mapping = {} if sat.tables == "own" else init_map(sat)
            if mapping:
                loaded["init"] = {"path": str(args.init), "keys": len(
                    trainer.load_prefixed(args.init, mapping, what="--init", expect_job="pretrain"))}
            elif args.init is not None:
                logger.info("satisfaction.tables=own loads nothing from --init %s: g's tables and towers start fresh",
                            args.init)
            if _needs_propensity(cfg):
                loaded["propensity"] = {"path": str(args.propensity), "keys": len(trainer.load_prefixed(
                    args.propensity, PROPENSITY_MAP, what="--propensity", expect_job="propensity"))}
            elif args.propensity is not None:
                logger.info("satisfaction.loss=naive uses no propensity: --propensity %s is ignored", args.propensity)
        # every frozen table: the propensity submodule's, and g's unless satisfaction.tables trains them
        frozen_prefix = "" if sat.tables == "frozen" else "propensity."
        frozen = local_tables(trainer.dmp, frozen_prefix)
        evaluator = stage1_evaluator(STAGE, cfg, seed=train.seed)
        fit = trainer.fit(train_loader, valid_loader, evaluator)
        changed = tables_changed(frozen, trainer.dmp, frozen_prefix)
        if changed:
            logger.error("frozen tables changed during training: %s", changed)
        test = evaluate_test(trainer, args.data, cfg, evaluator)
        trainer.write_final(fit, loss_kind=sat.loss, clip=sat.clip, answered_only_training=row_filter is not None,
                            loaded=loaded, tables=sat.tables, frozen_tables=sorted(frozen),
                            frozen_tables_changed=changed, test=test)
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank satisfaction", __doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, default=None, help="satrank.jobs.pretrain run whose tables (frozen) and towers start g")
    parser.add_argument("--propensity", type=Path, default=None, help="satrank.jobs.propensity run (ips / snips / dr)")
    parser.add_argument("--resume", type=Path, default=None, help="continue this satrank.jobs.satisfaction run")
    return run_job(parser, argv, run, stage=STAGE, precheck=precheck, job=STAGE)


if __name__ == "__main__":
    sys.exit(main())
