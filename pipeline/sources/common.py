"""What every source converter shares: the command line, bad-row handling with one-line errors, row accounting,
dense id vocabularies, the canonical impression schema, and the atomic output directory with its config.

Why one module: each source (satrank.pipeline.sources.kuairand, .ratings) only maps its own layout onto the
data contract (docs/data.md); refusing bad input the same way (file, column, row), counting every row
(rows in = rows out + rows rejected) and writing DIR/{train,valid,test,items}/, DIR/satrank.yaml and
DIR/convert.json the same way is done here once.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from satrank.pipeline.atomic import write_json_atomic, write_text_atomic
from satrank.pipeline.config import ConfigError, deep_merge, load_yaml
from satrank.pipeline.errors import DataError

SIM_CONFIG = Path(__file__).resolve().parents[1].parent / "configs" / "sim.yaml"
SPLITS = ("train", "valid", "test")
HISTORIES = ("hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip")
ROW_GROUP_ROWS = 8192
_INT = r"^\s*[-+]?\d+\s*$"
_FLOAT = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every converter takes: --src, --out, --overwrite, --on-bad-row."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="the dataset as downloaded (its official layout)")
    p.add_argument("--out", type=Path, required=True, help="output data dir: train/ valid/ test/ items/ vocab/, "
                                                            "satrank.yaml, convert.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="a bad input row stops the conversion naming file, column and row (error), or is left "
                        "out and counted under its reason in convert.json (skip)")
    return p


class Rows:
    """Which input rows are bad: `error` raises DataError at the first (file, column, row), `skip` marks them
    rejected under `<problem>:<column>`. Rows are numbered per input file (0-based data rows; CSV line = row + 2)."""

    def __init__(self, on_bad_row: str, files: Sequence[str], file_index: np.ndarray, row_in_file: np.ndarray,
                 header_lines: int = 1, matrix_column: Optional[np.ndarray] = None):
        self.on_bad_row, self.files, self.header_lines = on_bad_row, list(files), header_lines
        self.file_index, self.row_in_file = file_index, row_in_file
        self.matrix_column = matrix_column  # a dense matrix's cells (Coat): the column of each cell
        self.reason = np.zeros(len(file_index), dtype=np.int16)  # 0 = kept, k = self.reasons[k - 1]
        self.reasons: List[str] = []

    @property
    def keep(self) -> np.ndarray:
        return self.reason == 0

    def where(self, i: int) -> str:
        row = int(self.row_in_file[i])
        cell = "" if self.matrix_column is None else f", matrix column {int(self.matrix_column[i])}"
        return f"{self.files[int(self.file_index[i])]}: row {row} (line {row + 1 + self.header_lines}){cell}"

    def bad(self, mask: np.ndarray, column: str, problem: str, text: str, values: Any = None) -> None:
        """Rows in `mask` (not yet rejected) have `problem` in `column`."""
        mask = mask & self.keep
        if not mask.any():
            return
        if self.on_bad_row == "error":
            i = int(np.argmax(mask))
            shown = "" if values is None else f" (value {_py(values[i])!r})"
            raise DataError(f"{self.where(i)}, column {column!r}: {text}{shown}; {int(mask.sum())} row(s) have "
                            f"this problem (--on-bad-row skip leaves them out and counts them)")
        self.reject(mask, f"{problem}:{column}")

    def reject(self, mask: np.ndarray, key: str) -> None:
        """Leave rows out under reason `key` whatever --on-bad-row says (valid rows that cannot be placed, e.g. an
        impression of a video without a feature row)."""
        mask = mask & self.keep
        if mask.any():
            if key not in self.reasons:
                self.reasons.append(key)
            self.reason[mask] = 1 + self.reasons.index(key)

    def rejected(self) -> Dict[str, int]:
        counts = np.bincount(self.reason, minlength=1 + len(self.reasons))
        return {k: int(counts[1 + i]) for i, k in enumerate(self.reasons) if counts[1 + i]}


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def read_csv(path: Path, columns: Sequence[str], delimiter: str = ",") -> Dict[str, pa.Array]:
    """The named columns of a CSV file as strings (parsed and checked by the caller, row by row); a missing file or
    column is one DataError naming both."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    header = _header(path, delimiter)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} is missing; the file has columns {header}")
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(
                                   include_columns=list(columns), column_types={c: pa.string() for c in columns},
                                   strings_can_be_null=True))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable CSV file: {str(exc).splitlines()[0]}") from None
    return {c: table.column(c).combine_chunks() for c in columns}


