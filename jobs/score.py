"""`satrank.jobs.score`: batch-score candidate sets with a trained model; one scored Parquet shard per input shard.

    torchrun --nproc_per_node=N -m satrank.jobs.score --model RUN --candidates DIR --out OUT_DIR
        [--config CFG] [--set score.key=value ...] [--kind ranker|easq|click|satisfaction] [--overwrite]

Why this shape: candidate sets are many Parquet shards and a request never spans shards, so whole
shards go to ranks (shard i -> rank i % N): every output shard maps to one input shard, ranks need no
collective per batch, and a killed run resumes shard by shard (satrank.pipeline.score_writer).

- Model: RUN is a satrank.jobs.train run (RUN/best, else RUN/checkpoint; RUN/teacher.json for g), a satrank.jobs.dpo run
  (EASQ: the main heads serve, the adapters folded in, satrank.models.easq.task.EasqTask.serving_task) or any
  checkpoint directory of satrank.jobs.engine.checkpoint (stage-1 click / satisfaction models too); the task is
  recognised from its parameter names. Each rank loads it UNSHARDED (satrank.models.serving.module.build_model +
  satrank.jobs.engine.checkpoint.load_checkpoint: DCP reshards whatever world size wrote it; LoRA adapters merged)
  and scores with the model's own eval forward (no labels, loss None), fused by satrank.models.common.fusion.
- Output OUT_DIR/part-XXXXX.parquet (XXXXX = index of the input shard in sorted order): request_id,
  user_id, item_id, p_click, p_satisfied, watch_time_pred, score, rank (1 = best score within the
  request; ties to the earlier row), rows ordered by (request_id, rank); a head the model lacks is
  null. Rows out == rows in per shard (rows rejected under score.on_bad_row=skip are counted, not
  scored), checked and recorded in OUT_DIR/_shards/ and OUT_DIR/_manifest.json.
- Checked up front on every rank alike: schemas, that each shard has request_id, and that no
  request spans two shards (its rank would be computed in two halves): DataError naming them.
- Resume: rerunning the same command skips shards whose output and record are intact; a different
  model, fusion or input list in the same OUT_DIR is refused (or replaced with --overwrite).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.collectives import all_gather_objects
from satrank.jobs.engine.runtime import Runtime, get_logger, init_runtime
from satrank.jobs.config.serve import ScoreConfig, ServeConfig, load_serve_config
from satrank.models.common.fusion import FORMULA, effective_weights
from satrank.models.serving.module import KINDS, ModelScorer, Scorer, build_model, detect_kind, merge_lora
from satrank.pipeline.config import ConfigError
from satrank.pipeline.convert import Converter
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader import BatchLoader, list_shards
from satrank.pipeline.reader_config import ReaderConfig
from satrank.pipeline.score_writer import (ID_COLUMNS, VALUE_COLUMNS, ScoreOutputError, ScoreWriter, output_name,
                                   request_ids_spanning, scores_table, sha256_file)

log = get_logger("score")
KNOWN_ERRORS = (DataError, ckpt.CheckpointError, ConfigError, ScoreOutputError)


# ------------------------------------------------------------------------------------------ model
@dataclass
class LoadedModel:
    model: nn.Module  # unsharded, materialised, eval mode, LoRA merged
    kind: str
    cfg: Any  # satrank.jobs.config.SatrankConfig of the run (the checkpoint's config.yaml)
    meta: Dict[str, Any]  # the checkpoint's meta.json
    path: Path  # checkpoint directory
    run_dir: Path
    teacher: Any
    lora: Dict[str, Any]


def checkpoint_model_keys(path: Path) -> List[str]:
    """Parameter/buffer names of the model part of a DCP checkpoint (without the "model." prefix)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path / ckpt.STATE_DIR)).read_metadata().state_dict_metadata
    return sorted(k[len("model."):] for k in md if k.startswith("model."))


