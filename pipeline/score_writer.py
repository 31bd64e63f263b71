"""Scored candidate shards on disk: atomic Parquet outputs, per-shard exactly-once accounting, resume.

Why: a scoring run over many candidate shards on several ranks must survive being killed at any
moment and rerun without duplicating or losing a row, and a consumer must never read half a file.

Layout of OUT_DIR (names starting with '.' or '_' are ignored by satrank.pipeline.reader.list_shards):
  part-XXXXX.parquet   scores of input shard XXXXX (index in the sorted input list), one row per
                       input row; written to .part-XXXXX.parquet.tmp-<pid>, fsynced, os.replace'd
  _shards/part-XXXXX.json   the shard's completion record, written (atomically) only after its
                       output is in place: input name/bytes/sha256, rows in/out/rejected, requests,
                       output sha256/bytes, which rank and run wrote it
  _run.json            what these scores are (model fingerprint, fusion, data signature, inputs):
                       a rerun with anything different is refused instead of mixing outputs
  _manifest.json       written by rank 0 when every shard is complete: all records, totals, and the
                       history of runs (which shards each scored and which it skipped)

A shard counts as done iff its record exists, its output file exists with the recorded sha256 and
its input still has the recorded sha256; anything else is (re)scored, and since the output name is
fixed, rescoring replaces rather than duplicates. Killed between os.replace and the record, a shard
is simply scored again. Concurrent runs on one OUT_DIR are not supported.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from satrank.pipeline.atomic import write_json_atomic
from satrank.pipeline.errors import DataError

FORMAT = "satrank-scores/1"
SHARDS_DIR = "_shards"
RUN_FILE = "_run.json"
MANIFEST = "_manifest.json"
ID_COLUMNS = ("request_id", "user_id", "item_id")
VALUE_COLUMNS = ("p_click", "p_satisfied", "watch_time_pred", "score")  # the built-in heads' columns + score


def schema(value_columns: Sequence[str] = VALUE_COLUMNS) -> pa.Schema:
    """ids (int64), one float32 column per served head and score (the scorer's order), rank (int32)."""
    return pa.schema([*[(c, pa.int64()) for c in ID_COLUMNS], *[(c, pa.float32()) for c in value_columns],
                      ("rank", pa.int32())])


class ScoreOutputError(ValueError):
    """OUT_DIR holds something incompatible with this run (other model/config/inputs); says what."""


def output_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def rank_within_requests(request_id: np.ndarray, score: np.ndarray) -> np.ndarray:
    """1 = highest score within each request; ties go to the earlier row. int32 [n]."""
    request_id = np.asarray(request_id, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    if not np.isfinite(score).all():
        bad = int(np.flatnonzero(~np.isfinite(score))[0])
        raise ValueError(f"score is not finite at row {bad} (request {int(request_id[bad])}): {score[bad]}")
    n = request_id.size
    order = np.lexsort((np.arange(n), -score, request_id))
    rid = request_id[order]
    first = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if n else np.zeros(0, np.int64)
    start = np.repeat(first, np.diff(np.r_[first, n]))
    rank = np.empty(n, dtype=np.int32)
    rank[order] = (np.arange(n) - start + 1).astype(np.int32)
    return rank


def scores_table(ids: Dict[str, np.ndarray], values: Dict[str, np.ndarray]) -> pa.Table:
    """The output table of one shard, rows ordered by (request_id, rank); NaN heads become nulls. `values`
    holds one array per served head's column and `score`, in column order (satrank.models.ranker.heads)."""
    if "score" not in values:
        raise ValueError(f"scores_table: no 'score' among the value columns {list(values)}")
    rank = rank_within_requests(ids["request_id"], values["score"])
    order = np.lexsort((rank, ids["request_id"]))
    arrays = [pa.array(np.asarray(ids[c], dtype=np.int64)[order]) for c in ID_COLUMNS]
    for c in values:
        v = np.asarray(values[c], dtype=np.float32)[order]
        arrays.append(pa.array(v, mask=np.isnan(v)))
    arrays.append(pa.array(rank[order]))
    return pa.Table.from_arrays(arrays, schema=schema(list(values)))


def request_ids_spanning(per_file: Dict[str, np.ndarray]) -> Dict[int, List[str]]:
    """request_id -> the files it occurs in, for the requests found in more than one file."""
    names = sorted(per_file)
    if not names:
        return {}
    ids = np.concatenate([np.unique(per_file[n]) for n in names])
    owner = np.concatenate([np.full(np.unique(per_file[n]).size, i) for i, n in enumerate(names)])
    uniq, counts = np.unique(ids, return_counts=True)
    out: Dict[int, List[str]] = {}
    for rid in uniq[counts > 1][:10]:
        out[int(rid)] = [names[i] for i in owner[ids == rid]]
    return out


class ScoreWriter:
    """One rank's view of OUT_DIR. `prepare` (rank 0, before the others start) checks/records the run
    identity and removes temp files of killed runs; `done` / `write_shard` are per shard; `finalize`
    (rank 0, after every rank finished) writes _manifest.json."""

    def __init__(self, out_dir: str | Path, identity: Dict[str, Any], rank: int = 0, world_size: int = 1,
                 run_token: Optional[str] = None) -> None:
        self.out = Path(out_dir)
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.rank, self.world_size = rank, world_size
        self.run_token = run_token or f"{int(time.time() * 1000)}-{os.getpid()}"

    # ---------------------------------------------------------------- run level
    def prepare(self, overwrite: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        run_file = self.out / RUN_FILE
        if run_file.exists() and not overwrite:
            try:
                saved = json.loads(run_file.read_text()).get("identity")
            except json.JSONDecodeError as exc:
                raise ScoreOutputError(f"{run_file}: not valid JSON ({exc}); remove it or pass --overwrite") from None
            if saved != self.identity:
                diff = _diff(saved or {}, self.identity)
                raise ScoreOutputError(
                    f"{self.out} holds scores of a different run ({'; '.join(diff[:5])}); use another --out "
                    f"or pass --overwrite to replace them")
        if overwrite:
            for p in [*self.out.glob("part-*.parquet"), *(self.out / SHARDS_DIR).glob("*.json"),
                      self.out / MANIFEST, run_file]:
                if p.exists():
                    p.unlink()
        elif any(self.out.glob("part-*.parquet")) and not run_file.exists():
            raise ScoreOutputError(f"{self.out} holds part-*.parquet files without {RUN_FILE}: not written by "
                                   "satrank.jobs.score; use another --out or pass --overwrite")
        for tmp in [*self.out.glob(".part-*.tmp-*"), *self.out.glob(f".{MANIFEST}.*.tmp")]:
            tmp.unlink()  # leftovers of killed runs: never visible to readers, never resumed
        (self.out / SHARDS_DIR).mkdir(exist_ok=True)
        write_json_atomic(run_file, {"format": FORMAT, "identity": self.identity})

    # ---------------------------------------------------------------- shard level
    def record_path(self, index: int) -> Path:
        return self.out / SHARDS_DIR / output_name(index).replace(".parquet", ".json")

    def done(self, index: int, input_sha256: str) -> Optional[Dict[str, Any]]:
        """The shard's record when it is complete and intact (see module doc), else None."""
        rec_path, out_path = self.record_path(index), self.out / output_name(index)
        if not rec_path.exists() or not out_path.exists():
            return None
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            return None
        if rec.get("input_sha256") != input_sha256 or rec.get("run_identity") != _identity_hash(self.identity):
            return None
        if sha256_file(out_path) != rec.get("sha256"):
            return None
        return rec

    def write_shard(self, index: int, table: pa.Table, input_info: Dict[str, Any], rows_rejected: Dict[str, int],
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Publish one shard's scores atomically, check rows out + rejected == rows in, then record it."""
        rows_in = int(input_info["rows"])
        rejected = int(sum(rows_rejected.values()))
        if table.num_rows + rejected != rows_in:
            raise DataError(f"{input_info['path']}: {rows_in} rows in but {table.num_rows} scored + {rejected} "
                            f"rejected {rows_rejected}: rows were lost or duplicated")
        target = self.out / output_name(index)
        tmp = self.out / f".{target.name}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(tmp)
            written = pq.ParquetFile(tmp).metadata.num_rows
            if written != table.num_rows:
                raise DataError(f"{tmp}: wrote {written} rows, expected {table.num_rows}")
            os.replace(tmp, target)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
        _fsync_dir(self.out)
        rid = table.column("request_id").to_numpy()
        rec = {
            "output": target.name, "sha256": digest, "bytes": target.stat().st_size,
            "input": input_info["name"], "input_bytes": input_info["bytes"], "input_sha256": input_info["sha256"],
            "rows_in": rows_in, "rows_out": table.num_rows, "rows_rejected": dict(rows_rejected),
            "requests": int(np.unique(rid).size), "rank": self.rank, "world_size": self.world_size,
            "run_token": self.run_token, "run_identity": _identity_hash(self.identity), "written_unix": time.time(),
            **(extra or {}),
        }
        write_json_atomic(self.record_path(index), rec)
        return rec

    # ---------------------------------------------------------------- manifest
    def finalize(self, inputs: Sequence[Dict[str, Any]], run: Dict[str, Any]) -> Dict[str, Any]:
        """Rank 0, after all ranks finished: check every input shard is complete and intact, then write
        _manifest.json (records, totals, run history). Raises DataError naming missing/bad shards."""
        records, problems = [], []
        for index, info in enumerate(inputs):
            rec = self.done(index, info["sha256"])
            if rec is None:
                problems.append(f"{output_name(index)} (input {info['name']}): missing or not intact")
            elif rec["rows_out"] + sum(rec["rows_rejected"].values()) != info["rows"]:
                problems.append(f"{output_name(index)}: {rec['rows_out']} rows out for {info['rows']} in")
            else:
                records.append(rec)
        if problems:
            raise DataError(f"{self.out}: scoring is incomplete: " + "; ".join(problems[:10]))
        previous = []
        if (self.out / MANIFEST).exists():
            try:
                previous = json.loads((self.out / MANIFEST).read_text()).get("runs", [])
            except json.JSONDecodeError:
                previous = []
        totals = {
            "shards": len(records), "rows_in": sum(r["rows_in"] for r in records),
            "rows_out": sum(r["rows_out"] for r in records),
            "rows_rejected": sum(sum(r["rows_rejected"].values()) for r in records),
            "requests": sum(r["requests"] for r in records),
        }
        manifest = {"format": FORMAT, "complete": True, "identity": self.identity, "totals": totals,
                    "shards": records, "runs": [*previous, run]}
        write_json_atomic(self.out / MANIFEST, manifest)
        return manifest


def _identity_hash(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {str(x)[:60]} there vs {str(y)[:60]} now")
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
