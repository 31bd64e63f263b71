"""`satrank.jobs.report`: one self-contained HTML report (figures inlined) of the runs given.

    python -m satrank.jobs.report RUN [RUN ...] --out report.html [--title T] [--overwrite]

RUN is a run directory of any job (metrics.json / metrics.jsonl) or a folder of runs (`make demo`'s
runs/demo). The page holds the training and validation curves of every run, the reliability diagrams of the
click, propensity and satisfaction models, g's offline estimates with their intervals, the trade-off of
true_sat@10 against true_click@10 as the fusion weight w_sat sweeps, the stage-2 table (alignment and
ablations, with the oracles), DPO before / after and the oracle headroom (satrank.jobs.reporting). Written
atomically; an existing --out is refused unless --overwrite. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from satrank.jobs.reporting.figures import all_figures
from satrank.jobs.reporting.html import page
from satrank.jobs.reporting.runs import ReportError, find_runs
from satrank.pipeline.atomic import write_text_atomic


def build_report(paths: List[Path], out: Path, title: str = "satrank report") -> Path:
    """Read the runs under `paths`, draw the figures, write the page to `out` (atomically); returns `out`."""
    runs = find_runs(paths)
    return write_text_atomic(out, page(title, runs, all_figures(runs)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="satrank report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, or folders of runs")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--title", default="satrank report")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out}: already exists; pass --overwrite to replace it")
    try:
        path = build_report(args.runs, args.out, args.title)
    except ReportError as exc:
        parser.error(str(exc))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
