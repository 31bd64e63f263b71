"""`satrank.jobs.propensity`: the propensity model rho(u, i) = P(questionnaire answered) of SAQRec (eq. 5, Algorithm 1
lines 2-4), trained with BCE on `questionnaire_answered` over ALL impressions.

    torchrun --nproc_per_node=N -m satrank.jobs.propensity --data DIR --out RUN [--config CFG] [--set k=v ...]
        [--resume RUN_OLD]

RUN/metrics.json on DIR/valid (and under `test` on DIR/test when it exists): `auc`, `logloss`, `ece`,
`reliability` (equal-width bins: count, mean predicted, observed answer rate), `pred_distribution` (rho's mean,
std, min, max, quantiles) with `rho_collapsed`, and, where the data has true_p_answered, `ideal_logloss_all`.
Before training, a `propensity.behaviour` input that determines questionnaire_answered on DIR/train is refused
(one line: satrank.jobs.stage1_checks.check_behaviour_leak); `leak_check` reports each input's AUC. The
satisfaction job loads RUN/checkpoint into its frozen propensity submodule (IPS weights 1/max(rho, M)),
so calibration matters as much as ranking. Settings: `propensity:` and `train:` + `propensity_train:`.
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
from satrank.jobs.stage1_checks import check_behaviour_leak, evaluate_test, stage1_evaluator
from satrank.models.stage1.tasks import PropensityModel

STAGE = "propensity"


def precheck(args, cfg) -> None:
    """The leak guard, before any process group exists (the same one-line refusal on every rank)."""
    prop = cfg.propensity
    args.leak_check = check_behaviour_leak(args.data, cfg.data, prop.behaviour, prop.duration_feature)


def run(rt, args, cfg) -> None:
    train = stage_train_config(cfg, STAGE)
    torch.manual_seed(train.seed)
    trainer = Trainer(rt, PropensityModel(cfg.data, cfg.embeddings, cfg.propensity),
                      emb=cfg.embeddings, train=train, out_dir=args.out, job=STAGE, run_config=cfg)
    try:
        train_loader = training_loader(cfg, args.data / "train", train)
        valid_loader = evaluation_loader(cfg, args.data / "valid")
        if args.resume is not None:
            trainer.restore(args.resume, train_loader)
        evaluator = stage1_evaluator(STAGE, cfg)
        fit = trainer.fit(train_loader, valid_loader, evaluator)
        trainer.write_final(fit, leak_check=args.leak_check, test=evaluate_test(trainer, args.data, cfg, evaluator))
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank propensity", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", type=Path, default=None, help="continue this satrank.jobs.propensity run")
    return run_job(parser, argv, run, stage=STAGE, precheck=precheck, job=STAGE)


if __name__ == "__main__":
    sys.exit(main())
