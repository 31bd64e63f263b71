"""The serving artifact of a loaded model (the library behind satrank.jobs.export): TorchScript + manifest.

EXPORT_DIR (published atomically: built in a temp directory beside it, then renamed):
  model.pt        torch.jit.trace of satrank.models.serving.module.ServingModule: the unsharded model with
                  plain-tensor table lookups and the fusion of satrank.models.common.fusion baked in.
                  forward(values int64, lengths int32, dense float32) -> (one float32 [B] per served head,
                  score), in manifest `interface.outputs` order (p_click, p_satisfied, watch_time_pred, then
                  p_<name> of any other head of satrank.models.ranker.heads); loads with torch alone.
  model_request.pt  the request-level module (satrank.models.serving.request, ranker / easq kinds): ONE request
                  (user ids + histories once, C candidates batched) -> the same outputs for the C candidates;
                  its signature is manifest `request_interface`; checked against model.pt on held-out requests.
  model_int8.pt   (export.int8) the same with every table in FBGEMM's fused 8-bit rowwise format; its AUC
                  change against model.pt on `export.eval_rows` rows of DIR/`export.eval_split` is in the manifest.
  config.yaml     the run config the model was built from.
  manifest.json   feature schema and vocabulary policies, the interface, fusion formula and weights, the model
                  (kind, heads, checkpoint fingerprint, world size that wrote it, LoRA), training data range,
                  evaluation metrics (RUN/metrics.json), the export check, quantisation, sha256 + size of files.
  SHA256SUMS      sha256 of every file including manifest.json (`sha256sum -c SHA256SUMS` works).

`build_artifact` refuses to publish when the traced fp32 module differs from the eager model, or the
request-level module from model.pt, by more than `export.check_atol` on real candidate rows / requests
(DIR/candidates) or on synthetic ones. `loaded` is what
satrank.jobs.engine.runs.load_model returns (model, kind, cfg, meta, path, run_dir, lora, specs); `serve` the
`score:` / `export:` sections.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch

from satrank.models.common.fusion import effective_weights, formula
from satrank.models.serving.module import ModelScorer, ServingModule, example_inputs, trace
from satrank.models.serving.request import REQUEST_FILE
from satrank.models.serving.request import interface as request_interface
from satrank.pipeline import config as cfgio
from satrank.pipeline.batch import Batch
from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader import BatchLoader, list_shards
from satrank.pipeline.reader_config import ReaderConfig

FORMAT = "satrank-serving/1"
MODEL_FILE, INT8_FILE, MANIFEST, SUMS = "model.pt", "model_int8.pt", "manifest.json", "SHA256SUMS"
log = logging.getLogger("satrank.export")


def sha256_bytes_of(path: Path) -> Tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest(), path.stat().st_size


def feature_schema(data: DataConfig) -> Dict[str, Any]:
    """What a client must send, in the order the module expects (see satrank.models.serving.module.ServingModule)."""
    return {
        "keys": data.sparse_names,
        "sparse": [{"name": f.name, "column": f.column, "vocab_size": f.vocab_size, "out_of_range": f.out_of_range,
                    "num_rows": f.num_rows, "table": f.table_name} for f in data.sparse],
        "sequence": [{"name": f.name, "column": f.column, "vocab_size": f.vocab_size, "out_of_range": f.out_of_range,
                      "num_rows": f.num_rows, "table": f.table_name, "max_len": f.max_len, "optional": f.optional}
                     for f in data.sequence],
        "dense": [{"name": f.name, "column": f.column, "transform": f.transform} for f in data.dense],
        "ids": cfgio.to_dict(data.ids),
        "policies": {"error": "id < 0 or id >= vocab_size is refused",
                     "hash": "id >= vocab_size -> id mod vocab_size (negative ids refused)",
                     "oov": "id >= vocab_size -> vocab_size, the table's extra out-of-vocabulary row",
                     "sequences": "list<int64> oldest first; only the last max_len ids are used; every id is checked",
                     "dense_log1p": "log1p(x) in float64 then float32; x <= -1, NaN, inf and nulls are refused"},
    }


def interface(outputs: Sequence[str]) -> Dict[str, Any]:
    return {
        "format": "torchscript (torch.jit.trace)", "load": "torch.jit.load(path, map_location='cpu')",
        "inputs": [
            {"name": "values", "dtype": "int64", "shape": ["sum of lengths"],
             "doc": "KJT values, key-major in `features.keys` order; ids after the vocabulary policy"},
            {"name": "lengths", "dtype": "int32", "shape": ["len(keys) * B"],
             "doc": "lengths[k*B + b] = number of ids of key k in row b (1 for single-valued keys)"},
            {"name": "dense", "dtype": "float32", "shape": ["B", "len(features.dense)"],
             "doc": "dense features, transforms applied"}],
        "outputs": [{"name": n, "dtype": "float32", "shape": ["B"]} for n in outputs],
        "missing_head": "NaN (its fusion weight is 0)",
        "rank": "1 + number of candidates of the same request with a higher score (ties: earlier row first)",
    }


def batch_inputs(batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.sparse.values(), batch.sparse.lengths(), batch.dense


def _batches(uri: Path, data: DataConfig, rows: int, with_labels: bool, batch_size: int = 1024) -> List[Batch]:
    rcfg = ReaderConfig(batch_size=batch_size, num_workers=0, shuffle=False)
    out, n = [], 0
    for batch in BatchLoader(uri, data, rcfg, rank=0, world_size=1, with_labels=with_labels):
        out.append(batch)
        n += batch.size
        if n >= rows:
            break
    return out


@torch.no_grad()
def check_traced(traced, loaded: Any, serve: Any, data_dir: Optional[Path]) -> Dict[str, Any]:
    """Max |traced - eager| per output on DIR/candidates rows (with --data) and on synthetic batches of
    257 and 1 rows (empty to full histories); DataError over export.check_atol."""
    data = loaded.cfg.data
    scorer = ModelScorer(loaded.model, serve.score.fusion, data, specs=loaded.specs)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    source, batches = "synthetic", []
    if data_dir is not None and (data_dir / "candidates").exists():
        source, batches = "candidates+synthetic", _batches(data_dir / "candidates", data, 2048, with_labels=False)
    for b, seed in ((257, 1), (1, 2)):  # batch sizes other than the traced one, empty to full histories
        v, ln, d = example_inputs(data, b, seed)
        batches.append(Batch(sparse=KeyedJaggedTensor(keys=data.sparse_names, values=v, lengths=ln), dense=d))
    worst = {n: 0.0 for n in scorer.outputs}
    rows = 0
    for batch in batches:
        eager = scorer(batch)
        got = traced(*batch_inputs(batch))
        for name, t in zip(scorer.outputs, got):
            a, b = t.float(), eager[name].float()
            if not torch.equal(torch.isnan(a), torch.isnan(b)):
                raise DataError(f"export check: traced and eager {name} disagree on which rows are NaN")
            diff = (a - b).abs().nan_to_num(0.0)
            worst[name] = max(worst[name], float(diff.max()) if diff.numel() else 0.0)
        rows += batch.size
    atol = serve.export.check_atol
    bad = {k: v for k, v in worst.items() if v > atol}
    if bad:
        raise DataError(f"export check: the traced module differs from the eager model by {bad} > "
                        f"export.check_atol {atol} on {rows} {source} rows; not publishing")
    return {"rows": rows, "source": source, "max_abs_diff": worst, "atol": atol}


@torch.no_grad()
def int8_auc(fp32, int8, outputs: Sequence[str], loaded: Any, cfg: Any, data_dir: Path) -> Dict[str, Any]:
    """Click AUC (and satisfaction AUC on answered rows) of both artifacts on a held-out sample; `outputs`:
    the modules' output names (interface order)."""
    from satrank.models.metrics.ranking import auc

    split = data_dir / cfg.eval_split
    if not split.exists():
        raise DataError(f"export.int8: {split} does not exist (export.eval_split names the held-out split)")
    batches = _batches(split, loaded.cfg.data, cfg.eval_rows, with_labels=True)
    cols: Dict[str, List[np.ndarray]] = {k: [] for k in ("click", "answered", "satisfied", "fp32_p_click",
                                                         "int8_p_click", "fp32_p_sat", "int8_p_sat", "dscore")}
    pc, ps, sc = (list(outputs).index(n) for n in ("p_click", "p_satisfied", "score"))
    for batch in batches:
        a, b = fp32(*batch_inputs(batch)), int8(*batch_inputs(batch))
        cols["click"].append(batch.labels["click"].numpy())
        cols["answered"].append(batch.labels["questionnaire_answered"].numpy())
        cols["satisfied"].append(batch.labels["satisfied"].numpy())
        cols["fp32_p_click"].append(a[pc].numpy())
        cols["int8_p_click"].append(b[pc].numpy())
        cols["fp32_p_sat"].append(a[ps].numpy())
        cols["int8_p_sat"].append(b[ps].numpy())
        cols["dscore"].append((a[sc] - b[sc]).abs().numpy())
    c = {k: np.concatenate(v)[:cfg.eval_rows] for k, v in cols.items()}
    out: Dict[str, Any] = {"split": cfg.eval_split, "rows": int(c["click"].size)}

    def both(name: str, pa_: np.ndarray, pb: np.ndarray, y: np.ndarray) -> None:
        try:
            fa, fb = auc(pa_, y), auc(pb, y)
        except ValueError as exc:  # one class only in the sample
            out[name] = {"fp32": None, "int8": None, "delta": None, "note": str(exc)}
            return
        out[name] = {"fp32": fa, "int8": fb, "delta": fb - fa}

    both("click_auc", c["fp32_p_click"], c["int8_p_click"], c["click"])
    answered = c["answered"] == 1
    if not np.isnan(c["fp32_p_sat"]).all():
        both("sat_auc_answered", c["fp32_p_sat"][answered], c["int8_p_sat"][answered], c["satisfied"][answered])
        out["sat_auc_answered"]["rows"] = int(answered.sum())
    out["max_abs_score_diff"] = float(c["dscore"].max()) if c["dscore"].size else 0.0
    out["max_abs_p_click_diff"] = float(np.abs(c["fp32_p_click"] - c["int8_p_click"]).max())
    return out


