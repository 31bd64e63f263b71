"""Batch scoring of candidate shards (the library behind satrank.jobs.score): whole shards to ranks,
one scored Parquet shard per input shard, resumable through satrank.pipeline.score_writer.

Why this shape: candidate sets are many Parquet shards and a request never spans shards, so whole
shards go to ranks (shard i -> rank i % N): every output shard maps to one input shard, ranks need no
collective per batch, and a killed run resumes shard by shard. The job supplies its collectives
(`gather(obj) -> list over ranks`, `together(fn)`: run fn on every rank and re-raise the first
failure everywhere), so this module needs no process group of its own.

Scorers: under score.request_level (the default) a ranker / easq model scores request by request
(satrank.models.serving.request.RequestBatchScorer: the user side once per request of each batch); other
kinds, a model the request-level core refuses, and score.request_level=false run the model's forward per row
(ModelScorer). Both give the same scores within float rounding (tests/test_score_request.py).

Output columns: request_id, user_id, item_id, one per served head (satrank.models.ranker.heads:
p_click, p_satisfied, watch_time_pred, then p_<name> of any other head; null where the model lacks
the head), score, rank (1 = best score within the request; ties to the earlier row).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from satrank.models.common.fusion import effective_weights, formula
from satrank.models.serving.module import ModelScorer, Scorer
from satrank.pipeline.convert import Converter
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader import BatchLoader, list_shards
from satrank.pipeline.reader_config import ReaderConfig
from satrank.pipeline.score_writer import (ID_COLUMNS, ScoreWriter, output_name, request_ids_spanning, scores_table,
                                           sha256_file)

log = logging.getLogger("satrank.score")


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
    item_col = data.ids.item_id
    cols = pf.read(columns=[rid_col, item_col] if item_col in pf.schema_arrow.names else [rid_col])
    rids = cols.column(rid_col)
    if rids.null_count:
        raise DataError(f"{path}: column {rid_col!r} has {rids.null_count} null value(s)")
    if item_col in cols.column_names:  # a request ranks each item once: a repeated pair has no single rank
        r, it = rids.to_numpy(), cols.column(item_col).to_numpy(zero_copy_only=False)
        order = np.lexsort((it, r))
        same = (r[order][1:] == r[order][:-1]) & (it[order][1:] == it[order][:-1])
        if same.any():
            k = int(np.argmax(same))
            first, second = sorted((int(order[k]), int(order[k + 1])))
            raise DataError(f"{path}: rows {first} and {second} repeat (request_id, item_id) = ({r[first]}, {it[first]}); "
                            f"{int(same.sum())} repeated pair(s) in the file: a request ranks each item once")
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    return {"name": name, "path": path, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "rows": pf.metadata.num_rows, "request_ids": np.unique(rids.to_numpy())}


def assign(n_files: int, rank: int, world_size: int) -> List[int]:
    """Whole shards to ranks: shard i goes to rank i % world_size."""
    return list(range(rank, n_files, world_size))


def make_scorer(loaded: Any, score: Any, device: Any) -> Scorer:
    """The request-level RequestBatchScorer when score.request_level is on and the model allows it, else the
    per-row ModelScorer (the reason logged)."""
    from satrank.models.serving.request import REQUEST_KINDS, RequestBatchScorer, RequestCore, RequestLevelError

    data = loaded.cfg.data
    if score.request_level and loaded.kind in REQUEST_KINDS:
        try:
            return RequestBatchScorer(RequestCore(loaded.model, loaded.kind, data, score.fusion, loaded.specs), device)
        except RequestLevelError as exc:
            log.warning("scoring per row: %s", exc)
    elif score.request_level:
        log.info("scoring per row: the %s model has no user / candidate split (request-level kinds: %s)",
                 loaded.kind, list(REQUEST_KINDS))
    return ModelScorer(loaded.model, score.fusion, data, device, loaded.specs)


def score_file(scorer: Scorer, path: str, data: DataConfig, score: Any,
               progress: Optional[Callable[[int], Any]] = None) -> Tuple[pa.Table, Dict[str, Any]]:
    """Score every row of one candidate shard -> (output table, reader stats with rows_rejected).
    `score`: the `score:` section (batch_size, num_workers, on_bad_row)."""
    rcfg = ReaderConfig(batch_size=score.batch_size, num_workers=score.num_workers, shuffle=False,
                        on_bad_row=score.on_bad_row, drop_last=False)
    loader = BatchLoader(path, data, rcfg, rank=0, world_size=1, with_labels=False)
    if hasattr(scorer, "begin_file"):  # the request-level scorer checks a request's rows across batches
        scorer.begin_file(path)
    ids: Dict[str, List[np.ndarray]] = {c: [] for c in ID_COLUMNS}
    values: Dict[str, List[np.ndarray]] = {c: [] for c in scorer.outputs}
    for batch in loader:
        out = scorer(batch)
        for c in ID_COLUMNS:
            ids[c].append(batch.ids[c].numpy().copy())  # copy: batch tensors view the reader's shared buffers
        for c in scorer.outputs:
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


def run_identity(loaded: Any, scorer: Scorer, score: Any, inputs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """What the scores in OUT_DIR depend on (a rerun must match it to resume)."""
    return {
        "model": {"checkpoint": str(loaded.path.resolve()), "fingerprint": loaded.meta["fingerprint"],
                  "created_unix": loaded.meta.get("created_unix"), "kind": loaded.kind},
        "heads": list(scorer.heads),
        "fusion": {"formula": formula(scorer.specs), "weights": score.fusion.weights(),
                   "effective_weights": effective_weights(score.fusion, scorer.heads, scorer.specs)},
        "on_bad_row": score.on_bad_row,
        "inputs": [i["name"] for i in inputs],
    }


def score_candidates(rt: Any, loaded: Any, candidates: Path, out: Path, score: Any, overwrite: bool,
                     gather: Callable[[Any], List[Any]], together: Callable[[Callable[[], Any]], Any]) -> Dict[str, Any]:
    """Score every candidate shard (this rank's share) into `out`; rank 0 writes the manifest. Returns the
    run record. `rt`: rank, world_size, device, is_main, progress(total, desc) of the job's runtime."""
    started = time.perf_counter()
    data = loaded.cfg.data
    scorer = make_scorer(loaded, score, rt.device)
    request_level = not isinstance(scorer, ModelScorer)
    missing = [s.name for s in scorer.specs if s.name not in scorer.heads]
    if missing and rt.is_main:
        log.warning("the %s model has no %s head(s): those columns are null and their fusion weights count as 0",
                    loaded.kind, missing)

    def inputs_of_mine():
        _, files = list_shards(str(candidates))
        root = str(candidates) if Path(candidates).is_dir() else ""
        return {i: shard_info(files[i], root, data) for i in assign(len(files), rt.rank, rt.world_size)}

    infos = {i: info for part in gather(together(inputs_of_mine)) for i, info in part.items()}
    inputs = [infos[i] for i in range(len(infos))]

    def check_requests():
        span = request_ids_spanning({i["name"]: i["request_ids"] for i in inputs})
        if span:
            shown = "; ".join(f"request {r} in {files}" for r, files in list(span.items())[:5])
            raise DataError(f"{candidates}: requests span several shards ({shown}); a request's candidates "
                            "must sit in one shard (ranks are computed per shard): regroup the candidate files")

    together(check_requests)
    token = gather(f"{int(time.time() * 1000)}-{os.getpid()}")[0]
    writer = ScoreWriter(out, run_identity(loaded, scorer, score, inputs), rt.rank, rt.world_size, run_token=token)
    together(lambda: writer.prepare(overwrite) if rt.is_main else None)
    mine = assign(len(inputs), rt.rank, rt.world_size)
    todo = [i for i in mine if not writer.done(i, inputs[i]["sha256"])]
    skipped = [i for i in mine if i not in todo]
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
    ranks = gather({"rank": rt.rank, "scored": todo, "skipped": skipped, "rows": rows,
                    "wall_s": time.perf_counter() - t0})
    total_rows = sum(r["rows"] for r in ranks)
    scoring_wall = max(r["wall_s"] for r in ranks)
    run_rec = {"run_token": token, "world_size": rt.world_size, "started_unix": time.time() - (time.perf_counter() - started),
               "scored": sorted(output_name(i) for r in ranks for i in r["scored"]),
               "skipped": sorted(output_name(i) for r in ranks for i in r["skipped"]),
               "rows_scored": total_rows, "scoring_wall_s": round(scoring_wall, 3),
               "rows_per_s": round(total_rows / scoring_wall, 1) if scoring_wall > 0 and total_rows else None,
               "total_wall_s": round(time.perf_counter() - started, 3), "device": str(rt.device),
               "request_level": request_level}
    manifest = together(lambda: writer.finalize(inputs, run_rec) if rt.is_main else None)
    if rt.is_main:
        t = manifest["totals"]
        log.info("scored %d shard(s) (%d skipped as complete): %d rows in, %d out, %d requests -> %s; %s rows/s (%s)",
                 len(run_rec["scored"]), len(run_rec["skipped"]), t["rows_in"], t["rows_out"], t["requests"],
                 out, run_rec["rows_per_s"], "request-level" if request_level else "per row")
    return run_rec
