"""Verification of a serving artifact (satrank.jobs.export) the way a serving host would use it; the library
behind satrank.jobs.serve_check.

Why dependency-free: the artifact must be usable without this project. This module imports only torch,
pyarrow, numpy and the standard library (never the rest of satrank, TorchRec or FBGEMM;
tests/test_export.py asserts it through sys.modules), and holds its own minimal Parquet -> tensors
conversion driven by manifest.json alone.

Steps: (1) every file listed in SHA256SUMS must exist with that sha256, and manifest.json's own file
list must agree with it; (2) the TorchScript module is loaded with torch.jit.load; (3) CANDIDATES (a
Parquet file or a directory of them) is converted by the manifest's feature schema: columns must exist
with integer / list<integer> / numeric types, ids are checked and mapped by each feature's
out_of_range policy (error: refused; hash: mod vocab_size; oov: the extra row vocab_size), sequences
keep their last max_len ids, dense transforms are applied; (4) rows are scored in batches and ranked
within their request; the outputs are the manifest's `interface.outputs` (one per served head, then
score); (5) with a scored directory, the scores must match the batch scorer's output (satrank.jobs.score)
row by row on (request_id, item_id) within atol.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

FORMAT = "satrank-serving/1"


class ServeCheckError(ValueError):
    """The artifact or the input is unusable; the message names the file / column and the problem."""


# ------------------------------------------------------------------------------------------ artifact
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_artifact(export_dir: str | Path) -> Dict[str, Any]:
    """Check SHA256SUMS and manifest.json; returns the manifest. ServeCheckError names the bad file."""
    root = Path(export_dir)
    sums_file = root / "SHA256SUMS"
    if not root.is_dir():
        raise ServeCheckError(f"{root}: not a directory (expected an artifact written by satrank.jobs.export)")
    if not sums_file.is_file():
        raise ServeCheckError(f"{root}: no SHA256SUMS; not an artifact written by satrank.jobs.export")
    sums: Dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name:
            raise ServeCheckError(f"{sums_file}: line {n} is not '<sha256>  <file name>': {line!r}")
        sums[name] = digest
    for name, digest in sums.items():
        path = root / name
        if not path.is_file():
            raise ServeCheckError(f"{root}: {name} is listed in SHA256SUMS but missing")
        actual = _sha256(path)
        if actual != digest:
            raise ServeCheckError(f"{path}: checksum mismatch (SHA256SUMS says {digest[:16]}..., the file has "
                                  f"{actual[:16]}...): the artifact was modified or corrupted; refusing it")
    if "manifest.json" not in sums:
        raise ServeCheckError(f"{sums_file}: manifest.json is not covered by the checksums")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except json.JSONDecodeError as exc:
        raise ServeCheckError(f"{root / 'manifest.json'}: not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ServeCheckError(f"{root / 'manifest.json'}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, rec in manifest.get("files", {}).items():
        if sums.get(name) != rec.get("sha256"):
            raise ServeCheckError(f"{root}: manifest.json and SHA256SUMS disagree about {name}")
    if manifest.get("model_file") not in sums:
        raise ServeCheckError(f"{root}: the model file {manifest.get('model_file')!r} is not covered by SHA256SUMS")
    manifest["_checked_files"] = sorted(sums)
    return manifest


def load_module(export_dir: str | Path, manifest: Dict[str, Any], model_file: Optional[str] = None):
    name = model_file or manifest["model_file"]
    if name not in manifest["_checked_files"]:
        raise ServeCheckError(f"{export_dir}: {name!r} is not a checksummed file of the artifact "
                              f"({manifest['_checked_files']})")
    module = torch.jit.load(str(Path(export_dir) / name), map_location="cpu")
    module.eval()
    return module


# ------------------------------------------------------------------------------------------ Parquet -> tensors
class Features:
    """One candidate table converted by the manifest's schema (see module doc)."""

    def __init__(self, table: pa.Table, features: Dict[str, Any], file: str) -> None:
        self.file, self.n = file, table.num_rows
        self.keys: List[str] = list(features["keys"])
        names = set(table.schema.names)
        self.single: List[np.ndarray] = []
        for f in features["sparse"]:
            col = self._column(table, names, f["column"], f"sparse feature {f['name']}", pa.types.is_integer,
                               "an integer type")
            self.single.append(self._ids(self._ints(col, f["column"]), f, f["column"]))
        self.sequences: List[Tuple[np.ndarray, np.ndarray]] = []
        for f in features["sequence"]:
            if f["column"] not in names and f.get("optional"):
                self.sequences.append((np.zeros(0, np.int64), np.zeros(self.n + 1, np.int64)))
                continue
            col = self._column(table, names, f["column"], f"sequence feature {f['name']}",
                               lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t))
                               and pa.types.is_integer(t.value_type), "a list of integers")
            self.sequences.append(self._sequence(col, f))
        dense = []
        for f in features["dense"]:
            col = self._column(table, names, f["column"], f"dense feature {f['name']}",
                               lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "a numeric type")
            if col.null_count:
                self._row_error(f["column"], np.asarray(col.is_null()), "null value")
            x = col.to_numpy(zero_copy_only=False).astype(np.float64)
            if not np.isfinite(x).all():
                self._row_error(f["column"], ~np.isfinite(x), "NaN or infinite value", x)
            if f["transform"] == "log1p":
                if (x <= -1).any():
                    self._row_error(f["column"], x <= -1, "value <= -1 under transform log1p", x)
                x = np.log1p(x)
            dense.append(x.astype(np.float32))
        self.dense = np.stack(dense, axis=1) if dense else np.zeros((self.n, 0), np.float32)
        ids = features["ids"]
        self.ids: Dict[str, np.ndarray] = {}
        for role in ("request_id", "user_id", "item_id"):
            col = self._column(table, names, ids[role], f"id {role}", pa.types.is_integer, "an integer type")
            self.ids[role] = self._ints(col, ids[role])

    @staticmethod
    def _chunk(col) -> pa.Array:
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    def _column(self, table, names, column, role, ok, expected) -> pa.Array:
        if column not in names:
            raise ServeCheckError(f"{self.file}: column {column!r} ({role}) required by the artifact's manifest is "
                                  f"missing; the file has columns {table.schema.names}")
        col = self._chunk(table.column(column))
        if not ok(col.type):
            raise ServeCheckError(f"{self.file}: column {column!r} ({role}) has type {col.type}, expected {expected}")
        return col

    def _row_error(self, column: str, mask: np.ndarray, text: str, values: Optional[np.ndarray] = None,
                   rows: Optional[np.ndarray] = None) -> None:
        i = int(np.argmax(mask))
        row = int(rows[i]) if rows is not None else i
        shown = "" if values is None else f" (value {values[i].item()!r})"
        raise ServeCheckError(f"{self.file}: column {column!r}, row {row}: {text}{shown}; "
                              f"{int(mask.sum())} value(s) of this column have this problem")

    def _ints(self, arr: pa.Array, column: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
        if arr.null_count:
            self._row_error(column, np.asarray(arr.is_null()), "null id", rows=rows)
        return np.asarray(pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)

    def _ids(self, v: np.ndarray, f: Dict[str, Any], column: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
        vocab, policy = int(f["vocab_size"]), f["out_of_range"]
        if (v < 0).any():
            self._row_error(column, v < 0, "negative id", v, rows)
        over = v >= vocab
        if over.any():
            if policy == "error":
                self._row_error(column, over, f"id outside the vocabulary: >= vocab_size {vocab} of feature "
                                f"{f['name']!r} (out_of_range: error)", v, rows)
            v = np.remainder(v, vocab) if policy == "hash" else np.where(over, vocab, v)
        return v

    def _sequence(self, col: pa.Array, f: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        if col.null_count:
            self._row_error(f["column"], np.asarray(col.is_null()), "null list")
        offsets = np.asarray(col.offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
        flat = col.values.slice(int(np.asarray(col.offsets)[0]), int(offsets[-1]))
        rows = np.repeat(np.arange(self.n), np.diff(offsets))
        v = self._ids(self._ints(flat, f["column"], rows), f, f["column"], rows)
        max_len = int(f["max_len"])
        lengths = np.diff(offsets)
        if self.n and lengths.max() > max_len:  # keep the last max_len ids (most recent)
            starts = np.maximum(offsets[:-1], offsets[1:] - max_len)
            lengths = offsets[1:] - starts
            new = np.zeros(self.n + 1, np.int64)
            np.cumsum(lengths, out=new[1:])
            v = v[np.repeat(starts - new[:-1], lengths) + np.arange(new[-1])]
            offsets = new
        return v, offsets

    def inputs(self, lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, lengths, dense) of rows lo..hi-1 in the module's KJT layout."""
        b = hi - lo
        values = [ids[lo:hi] for ids in self.single] + [v[o[lo]:o[hi]] for v, o in self.sequences]
        lengths = [np.ones(b, np.int32)] * len(self.single) + [np.diff(o[lo:hi + 1]).astype(np.int32)
                                                                for _, o in self.sequences]
        return (torch.from_numpy(np.concatenate(values).astype(np.int64)),
                torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                torch.from_numpy(np.ascontiguousarray(self.dense[lo:hi])))


# ------------------------------------------------------------------------------------------ scoring
def rank_within_requests(request_id: np.ndarray, score: np.ndarray) -> np.ndarray:
    """1 = highest score of its request; ties go to the earlier row (same rule as satrank.jobs.score)."""
    n = request_id.size
    order = np.lexsort((np.arange(n), -score.astype(np.float64), request_id))
    rid = request_id[order]
    first = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if n else np.zeros(0, np.int64)
    start = np.repeat(first, np.diff(np.r_[first, n]))
    rank = np.empty(n, np.int32)
    rank[order] = (np.arange(n) - start + 1).astype(np.int32)
    return rank


@torch.no_grad()
def output_names(manifest: Dict[str, Any]) -> List[str]:
    """The module's outputs in order (manifest `interface.outputs`: one per served head, then score)."""
    return [o["name"] for o in manifest["interface"]["outputs"]]


def score_features(module, feats: Features, batch_size: int = 4096,
                   outputs: Sequence[str] = ("p_click", "p_satisfied", "watch_time_pred", "score")) -> Dict[str, np.ndarray]:
    """Scores of every row of `feats` by the loaded module, plus ids and rank; `outputs`: `output_names(manifest)`."""
    parts: Dict[str, List[np.ndarray]] = {k: [] for k in outputs}
    for lo in range(0, feats.n, batch_size):
        out = module(*feats.inputs(lo, min(lo + batch_size, feats.n)))
        for name, t in zip(outputs, out):
            parts[name].append(t.numpy().astype(np.float32))
    res = {k: (np.concatenate(v) if v else np.zeros(0, np.float32)) for k, v in parts.items()}
    res.update(feats.ids)
    res["rank"] = rank_within_requests(feats.ids["request_id"], res["score"])
    return res


# ------------------------------------------------------------------------------------------ request-level
def request_rows(request_id: np.ndarray) -> List[np.ndarray]:
    """Row indices of each request, requests in order of first appearance, rows in file order."""
    _, first, inverse = np.unique(request_id, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rows = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=first.size))
    groups = np.split(rows, bounds[:-1])
    return [groups[i] for i in order]


def request_inputs(feats: Features, rows: np.ndarray, iface: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
    """The request-level inputs (manifest `request_interface`) of one request's candidate rows: the user side
    from its first row, which every other row must repeat (ServeCheckError otherwise), the candidates batched."""
    names = feats.keys[:len(feats.single)]
    seq_names = feats.keys[len(feats.single):]
    rid = int(feats.ids["request_id"][rows[0]])
    user = []
    for n in iface["user_keys"]:
        col = feats.single[names.index(n)][rows]
        if (col != col[0]).any():
            raise ServeCheckError(f"{feats.file}: request {rid}: user-side column of {n!r} differs between its rows "
                                  "(one request has one user)")
        user.append(col[0])
    hist_v, hist_l = [], []
    for n in iface["history_keys"]:
        v, o = feats.sequences[seq_names.index(n)]
        first = v[o[rows[0]]:o[rows[0] + 1]]
        for r in rows[1:]:
            if not np.array_equal(v[o[r]:o[r + 1]], first):
                raise ServeCheckError(f"{feats.file}: request {rid}: history {n!r} differs between its rows "
                                      "(one request has one user)")
        hist_v.append(first)
        hist_l.append(first.size)
    items = np.stack([feats.single[names.index(n)][rows] for n in iface["item_keys"]])
    return (torch.from_numpy(np.asarray(user, np.int64)), torch.from_numpy(np.concatenate(hist_v).astype(np.int64)),
            torch.tensor(hist_l, dtype=torch.int32), torch.from_numpy(np.ascontiguousarray(items, np.int64)),
            torch.from_numpy(np.ascontiguousarray(feats.dense[rows])))


def check_request(inputs: Sequence[torch.Tensor], iface: Dict[str, Any]) -> None:
    """ServeCheckError (one line, naming the input) unless `inputs` match the request-level signature."""
    user, hv, hl, items, dense = inputs
    want = {"user_ids": (user, 1, len(iface["user_keys"])), "history_lengths": (hl, 1, len(iface["history_keys"])),
            "item_ids": (items, 2, len(iface["item_keys"]))}
    for name, (t, dim, n) in want.items():
        if t.dim() != dim or t.shape[0] != n:
            raise ServeCheckError(f"request: {name} has shape {list(t.shape)}, expected first dim {n} and {dim} dims")
    if hv.dim() != 1 or hv.shape[0] != int(hl.sum()):
        raise ServeCheckError(f"request: history_values has {hv.shape[0]} ids but history_lengths sum to {int(hl.sum())}")
    if dense.dim() != 2 or dense.shape != (items.shape[1], len(iface["dense"])):
        raise ServeCheckError(f"request: dense has shape {list(dense.shape)} but item_ids has {items.shape[1]} "
                              f"candidates and there are {len(iface['dense'])} dense columns")


def per_candidate_inputs(inputs: Sequence[torch.Tensor], iface: Dict[str, Any],
                         keys: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request as model.pt's rows (values, lengths, dense): the user side repeated on each of the C rows."""
    user, hv, hl, items, dense = inputs
    c = items.shape[1]
    hist = dict(zip(iface["history_keys"], torch.split(hv, [int(x) for x in hl])))
    values, lengths = [], []
    for k in keys:
        if k in hist:
            values.append(hist[k].repeat(c))
            lengths.append(torch.full((c,), hist[k].numel(), dtype=torch.int32))
            continue
        values.append(user[iface["user_keys"].index(k)].repeat(c) if k in iface["user_keys"]
                      else items[iface["item_keys"].index(k)])
        lengths.append(torch.ones(c, dtype=torch.int32))
    return torch.cat(values), torch.cat(lengths), dense


def max_diffs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], outputs: Sequence[str],
              worst: Dict[str, float]) -> Dict[str, float]:
    """worst[name] raised to max |a - b| per output; ServeCheckError when NaN patterns differ."""
    for name, x, y in zip(outputs, a, b):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        if not torch.equal(torch.isnan(x), torch.isnan(y)):
            raise ServeCheckError(f"request-level check: {name} is NaN in one artifact but not the other")
        d = (x - y).abs().nan_to_num(0.0)
        worst[name] = max(worst.get(name, 0.0), float(d.max()) if d.numel() else 0.0)
    return worst


def flip_allowance(requests: int, flip_share: float) -> int:
    """How many of `requests` may exceed check_atol (export.check_flip_share): int(flip_share x requests)."""
    return int(flip_share * requests)


def within_flip_allowance(over: Sequence[Dict[str, Any]], requests: int, flip_share: float, flip_atol: float) -> bool:
    """The export's allowance for MLSE level swaps (export.check_flip_*): at most flip_allowance(requests) of the
    requests over check_atol, none of them by more than flip_atol. One rule for the export and serve_check."""
    return len(over) <= flip_allowance(requests, flip_share) and all(o["max_abs_diff"] <= flip_atol for o in over)


def request_level_report(module, feats: Features, ours: Dict[str, np.ndarray], iface: Dict[str, Any],
                         outputs: Sequence[str], atol: float) -> Dict[str, Any]:
    """Score every request of `feats` with the request-level module; max |diff| against the per-candidate
    scores `ours` (score_features of the same rows) per output."""
    worst: Dict[str, float] = {}
    within: Dict[str, float] = {}  # the same over the requests within atol
    over: List[Dict[str, Any]] = []  # the requests over atol: {request_id, rows, max_abs_diff}
    groups = request_rows(feats.ids["request_id"])
    with torch.no_grad():
        for rows in groups:
            inputs = request_inputs(feats, rows, iface)
            check_request(inputs, iface)
            mine: Dict[str, float] = {}
            max_diffs(module(*inputs), [ours[n][rows] for n in outputs], outputs, mine)
            worst = {n: max(worst.get(n, 0.0), mine.get(n, 0.0)) for n in outputs}
            if any(v > atol for v in mine.values()):
                over.append({"request_id": int(feats.ids["request_id"][rows[0]]), "rows": int(rows.size),
                             "max_abs_diff": max(mine.values())})
            else:
                within = {n: max(within.get(n, 0.0), mine.get(n, 0.0)) for n in outputs}
    return {"requests": len(groups), "rows": int(sum(r.size for r in groups)), "max_abs_diff": worst,
            "max_abs_diff_within": within, "atol": atol, "ok": all(v <= atol for v in worst.values()),
            "over_atol": over}


def candidate_files(path: str | Path) -> List[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ServeCheckError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise ServeCheckError(f"{path}: no *.parquet files")
    return files


def read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ServeCheckError(f"{path}: not a readable Parquet file: {exc}") from None


def compare(ours: Dict[str, np.ndarray], scored_dir: str | Path, atol: float, outputs: Sequence[str]) -> Dict[str, Any]:
    """Match our rows to the batch scorer's on (request_id, item_id); max |diff| per output, rank mismatches."""
    tables = [read_table(p) for p in candidate_files(scored_dir)]
    theirs = pa.concat_tables(tables)
    rid = theirs.column("request_id").to_numpy()
    keep = np.isin(rid, np.unique(ours["request_id"]))
    t = {c: theirs.column(c).to_numpy(zero_copy_only=False)[keep] for c in ("request_id", "item_id", "rank")}
    for c in outputs:
        if c not in theirs.column_names:
            raise ServeCheckError(f"{scored_dir}: the scored output has no column {c!r} (it has {theirs.column_names})")
        t[c] = np.asarray(theirs.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)[keep]  # null -> NaN
    a = np.lexsort((ours["item_id"], ours["request_id"]))
    b = np.lexsort((t["item_id"], t["request_id"]))
    key_a = np.stack([ours["request_id"][a], ours["item_id"][a]], 1)
    key_b = np.stack([t["request_id"][b], t["item_id"][b]], 1)
    if len(key_a) and (key_a[1:] == key_a[:-1]).all(1).any():
        raise ServeCheckError("the candidates repeat a (request_id, item_id) pair: rows cannot be matched")
    report: Dict[str, Any] = {"rows": int(len(key_a)), "rows_in_scored": int(len(key_b))}
    if key_a.shape != key_b.shape or not np.array_equal(key_a, key_b):
        report.update(ok=False, problem="the scored output does not hold exactly these (request_id, item_id) rows")
        return report
    diffs = {}
    for c in outputs:
        x, y = ours[c][a].astype(np.float64), t[c][b]
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            report.update(ok=False, problem=f"{c}: null/NaN in one output but not the other")
            return report
        d = np.abs(np.nan_to_num(x - y, nan=0.0))
        diffs[c] = float(d.max()) if d.size else 0.0
    report["max_abs_diff"] = diffs
    report["rank_mismatches"] = int((ours["rank"][a] != t["rank"][b]).sum())
    report["ok"] = all(v <= atol for v in diffs.values())
    if report["rank_mismatches"] and report["ok"]:
        report["note"] = "ranks differ only where scores agree within atol (near-ties)"
    return report


def check(export_dir: str | Path, candidates: str | Path, scored: Optional[str | Path] = None,
          model_file: Optional[str] = None, batch_size: int = 4096, atol: float = 1e-5) -> Dict[str, Any]:
    t0 = time.perf_counter()
    manifest = verify_artifact(export_dir)
    module = load_module(export_dir, manifest, model_file)
    results = []
    outputs = output_names(manifest)
    s0 = time.perf_counter()
    feats_of = []
    for path in candidate_files(candidates):
        feats = Features(read_table(path), manifest["features"], str(path))
        results.append(score_features(module, feats, batch_size, outputs))
        feats_of.append(feats)
    score_s = time.perf_counter() - s0
    if sum(f.n for f in feats_of) == 0:
        raise ServeCheckError(f"{candidates}: 0 candidate rows in {len(feats_of)} file(s); nothing to check")
    iface = manifest.get("request_interface")
    request_level = None
    if iface and (model_file or manifest["model_file"]) == manifest["model_file"]:  # fp32 model.pt only
        req = load_module(export_dir, manifest, iface["file"])
        parts = [request_level_report(req, f, r, iface, outputs, atol) for f, r in zip(feats_of, results)]
        # the export's allowance for MLSE level swaps (export.check_flip_*, recorded in the manifest)
        flips = (manifest.get("export_check") or {}).get("request_level") or {}
        share, flip_atol = flips.get("flip_share", 0.0), flips.get("flip_atol", atol)
        requests = sum(p["requests"] for p in parts)
        over = [o for p in parts for o in p["over_atol"]]
        request_level = {"file": iface["file"], "requests": requests, "rows": sum(p["rows"] for p in parts),
                         "atol": atol, "over_atol": over, "flip_share": share, "flip_atol": flip_atol,
                         "max_abs_diff": {n: max(p["max_abs_diff_within"].get(n, 0.0) for p in parts) for n in outputs},
                         "ok": within_flip_allowance(over, requests, share, flip_atol)}
    ours = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    report: Dict[str, Any] = {
        "artifact": str(export_dir), "model_file": model_file or manifest["model_file"],
        "checksums_ok": manifest["_checked_files"], "model_kind": manifest["model"]["kind"],
        "files": len(results), "rows": int(ours["score"].size),
        "requests": int(np.unique(ours["request_id"]).size), "score_s": round(score_s, 3),
        "rows_per_s": round(ours["score"].size / score_s, 1) if score_s > 0 else None,
    }
    if scored is not None:
        report["compare"] = compare(ours, scored, atol, outputs)
    if request_level is not None:
        report["request_level"] = request_level
    report["ok"] = report.get("compare", {}).get("ok", True) and (request_level or {}).get("ok", True)
    report["wall_s"] = round(time.perf_counter() - t0, 3)
    return report