@torch.no_grad()
def check_request_level(request, traced, data: DataConfig, data_dir: Optional[Path], atol: float,
                        max_rows: int = 2048, flip_share: float = 0.0, flip_atol: Optional[float] = None
                        ) -> Dict[str, Any]:
    """Request-level scores vs model.pt's on held-out requests: the requests of DIR/candidates (whole files up
    to `max_rows` rows, with --data) and synthetic ones (empty histories + 1 candidate, full histories + 257
    candidates, half + 20); DataError over `atol` (export.check_atol). On DIR/candidates at most `flip_share` of
    the requests may exceed atol, each by at most `flip_atol` (export.check_flip_*): MLSE's levels rank history
    items by g's float score, and two items within an ulp of each other can swap levels between the two batch
    shapes; those requests are listed (`over_atol`). The synthetic requests get no such allowance."""
    from satrank.models.serving import check as chk
    from satrank.models.serving.request import example_request

    iface = {**request.keys, "dense": data.dense_names}
    outputs = list(request.outputs)
    worst: Dict[str, float] = {}
    over: List[Dict[str, Any]] = []
    requests, rows, source = 0, 0, "synthetic"
    if data_dir is not None and (data_dir / "candidates").exists():
        source = "candidates+synthetic"
        for path in chk.candidate_files(data_dir / "candidates"):
            feats = chk.Features(chk.read_table(path), feature_schema(data), str(path))
            ours = chk.score_features(traced, feats, outputs=outputs)
            part = chk.request_level_report(request, feats, ours, iface, outputs, atol)
            over += [{**o, "file": path.name} for o in part["over_atol"]]
            worst = {n: max(worst.get(n, 0.0), part["max_abs_diff_within"].get(n, 0.0)) for n in outputs}
            requests, rows = requests + part["requests"], rows + part["rows"]
            if rows >= max_rows:
                break
    flip_atol = atol if flip_atol is None else flip_atol
    allowed = chk.flip_allowance(requests, flip_share)
    if not chk.within_flip_allowance(over, requests, flip_share, flip_atol):
        raise DataError(f"export check: the request-level module differs from model.pt by more than export.check_atol "
                        f"{atol} on {len(over)} of {requests} candidate requests (allowed: {allowed}, each <= "
                        f"export.check_flip_atol {flip_atol}; largest {max(o['max_abs_diff'] for o in over):.3g}, "
                        f"request_id {max(over, key=lambda o: o['max_abs_diff'])['request_id']}); not publishing")
    for seed, (c, fill) in enumerate(((1, "empty"), (257, "full"), (20, "half")), start=1):
        inputs = example_request(data, request.keys, c, seed=seed, history=fill)
        per = traced(*chk.per_candidate_inputs(inputs, iface, data.sparse_names))
        chk.max_diffs(request(*inputs), per, outputs, worst)
        requests, rows = requests + 1, rows + c
    bad = {k: v for k, v in worst.items() if v > atol}
    if bad:
        raise DataError(f"export check: the request-level module differs from model.pt by {bad} > export.check_atol "
                        f"{atol} on {requests} {source} requests; not publishing")
    return {"requests": requests, "rows": rows, "source": source, "max_abs_diff": worst, "atol": atol,
            "against": MODEL_FILE, "over_atol": over, "flip_share": flip_share, "flip_atol": flip_atol}


