"""`satrank.jobs.serve_check`: verify a serving artifact (satrank.jobs.export) the way a serving host would use it.

    python -m satrank.jobs.serve_check EXPORT_DIR CANDIDATES [--compare SCORED_DIR] [--model-file model_int8.pt]
        [--batch-size 4096] [--atol 1e-5]

Checksums, then the TorchScript module scores CANDIDATES converted by the manifest alone, optionally compared
with the batch scorer's output (satrank.models.serving.check, which imports no other project code, TorchRec or
FBGEMM). Prints one JSON report on stdout. Exit 0 = ok, 1 = scores differ, 2 = bad artifact or bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from satrank.models.serving.check import ServeCheckError, check


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="satrank serve_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="artifact directory written by satrank.jobs.export")
    parser.add_argument("candidates", help="candidate Parquet file or directory")
    parser.add_argument("--compare", default=None, metavar="SCORED_DIR", help="satrank.jobs.score output to compare with")
    parser.add_argument("--model-file", default=None, help="artifact file to load (default: manifest model_file)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--atol", type=float, default=1e-5, help="max |difference| allowed per output")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be > 0, got {args.batch_size}")
    try:
        report = check(args.export_dir, args.candidates, args.compare, args.model_file, args.batch_size, args.atol)
    except ServeCheckError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
