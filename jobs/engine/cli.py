"""Shared command line of every satrank job: --config FILE, repeatable --set key.path=value,
--data DIR, --out DIR; the config is loaded through satrank.jobs.config.load_config (embedded default
configs/sim.yaml when --config is absent) and checked whole (satrank.jobs.config_checks.check_config: every
stage's model builds, every monitor is a metric of its job) before the job does anything else; a config error
exits 2 with one line naming the key path."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

from satrank.jobs.config import DEFAULT_CONFIG, SatrankConfig, load_config
from satrank.jobs.config_checks import check_config
from satrank.pipeline.config import ConfigError


def build_parser(
    prog: str,
    description: str,
    *,
    data: bool = True,
    out: bool = True,
    data_required: bool = True,
    out_required: bool = True,
) -> argparse.ArgumentParser:
    """Parser with the shared options; jobs add their own arguments to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config file (default: the embedded {DEFAULT_CONFIG.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (YAML-parsed), repeatable, e.g. --set reader.batch_size=2048")
    if data:
        parser.add_argument("--data", type=Path, required=data_required, default=None,
                            help="dataset directory (train/, valid/, test/, candidates/ Parquet)")
    if out:
        parser.add_argument("--out", type=Path, required=out_required, default=None,
                            help="run/output directory")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging on every rank")
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> Tuple[argparse.Namespace, SatrankConfig]:
    """Parse argv, load the config and check it whole; a bad argument exits 2 with argparse's usage, a config that
    cannot run (bad file, override or cross-field rule) exits 2 with one line `<prog>: error: <key path>: ...`."""
    args = parser.parse_args(argv)
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config {str(args.config)!r}: no such file")
    data_dir = getattr(args, "data", None)
    if data_dir is not None and not data_dir.is_dir():
        parser.error(f"--data {str(data_dir)!r}: not a directory")
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    return args, cfg
