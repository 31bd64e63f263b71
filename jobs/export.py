"""`satrank.jobs.export`: a self-contained serving artifact of a trained model (TorchScript + manifest).

    python -m satrank.jobs.export --model RUN --out EXPORT_DIR [--data DIR] [--config CFG]
        [--set export.int8=true] [--set score.fusion.w_sat=2.0] [--kind ...] [--overwrite]

The run is loaded unsharded (satrank.jobs.engine.runs.load_model: any world size that wrote it, LoRA merged, a
satrank.jobs.dpo run serving its main heads with the EASQ adapters folded in; its kind from meta.json) and
satrank.models.serving.export builds, checks and atomically publishes EXPORT_DIR (model.pt, model_request.pt
for ranker / easq runs (one request per call, user side once; satrank.models.serving.request), model_int8.pt
with export.int8, config.yaml, manifest.json, SHA256SUMS; see there). satrank.jobs.serve_check verifies an artifact
in a fresh process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from satrank.jobs.config.serve import ServeConfig, load_serve_config
from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.runs import load_model
from satrank.jobs.engine.runtime import init_runtime
from satrank.models.serving.export import build_artifact
from satrank.models.serving.module import KINDS
from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError

KNOWN_ERRORS = (DataError, ckpt.CheckpointError, ConfigError)


def export(model_path: Path, out: Path, serve: ServeConfig, data_dir: Optional[Path] = None,
           kind: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Load the run, then build, check and publish its artifact; returns the manifest."""
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    if serve.export.int8 and data_dir is None:
        raise ConfigError("export.int8 needs --data DIR (a labelled held-out split measures its AUC change)")
    return build_artifact(load_model(model_path, kind), out, serve, data_dir, overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from satrank.jobs.engine.cli import build_parser

    parser = build_parser("satrank export", __doc__.split("\n\n")[0], data=True, data_required=False, out=True)
    parser.add_argument("--model", type=Path, required=True,
                        help="satrank.jobs.train or satrank.jobs.dpo run directory, or a checkpoint directory")
    parser.add_argument("--kind", choices=list(KINDS), default=None,
                        help="model task (default: from the checkpoint's meta.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        if args.config is not None and not args.config.is_file():
            raise ConfigError(f"--config {str(args.config)!r}: no such file")
        if args.data is not None and not args.data.is_dir():
            raise ConfigError(f"--data {str(args.data)!r}: not a directory")
        serve = load_serve_config(args.config, args.overrides)
        rt = init_runtime(seed=0, device="cpu", debug=args.debug)  # logging; export runs on CPU, one process
        try:
            export(args.model, args.out, serve, args.data, args.kind, args.overwrite)
        finally:
            rt.close()
    except KNOWN_ERRORS as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