def load_model(model_path: str | Path, kind: Optional[str] = None) -> LoadedModel:
    """The model of a run directory or checkpoint, unsharded on CPU; CheckpointError naming the problem
    when the path is not a checkpoint or the rebuilt model does not match it."""
    from satrank.jobs.evaluate import TEACHER_FILE, checkpoint_config, run_checkpoint, teacher_from_dict
    from satrank.models.ranker.task import needs_teacher

    path = run_checkpoint(model_path)
    meta = ckpt.read_meta(path)
    cfg = checkpoint_config(path)
    keys = checkpoint_model_keys(path)
    try:
        kind = kind or detect_kind(keys)
    except ValueError as exc:
        raise ckpt.CheckpointError(f"{path}: {exc}") from None
    run_dir = path.parent if path.name in ("best", "checkpoint") else path
    teacher = None
    if kind in ("ranker", "easq") and needs_teacher(cfg.model):
        tfile = next((p for p in (run_dir / TEACHER_FILE, path / TEACHER_FILE) if p.is_file()), None)
        if tfile is None:
            raise ckpt.CheckpointError(f"{model_path}: the ranker needs its satisfaction model g but "
                                       f"{run_dir / TEACHER_FILE} (written by satrank.jobs.train) is missing")
        teacher = teacher_from_dict(json.loads(tfile.read_text()))
    torch.manual_seed(0)
    model = build_model(kind, cfg, teacher)
    mine = set(model.state_dict())
    unknown = sorted(set(keys) - mine)
    if unknown:
        raise ckpt.CheckpointError(
            f"{path}: the checkpoint holds {len(unknown)} tensor(s) the rebuilt {kind} model lacks, e.g. "
            f"{unknown[:5]} (a different model class, or adapters this job does not know how to rebuild)")
    ckpt.load_checkpoint(path, model)
    if kind == "easq":  # a satrank.jobs.dpo run: serve the main heads with the EASQ adapters folded in
        easq_cfg = model.easq_cfg
        model = model.serving_task()
        lora = {**merge_lora(model), "easq": {"pathway": easq_cfg.pathway, "targets": list(easq_cfg.targets),
                                              "folded": "merged into user_proj / item_proj + item_in",
                                              "id_targets": list(easq_cfg.id_targets),  # teacher-only, not served
                                              "satisfaction_head": "not served (main heads only)"}}
    else:
        lora = merge_lora(model)
    return LoadedModel(model.eval(), kind, cfg, meta, path, run_dir, teacher, lora)


# ------------------------------------------------------------------------------------------ inputs
def shard_info(path: str, root: str, data: DataConfig) -> Dict[str, Any]:
    """name, bytes, sha256, rows and request ids of one candidate shard; DataError on a bad schema."""
    conv = Converter(data, with_labels=False)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    conv.check_schema(pf.schema_arrow, path)
    rid_col = data.ids.request_id
    if rid_col not in pf.schema_arrow.names:
        raise DataError(f"{path}: column {rid_col!r} (id request_id) is missing; scoring ranks candidates within "
                        f"requests. The file has columns {pf.schema_arrow.names}")
    rids = pf.read(columns=[rid_col]).column(rid_col)
    if rids.null_count:
        raise DataError(f"{path}: column {rid_col!r} has {rids.null_count} null value(s)")
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    return {"name": name, "path": path, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "rows": pf.metadata.num_rows, "request_ids": np.unique(rids.to_numpy())}


def assign(n_files: int, rank: int, world_size: int) -> List[int]:
    """Whole shards to ranks: shard i goes to rank i % world_size."""
    return list(range(rank, n_files, world_size))