def _header(path: Path, delimiter: str) -> List[str]:
    with open(path, newline="") as fh:
        return [c.strip().strip('"') for c in fh.readline().rstrip("\r\n").split(delimiter)]


def parse_ints(rows: Rows, arr: pa.Array, column: str, nullable: bool = False) -> np.ndarray:
    """int64 values of a string column; non-integers (and nulls unless `nullable`) are bad rows; nulls read -1."""
    nulls = np.asarray(arr.is_null())
    ok = np.asarray(pc.fill_null(pc.match_substring_regex(arr, _INT), False))
    if not nullable:
        rows.bad(nulls, column, "null", "missing value")
    rows.bad(~ok & ~nulls, column, "not_integer", "not an integer", arr.to_numpy(zero_copy_only=False))
    good = pc.if_else(pa.array(ok), arr, pa.scalar("-1"))
    return pc.cast(pc.utf8_trim_whitespace(good), pa.int64()).to_numpy(zero_copy_only=False)


def parse_floats(rows: Rows, arr: pa.Array, column: str) -> np.ndarray:
    """float64 values of a string column; anything but a finite number is a bad row (read 0.0)."""
    nulls = np.asarray(arr.is_null())
    ok = np.asarray(pc.fill_null(pc.match_substring_regex(arr, _FLOAT), False))
    rows.bad(nulls, column, "null", "missing value")
    rows.bad(~ok & ~nulls, column, "not_number", "not a finite number", arr.to_numpy(zero_copy_only=False))
    good = pc.if_else(pa.array(ok), arr, pa.scalar("0"))
    return pc.cast(pc.utf8_trim_whitespace(good), pa.float64()).to_numpy(zero_copy_only=False)


def check_binary(rows: Rows, values: np.ndarray, column: str) -> np.ndarray:
    rows.bad((values != 0) & (values != 1), column, "not_binary", "not 0/1", values)
    return values == 1


class DenseVocab:
    """Raw ids -> dense indices `first .. first + len - 1` in ascending raw order (first = 1 when 0 is reserved
    for a missing value); `raw` is kept for DIR/vocab/<name>.parquet, so predictions map back to raw ids."""

    def __init__(self, raw_values: np.ndarray, first: int = 0):
        self.raw = np.unique(raw_values)
        self.first = first

    @property
    def size(self) -> int:
        """vocab_size: the dense ids plus the reserved ones."""
        return len(self.raw) + self.first

    def index(self, raw_values: np.ndarray) -> np.ndarray:
        """Dense index of each raw id; ids not in the vocabulary read -1 (see `known`)."""
        pos = np.searchsorted(self.raw, raw_values)
        pos = np.minimum(pos, max(len(self.raw) - 1, 0))
        found = (self.raw[pos] == raw_values) if len(self.raw) else np.zeros(len(raw_values), bool)
        return np.where(found, pos + self.first, -1).astype(np.int64)

    def table(self) -> pa.Table:
        return pa.table({"index": pa.array(np.arange(self.first, self.size, dtype=np.int64)),
                         "raw": pa.array(self.raw)})


