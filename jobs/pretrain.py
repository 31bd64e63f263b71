"""`satrank.jobs.pretrain`: the click model (base ranker) of SAQRec Algorithm 1, whose embedding tables (and towers)
initialise the satisfaction model (sec. 4.2.2); logit = <u, v> + b, BCE on clicks (eq. 15).

    torchrun --nproc_per_node=N -m satrank.jobs.pretrain --data DIR --out RUN [--config CFG] [--set k=v ...]
        [--resume RUN_OLD]

Trains on DIR/train, evaluates on DIR/valid (click AUC, log loss, ECE; log loss against true_p_click where
the data has it) and, after restore_best, DIR/test when it exists (`test` in metrics.json), and writes
RUN/checkpoint (reshardable DCP + config + sharding plan + reader positions), RUN/best, RUN/metrics.json and
RUN/metrics.jsonl. Where every validation row is clicked (one class) it keeps its last epoch (logged). Settings: `pretrain:` (model) and `train:` with the
`pretrain_train:` overrides (loop). --resume continues a satrank.jobs.pretrain checkpoint at any world size.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch

from satrank.jobs.engine.cli import build_parser
from satrank.jobs.engine.readers import evaluation_loader, stage_train_config, training_loader
from satrank.jobs.engine.job import run_job
from satrank.jobs.engine.trainer import Trainer
from satrank.jobs.stage1_checks import evaluate_test, stage1_evaluator
from satrank.models.stage1.tasks import ClickModel

STAGE = "pretrain"


def run(rt, args, cfg) -> None:
    train = stage_train_config(cfg, STAGE)
    torch.manual_seed(train.seed)
    p = cfg.pretrain
    model = ClickModel(cfg.data, cfg.embeddings, p.tower, watch_time_weight=p.watch_time_weight,
                       watch_time_rows=p.watch_time_rows, watch_time_target=p.watch_time_target,
                       duration_feature=p.duration_feature)
    trainer = Trainer(rt, model,
                      emb=cfg.embeddings, train=train, out_dir=args.out, job=STAGE, run_config=cfg)
    try:
        train_loader = training_loader(cfg, args.data / "train", train)
        valid_loader = evaluation_loader(cfg, args.data / "valid")
        if args.resume is not None:
            trainer.restore(args.resume, train_loader)
        evaluator = stage1_evaluator(STAGE, cfg)
        fit = trainer.fit(train_loader, valid_loader, evaluator)
        trainer.write_final(fit, test=evaluate_test(trainer, args.data, cfg, evaluator))
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank pretrain", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue this satrank.jobs.pretrain run (RUN or RUN/checkpoint)")
    return run_job(parser, argv, run, stage=STAGE, job=STAGE)


if __name__ == "__main__":
    sys.exit(main())