def score_file(scorer: Scorer, path: str, data: DataConfig, score: ScoreConfig,
               progress: Optional[Callable[[int], Any]] = None) -> Tuple[pa.Table, Dict[str, Any]]:
    """Score every row of one candidate shard -> (output table, reader stats with rows_rejected)."""
    rcfg = ReaderConfig(batch_size=score.batch_size, num_workers=score.num_workers, shuffle=False,
                        on_bad_row=score.on_bad_row, drop_last=False)
    loader = BatchLoader(path, data, rcfg, rank=0, world_size=1, with_labels=False)
    ids: Dict[str, List[np.ndarray]] = {c: [] for c in ID_COLUMNS}
    values: Dict[str, List[np.ndarray]] = {c: [] for c in VALUE_COLUMNS}
    for batch in loader:
        out = scorer(batch)
        for c in ID_COLUMNS:
            ids[c].append(batch.ids[c].numpy().copy())  # copy: batch tensors view the reader's shared buffers
        for c in VALUE_COLUMNS:
            values[c].append(out[c].numpy().astype(np.float32))
        if progress is not None:
            progress(batch.size)
    stats = loader.stats()
    cat = lambda d, dt: {c: (np.concatenate(v) if v else np.zeros(0, dt)) for c, v in d.items()}  # noqa: E731
    try:
        table = scores_table(cat(ids, np.int64), cat(values, np.float32))
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    return table, stats