def impression_table(columns: Dict[str, Any], sparse: Sequence[str], extra: Sequence[str] = ()) -> pa.Table:
    """The canonical impression columns (docs/data.md) in their order and Arrow types; `sparse` names the
    single-valued attribute columns after the ids, `extra` trailing informational columns (kept as given)."""
    answered = np.asarray(columns["questionnaire_answered"], dtype=bool)
    fields = [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
    fields += [(name, pa.int64()) for name in sparse]
    arrays = [pa.array(np.asarray(columns[n], dtype=np.int64)) for n, _ in fields]
    for h in HISTORIES:
        fields.append((h, pa.list_(pa.int64())))
        arrays.append(columns[h])
    for name, t in (("duration_s", pa.float32()), ("click", pa.int8()), ("watch_time_s", pa.float32()),
                    ("skip", pa.int8()), ("questionnaire_answered", pa.int8())):
        fields.append((name, t))
        arrays.append(pa.array(np.asarray(columns[name]).astype(t.to_pandas_dtype())))
    fields.append(("satisfied", pa.int8()))
    arrays.append(pa.array(np.asarray(columns["satisfied"]).astype(np.int8), mask=~answered))
    for name in extra:
        arr = columns[name] if isinstance(columns[name], pa.Array) else pa.array(columns[name])
        fields.append((name, arr.type))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class Output:
    """The output data dir, built in a sibling temp dir and moved into place only when complete: a reader sees the
    old dir (or none) or the whole new one. A non-empty --out is refused unless --overwrite."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise ConfigError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def write_parquet(self, relative: str, table: pa.Table) -> None:
        path = self.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd")

    def commit(self) -> None:
        old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, kind, value, tb) -> None:
        """On any error the temp dir goes; --out is left as it was."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def sim_defaults() -> Dict[str, Any]:
    """configs/sim.yaml as a raw mapping (the defaults every written config starts from)."""
    return load_yaml(SIM_CONFIG)


def history_lengths(defaults: Dict[str, Any]) -> Dict[str, int]:
    """max_len of each canonical history in the defaults (histories are written no longer than they are read)."""
    return {f["name"]: int(f["max_len"]) for f in defaults["data"]["sequence"]}


def sequences(defaults: Dict[str, Any], item_vocab: int) -> List[Dict[str, Any]]:
    """The default data.sequence entries with the item vocabulary of this data."""
    return [{**f, "vocab_size": item_vocab} for f in defaults["data"]["sequence"]]


def write_config(output: Output, source: str, changes: Dict[str, Any],
                 replace: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """DIR/satrank.yaml: configs/sim.yaml with `changes` laid over it (mappings merge, lists are replaced) and the
    mappings at the dotted paths of `replace` replaced whole (e.g. embeddings.tables, whose sim.yaml entries name
    tables this data lacks). Written whole so it holds by itself; checked by loading it as every job does."""
    from satrank.jobs.config import load_config  # the jobs' loader: what --config DIR/satrank.yaml will meet

    merged = deep_merge(sim_defaults(), changes)
    merged.pop("simulate", None)
    for path, value in (replace or {}).items():
        *parents, last = path.split(".")
        node = merged
        for key in parents:
            node = node[key]
        node[last] = value
    header = (f"# written by satrank.pipeline.sources.{source}: configs/sim.yaml with these keys changed:\n"
              + "".join(f"#   {k}\n" for k in [*_paths(changes), *(replace or {})]))
    path = write_text_atomic(output.tmp / "satrank.yaml", header + yaml.safe_dump(merged, sort_keys=False))
    try:
        load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"the written config does not load (a converter bug): {exc}") from None
    return merged


def loo_negatives(n_items: int) -> Dict[str, Any]:
    """evaluate.loo_negatives for this catalogue: sim.yaml's 99 sampled never-interacted items (the paper's), at most
    half the items (a small catalogue has no user with 99 never-interacted items: jobs.train's leave-one-out fails)."""
    return {"loo_negatives": min(99, max(1, n_items // 2))}


def _paths(changes: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in changes.items():
        if isinstance(v, dict) and v:
            out += _paths(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def finish(output: Output, source: str, rows_in: Dict[str, int], rejected: Dict[str, int],
           rows_out: Dict[str, int], added: Dict[str, int], details: Dict[str, Any], started: float) -> Dict[str, Any]:
    """Check the accounting (rows in = rows out + rows rejected, `added` rows not read from the input are
    counted apart), write DIR/convert.json, move the dir into place, print one summary line."""
    n_in, n_rej = sum(rows_in.values()), sum(rejected.values())
    n_out = sum(rows_out.values()) - sum(added.values())
    if n_in != n_out + n_rej:
        raise AssertionError(f"accounting: {n_in} rows in != {n_out} out + {n_rej} rejected")
    report = {"source": source, "rows_in": n_in, "rows_in_by_file": rows_in, "rows_out": n_out,
              "rows_rejected": n_rej, "rows_rejected_by_reason": rejected, "rows_added": added,
              "rows_written_by_split": rows_out, **details, "wall_s": round(time.perf_counter() - started, 3)}
    write_json_atomic(output.tmp / "convert.json", report)
    output.commit()
    added_text = f" (+{sum(added.values())} added: {added})" if added else ""
    reasons = f" {rejected}" if rejected else ""
    print(f"{source}: {n_in} rows in = {n_out} out + {n_rej} rejected{reasons}{added_text}; "
          f"written {rows_out} to {output.out}", flush=True)
    return report


def main_of(prog: str, build: Callable[[], argparse.ArgumentParser],
            convert: Callable[[argparse.Namespace], Dict[str, Any]]) -> Callable[[Optional[Sequence[str]]], int]:
    """A converter's main(): bad data exits 1, a bad option or output dir exits 2, each with one line on stderr."""
    def main(argv: Optional[Sequence[str]] = None) -> int:
        args = build().parse_args(argv)
        try:
            convert(args)
        except DataError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        except ConfigError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    return main