def request_artifact(loaded: Any, traced, serve: Any, data_dir: Optional[Path]) -> Tuple[Any, Dict[str, Any]]:
    """(the scripted request-level module or None, its export check); a model kind that cannot be served
    request-level (stage-1 click / satisfaction) gets None and the reason, and keeps model.pt only."""
    from satrank.models.serving.request import RequestLevelError, build_request_module

    try:
        request = build_request_module(loaded.model, loaded.kind, loaded.cfg.data, serve.score.fusion, loaded.specs)
    except RequestLevelError as exc:
        log.info("no request-level artifact: %s", exc)
        return None, {"skipped": str(exc)}
    ex = serve.export
    check = check_request_level(request, traced, loaded.cfg.data, data_dir, ex.check_atol,
                                flip_share=ex.check_flip_share, flip_atol=ex.check_flip_atol)
    log.info("request-level module matches model.pt: max |diff| %s on %d requests (%d rows, %s)%s",
             check["max_abs_diff"], check["requests"], check["rows"], check["source"],
             f"; {len(check['over_atol'])} candidate request(s) over atol, each <= {check['flip_atol']} "
             f"(MLSE level swaps: manifest export_check.request_level.over_atol)" if check["over_atol"] else "")
    return request, check


def training_data(loaded: Any, data_dir: Optional[Path]) -> Dict[str, Any]:
    """What the checkpoint says about its training data, plus the timestamp range of DIR/train
    (Parquet row-group statistics) when --data is given."""
    extra = loaded.meta.get("extra", {})
    out: Dict[str, Any] = {"checkpoint_extra": {k: extra[k] for k in ("job", "trainer", "data_range") if k in extra}}
    if data_dir is None or not (data_dir / "train").exists():
        out["train_split"] = None
        return out
    col = loaded.cfg.data.ids.timestamp
    _, files = list_shards(str(data_dir / "train"))
    lo, hi, rows = None, None, 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        idx = md.schema.to_arrow_schema().get_field_index(col)
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(idx).statistics if idx >= 0 else None
            if st is None or not st.has_min_max:
                continue
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
    out["train_split"] = {"path": str((data_dir / "train").resolve()), "files": len(files), "rows": rows,
                          "min_timestamp": lo, "max_timestamp": hi, "source": "--data DIR/train (assumed the training data)"}
    return out