def run_identity(loaded: LoadedModel, scorer: Scorer, score: ScoreConfig, inputs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """What the scores in OUT_DIR depend on (a rerun must match it to resume)."""
    return {
        "model": {"checkpoint": str(loaded.path.resolve()), "fingerprint": loaded.meta["fingerprint"],
                  "created_unix": loaded.meta.get("created_unix"), "kind": loaded.kind},
        "heads": list(scorer.heads),
        "fusion": {"formula": FORMULA, "weights": score.fusion.weights(),
                   "effective_weights": effective_weights(score.fusion, scorer.heads)},
        "on_bad_row": score.on_bad_row,
        "inputs": [i["name"] for i in inputs],
    }


# ------------------------------------------------------------------------------------------ collectives
def _together(fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it failed anywhere, raise the first failure on every rank (no rank is
    left waiting in a later collective). Returns this rank's result."""
    try:
        res, err = fn(), None
    except KNOWN_ERRORS as exc:
        res, err = None, (type(exc).__name__, str(exc))
    gathered = all_gather_objects(err)
    errors = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if errors:
        rank, (name, msg) = errors[0]
        cls = {c.__name__: c for c in KNOWN_ERRORS}[name]
        raise cls(msg if rank == 0 or len(errors) == len(gathered) else f"(rank {rank}) {msg}")
    return res


# ------------------------------------------------------------------------------------------ job
def run(rt: Runtime, args: argparse.Namespace, serve: ServeConfig) -> Dict[str, Any]:
    started = time.perf_counter()
    score = serve.score
    loaded = _together(lambda: load_model(args.model, args.kind))
    data = loaded.cfg.data
    scorer = ModelScorer(loaded.model, score.fusion, data, rt.device)
    missing = [h for h in ("p_click", "p_satisfied", "watch_time_pred") if h not in scorer.heads]
    if missing and rt.is_main:
        log.warning("the %s model has no %s head(s): those columns are null and their fusion weights count as 0",
                    loaded.kind, missing)

    def inputs_of_mine():
        _, files = list_shards(str(args.candidates))
        root = str(args.candidates) if Path(args.candidates).is_dir() else ""
        return {i: shard_info(files[i], root, data) for i in assign(len(files), rt.rank, rt.world_size)}

    per_rank = all_gather_objects(_together(inputs_of_mine))
    infos = {i: info for part in per_rank for i, info in part.items()}
    inputs = [infos[i] for i in range(len(infos))]

    def check_requests():
        span = request_ids_spanning({i["name"]: i["request_ids"] for i in inputs})
        if span:
            shown = "; ".join(f"request {r} in {files}" for r, files in list(span.items())[:5])
            raise DataError(f"{args.candidates}: requests span several shards ({shown}); a request's candidates "
                            "must sit in one shard (ranks are computed per shard): regroup the candidate files")

    _together(check_requests)
    identity = run_identity(loaded, scorer, score, inputs)
    token = all_gather_objects(f"{int(time.time() * 1000)}-{os.getpid()}")[0]
    writer = ScoreWriter(args.out, identity, rt.rank, rt.world_size, run_token=token)
    _together(lambda: writer.prepare(args.overwrite) if rt.is_main else None)

    mine = assign(len(inputs), rt.rank, rt.world_size)
    todo, skipped = [], []
    for i in mine:
        (skipped if writer.done(i, inputs[i]["sha256"]) else todo).append(i)
    if skipped:
        log.info("resuming: %d of this rank's %d shard(s) already complete, skipped", len(skipped), len(mine))
    rows, t0 = 0, time.perf_counter()
    bar = rt.progress(total=sum(inputs[i]["rows"] for i in todo), desc=f"score (rank 0 of {rt.world_size})")
    try:
        for i in todo:
            s0 = time.perf_counter()
            table, stats = score_file(scorer, inputs[i]["path"], data, score, bar.update)
            rec = writer.write_shard(i, table, inputs[i], stats["rows_rejected"],
                                     extra={"wall_s": round(time.perf_counter() - s0, 3),
                                            "oov_hits": stats["oov_hits"]})
            rows += rec["rows_out"]
            log.debug("%s: %d rows in %.2fs", output_name(i), rec["rows_out"], rec["wall_s"])
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    mine_run = {"rank": rt.rank, "scored": todo, "skipped": skipped, "rows": rows, "wall_s": wall}
    ranks = all_gather_objects(mine_run)
    total_rows = sum(r["rows"] for r in ranks)
    scoring_wall = max(r["wall_s"] for r in ranks)
    run_rec = {"run_token": token, "world_size": rt.world_size, "started_unix": time.time() - (time.perf_counter() - started),
               "scored": sorted(output_name(i) for r in ranks for i in r["scored"]),
               "skipped": sorted(output_name(i) for r in ranks for i in r["skipped"]),
               "rows_scored": total_rows, "scoring_wall_s": round(scoring_wall, 3),
               "rows_per_s": round(total_rows / scoring_wall, 1) if scoring_wall > 0 and total_rows else None,
               "total_wall_s": round(time.perf_counter() - started, 3), "device": str(rt.device)}
    manifest = _together(lambda: writer.finalize(inputs, run_rec) if rt.is_main else None)
    if rt.is_main:
        t = manifest["totals"]
        log.info("scored %d shard(s) (%d skipped as complete): %d rows in, %d out, %d requests -> %s; %s rows/s",
                 len(run_rec["scored"]), len(run_rec["skipped"]), t["rows_in"], t["rows_out"], t["requests"],
                 args.out, run_rec["rows_per_s"])
    return run_rec


def one_line(exc: BaseException) -> str:
    """The message of a known error; a DataLoader worker's re-raise carries the worker traceback in its
    message, of which only the last line (the original error) is kept."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return msg.replace("reader.on_bad_row", "score.on_bad_row")


def build_arg_parser() -> argparse.ArgumentParser:
    from satrank.jobs.engine.cli import build_parser

    parser = build_parser("satrank score", __doc__.split("\n\n")[0], data=False, out=True)
    parser.add_argument("--model", type=Path, required=True,
                        help="satrank.jobs.train or satrank.jobs.dpo run directory, or a checkpoint directory")
    parser.add_argument("--candidates", type=Path, required=True, help="candidate Parquet shards (a directory or one file)")
    parser.add_argument("--kind", choices=list(KINDS), default=None,
                        help="model task (default: recognised from the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace scores of another run in --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.config is not None and not args.config.is_file():
            raise ConfigError(f"--config {str(args.config)!r}: no such file")
        serve = load_serve_config(args.config, args.overrides)
        if not args.candidates.exists():
            raise DataError(f"--candidates {str(args.candidates)!r}: no such file or directory")
        from satrank.jobs.evaluate import run_checkpoint

        run_checkpoint(args.model)  # fail fast (before any process group) when it is not a checkpoint
    except KNOWN_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    rt = init_runtime(seed=0, device=serve.score.device, debug=args.debug)
    try:
        run(rt, args, serve)
    except KNOWN_ERRORS as exc:
        print(f"{prog}: error (rank {rt.rank}): {one_line(exc)}", file=sys.stderr, flush=True)
        if rt.world_size > 1:
            os._exit(2 if isinstance(exc, ConfigError) else 1)
        rt.close()
        return 2 if isinstance(exc, ConfigError) else 1
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