def run_metrics(loaded: Any) -> Optional[Dict[str, Any]]:
    for p in (loaded.run_dir / "metrics.json", loaded.path / "metrics.json"):
        if p.is_file():
            try:
                m = json.loads(p.read_text())
            except json.JSONDecodeError:
                return {"error": f"{p}: not valid JSON"}
            return {"file": str(p), **{k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}}
    return None


def build_artifact(loaded: Any, out: Path, serve: Any, data_dir: Optional[Path] = None,
                   overwrite: bool = False) -> Dict[str, Any]:
    """Build, check and publish the artifact of a loaded model; returns its manifest."""
    t0 = time.perf_counter()
    data = loaded.cfg.data
    module = ServingModule(loaded.model, data, serve.score.fusion, specs=loaded.specs)
    traced = trace(module, data, serve.export.trace_batch_size)
    check = check_traced(traced, loaded, serve, data_dir)
    log.info("traced module matches the eager model: max |diff| %s on %d %s rows", check["max_abs_diff"], check["rows"],
             check["source"])
    request, request_check = request_artifact(loaded, traced, serve, data_dir)
    check = {**check, "request_level": request_check}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        traced.save(str(tmp / MODEL_FILE))
        if request is not None:
            request.save(str(tmp / REQUEST_FILE))
        quant = None
        if serve.export.int8:
            traced8 = trace(ServingModule(loaded.model, data, serve.score.fusion, int8=True, specs=loaded.specs),
                            data, serve.export.trace_batch_size)
            traced8.save(str(tmp / INT8_FILE))
            quant = {"int8": {"file": INT8_FILE, "tables": "all", "format": "FBGEMM fused 8-bit rowwise (int8 codes, "
                              "fp32 scale and bias per row), dequantised at lookup in plain torch",
                              "held_out": int8_auc(traced, torch.jit.load(str(tmp / INT8_FILE)), module.outputs,
                                                   loaded, serve.export, data_dir)}}
        (tmp / "config.yaml").write_text(cfgio.dump(loaded.cfg))
        files = {p.name: dict(zip(("sha256", "bytes"), sha256_bytes_of(p))) for p in sorted(tmp.iterdir())}
        meta = loaded.meta
        manifest = {
            "format": FORMAT, "created_unix": time.time(),
            "versions": {"torch": torch.__version__, **meta.get("versions", {})},
            "model_file": MODEL_FILE,
            "model": {"kind": loaded.kind, "heads": list(module.heads), "checkpoint": str(loaded.path.resolve()),
                      "fingerprint": meta["fingerprint"], "written_by_world_size": meta["world_size"],
                      "checkpoint_created_unix": meta.get("created_unix"), "lora": loaded.lora,
                      "unsharded": True},
            "interface": interface(module.outputs),
            "request_interface": (None if request is None else
                                  request_interface(request.keys, data.dense_names, request.outputs)),
            "features": feature_schema(data),
            "fusion": {"formula": formula(loaded.specs), "weights": serve.score.fusion.weights(),
                       "effective_weights": effective_weights(serve.score.fusion, module.heads, loaded.specs)},
            "training_data": training_data(loaded, data_dir),
            "metrics": run_metrics(loaded),
            "export_check": check,
            "quantization": quant,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        sums = [f"{sha256_bytes_of(p)[0]}  {p.name}" for p in sorted(tmp.iterdir())]
        (tmp / SUMS).write_text("\n".join(sums) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise
    log.info("exported %s model (%s) to %s in %.1fs", loaded.kind, ", ".join(module.heads), out, time.perf_counter() - t0)
    return manifest


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise ConfigError(f"--out {str(out)!r} appeared while exporting; not replacing it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
