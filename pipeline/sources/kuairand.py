"""`python -m satrank.pipeline.sources.kuairand`: KuaiRand (Pure / 1K / 27K) in its official CSV layout -> the
canonical Parquet splits (docs/data.md "Real logs: KuaiRand").

    python -m satrank.pipeline.sources.kuairand --src KuaiRand-Pure/data --out DIR [--variant pure]
        [--skip-threshold-s 3.0] [--valid-days 1] [--on-bad-row error|skip] [--overwrite]

Why: KuaiRand is the public short-video log SAQRec is evaluated on; its randomly exposed log (log_random_*) is the
unbiased test. Mapping: click = is_click, watch_time_s = play_time_ms / 1000, duration_s = duration_ms / 1000,
skip = watch_time_s < --skip-threshold-s, questionnaire_answered = is_like or is_hate, satisfied = is_like (null
when unanswered); histories causal per user over both logs (events strictly before the impression, by time_ms);
train / valid = the standard log before / within its last --valid-days dates; test = the random log. Ids are
remapped to dense indices (DIR/vocab/<feature>.parquet: index, raw); the item table comes from the video features.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError
from satrank.pipeline.sources import common
from satrank.pipeline.sources.histories import causal_histories

SOURCE = "kuairand"
LOG_COLUMNS = ("user_id", "video_id", "date", "time_ms", "is_click", "is_like", "is_hate", "play_time_ms",
               "duration_ms")
USER_COLUMNS = ("user_id", "user_active_degree")
VIDEO_COLUMNS = ("video_id", "author_id", "video_duration", "tag")
SKIP_THRESHOLD_S = 3.0  # the simulator's simulate.skip_threshold_s: a play shorter than 3 s is a skip


def find(src: Path, prefix: str, variant: Optional[str]) -> List[Path]:
    """The CSV files `<prefix>*<variant>*.csv` of the dataset folder (all parts of a split log), sorted."""
    pattern = f"{prefix}*{variant}*.csv" if variant else f"{prefix}*.csv"
    if not src.is_dir():
        raise ConfigError(f"--src {str(src)!r}: not a directory")
    files = sorted(src.glob(pattern))
    if not files:
        raise DataError(f"{src}: no file {pattern} "
                        f"(KuaiRand's data folder holds log_standard_*, log_random_*, user_features_*, "
                        f"video_features_basic_*)")
    return files


def read_files(files: Sequence[Path], columns: Sequence[str], on_bad_row: str) -> tuple:
    """(string columns of all files concatenated, Rows numbering every row by its own file)."""
    parts = [common.read_csv(f, columns) for f in files]
    sizes = [len(p[columns[0]]) for p in parts]
    data = {c: pa.concat_arrays([p[c] for p in parts]) if parts else pa.array([], pa.string()) for c in columns}
    file_index = np.repeat(np.arange(len(files)), sizes)
    row_in_file = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, np.int64)
    return data, common.Rows(on_bad_row, [str(f) for f in files], file_index, row_in_file), sizes


def unique_ids(rows: common.Rows, ids: np.ndarray, column: str) -> None:
    """A feature table's id repeated on a later row is a bad row (the first occurrence stays)."""
    order = np.argsort(ids, kind="stable")
    repeat = np.zeros(len(ids), bool)
    repeat[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    rows.bad(repeat & rows.keep, column, "duplicate", "id repeated (one row per id)", ids)


def users_table(files: Sequence[Path], on_bad_row: str) -> Dict[str, Any]:
    data, rows, sizes = read_files(files, USER_COLUMNS, on_bad_row)
    raw = common.parse_ints(rows, data["user_id"], "user_id")
    rows.bad(raw < 0, "user_id", "negative", "negative id", raw)
    unique_ids(rows, raw, "user_id")
    keep = np.flatnonzero(rows.keep)
    keep = keep[np.argsort(raw[keep], kind="stable")]  # ascending raw id = dense index order (DenseVocab)
    degree = pc.fill_null(data["user_active_degree"], "").to_numpy(zero_copy_only=False)[keep]
    activity_vocab = common.DenseVocab(degree[degree != ""], first=1)  # 0 = no value
    activity = np.where(degree == "", 0, activity_vocab.index(degree))
    return {"raw": raw[keep], "activity": activity, "activity_vocab": activity_vocab,
            "report": {"rows_in": int(sum(sizes)), "rows_out": len(keep), "rejected": rows.rejected()}}


def videos_table(files: Sequence[Path], on_bad_row: str) -> Dict[str, Any]:
    data, rows, sizes = read_files(files, VIDEO_COLUMNS, on_bad_row)
    raw = common.parse_ints(rows, data["video_id"], "video_id")
    rows.bad(raw < 0, "video_id", "negative", "negative id", raw)
    unique_ids(rows, raw, "video_id")
    author = common.parse_ints(rows, data["author_id"], "author_id", nullable=True)
    first_tag = pc.replace_substring_regex(data["tag"], r"[,;\s].*$", "")  # "28,11" -> "28"
    first_tag = pc.if_else(pc.equal(first_tag, ""), pa.scalar(None, pa.string()), first_tag)
    category = common.parse_ints(rows, first_tag, "tag", nullable=True)
    duration_ms = data["video_duration"]
    has_duration = np.asarray(duration_ms.is_valid())
    duration_ms = common.parse_floats(rows, pc.fill_null(duration_ms, "0"), "video_duration")
    rows.bad(duration_ms < 0, "video_duration", "negative", "negative duration", duration_ms)
    keep = np.flatnonzero(rows.keep)
    keep = keep[np.argsort(raw[keep], kind="stable")]  # ascending raw id = dense index order (DenseVocab)
    author, category = author[keep], category[keep]
    author_vocab = common.DenseVocab(author[author >= 0], first=1)  # 0 = no author
    category_vocab = common.DenseVocab(category[category >= 0], first=1)  # 0 = no tag
    return {"raw": raw[keep], "author": np.where(author >= 0, author_vocab.index(author), 0),
            "category": np.where(category >= 0, category_vocab.index(category), 0), "author_vocab": author_vocab,
            "category_vocab": category_vocab, "duration_ms": np.where(has_duration[keep], duration_ms[keep], np.nan),
            "report": {"rows_in": int(sum(sizes)), "rows_out": len(keep), "rejected": rows.rejected()}}


def convert(args: argparse.Namespace) -> Dict[str, Any]:
    started = time.perf_counter()
    if args.skip_threshold_s < 0 or args.valid_days < 1:
        raise ConfigError("--skip-threshold-s must be >= 0 and --valid-days >= 1")
    standard = find(args.src, "log_standard_", args.variant)
    random_logs = find(args.src, "log_random_", args.variant)
    with common.Output(args.out, args.overwrite) as output:
        users = users_table(find(args.src, "user_features_", args.variant), args.on_bad_row)
        videos = videos_table(find(args.src, "video_features_basic_", args.variant), args.on_bad_row)
        files = [*standard, *random_logs]
        data, rows, sizes = read_files(files, LOG_COLUMNS, args.on_bad_row)
        is_random = rows.file_index >= len(standard)
        v = {c: common.parse_ints(rows, data[c], c) for c in ("user_id", "video_id", "date", "time_ms")}
        rows.bad(v["time_ms"] < 0, "time_ms", "negative", "negative time", v["time_ms"])
        flags = {c: common.check_binary(rows, common.parse_ints(rows, data[c], c), c)
                 for c in ("is_click", "is_like", "is_hate")}
        play_ms, dur_ms = (common.parse_floats(rows, data[c], c) for c in ("play_time_ms", "duration_ms"))
        rows.bad(play_ms < 0, "play_time_ms", "negative", "negative play time", play_ms)
        rows.bad(dur_ms < 0, "duration_ms", "negative", "negative duration", dur_ms)
        user_vocab, item_vocab = common.DenseVocab(users["raw"]), common.DenseVocab(videos["raw"])
        user, item = user_vocab.index(v["user_id"]), item_vocab.index(v["video_id"])
        rows.reject(user < 0, "no_user_features_row:user_id")
        rows.reject(item < 0, "no_video_features_row:video_id")

        keep = np.flatnonzero(rows.keep)
        user, item, t_ms = user[keep], item[keep], v["time_ms"][keep]
        click, like, hate = (flags[c][keep] for c in ("is_click", "is_like", "is_hate"))
        watch = play_ms[keep] / 1000.0
        answered, skip = like | hate, watch < args.skip_threshold_s
        lengths = common.history_lengths(common.sim_defaults())
        hist = causal_histories(user, t_ms, item, {"hist_click": click, "hist_satisfied": like,
                                                   "hist_dissatisfied": hate & ~like, "hist_skip": skip}, lengths)
        user_index = user_vocab.index(v["user_id"][keep])
        columns = {"user_id": user, "item_id": item, "timestamp": t_ms // 1000,
                   "author_id": videos["author"][item], "category_id": videos["category"][item],
                   "user_activity": users["activity"][user_index], **hist, "duration_s": dur_ms[keep] / 1000.0,
                   "click": click, "watch_time_s": watch, "skip": skip, "questionnaire_answered": answered,
                   "satisfied": like}
        table = common.impression_table(columns, ["author_id", "category_id", "user_activity"])
        date = v["date"][keep]
        std = ~is_random[keep]
        valid_dates = np.unique(date[std])[-args.valid_days:]
        in_valid = std & np.isin(date, valid_dates)
        masks = {"train": std & ~in_valid, "valid": in_valid, "test": ~std}
        rows_out = {}
        for split, mask in masks.items():
            idx = np.flatnonzero(mask)
            idx = idx[np.lexsort((user[idx], t_ms[idx]))]  # time order, as the simulator writes splits
            output.write_parquet(f"{split}/part-00000.parquet", table.take(pa.array(idx)))
            rows_out[split] = len(idx)
        item_duration = videos["duration_ms"].copy()
        from_log = np.full(item_vocab.size, -1.0)
        np.maximum.at(from_log, item, dur_ms[keep])
        item_duration = np.where(np.isnan(item_duration), np.maximum(from_log, 0.0), item_duration) / 1000.0
        output.write_parquet("items/part-00000.parquet", pa.table({
            "item_id": pa.array(np.arange(item_vocab.size, dtype=np.int64)),
            "author_id": pa.array(videos["author"]), "category_id": pa.array(videos["category"]),
            "duration_s": pa.array(item_duration.astype(np.float32))}))
        vocabs = {"user_id": user_vocab, "item_id": item_vocab, "author_id": videos["author_vocab"],
                  "category_id": videos["category_vocab"], "user_activity": users["activity_vocab"]}
        for name, vocab in vocabs.items():
            output.write_parquet(f"vocab/{name}.parquet", vocab.table())
        common.write_config(output, SOURCE, config_changes({n: v.size for n, v in vocabs.items()}))
        details = {"options": {"skip_threshold_s": args.skip_threshold_s, "valid_days": args.valid_days,
                               "variant": args.variant, "on_bad_row": args.on_bad_row},
                   "valid_dates": [int(d) for d in valid_dates], "user_features": users["report"],
                   "video_features": videos["report"], "vocab_sizes": {n: v.size for n, v in vocabs.items()},
                   "answered_rows": int(answered.sum()), "like_and_hate_rows": int((like & hate).sum())}
        return common.finish(output, SOURCE, {str(f): n for f, n in zip(files, sizes)}, rows.rejected(), rows_out,
                             {}, details, started)


def config_changes(vocab: Dict[str, int]) -> Dict[str, Any]:
    """What DIR/satrank.yaml changes in configs/sim.yaml: this data's vocabularies, no ground-truth columns, the
    leave-one-out negatives the catalogue allows."""
    defaults = common.sim_defaults()
    return {"data": {
        "sparse": [
            {"name": "user_id", "column": "user_id", "vocab_size": vocab["user_id"], "out_of_range": "error",
             "table": "user"},
            {"name": "item_id", "column": "item_id", "vocab_size": vocab["item_id"], "out_of_range": "error",
             "table": "item"},
            {"name": "author_id", "column": "author_id", "vocab_size": vocab["author_id"], "out_of_range": "oov",
             "table": "author"},
            {"name": "category_id", "column": "category_id", "vocab_size": vocab["category_id"],
             "out_of_range": "oov", "table": "category"},
            {"name": "user_activity", "column": "user_activity", "vocab_size": vocab["user_activity"],
             "out_of_range": "oov", "table": "user_activity"}],
        "sequence": common.sequences(defaults, vocab["item_id"]),
        "truth_columns": []},
        "evaluate": common.loo_negatives(vocab["item_id"])}


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("satrank sources.kuairand", __doc__.split("\n\n")[0])
    p.add_argument("--variant", default=None, help="file name part picking one variant when a folder holds several "
                                                  "(pure, 1k, 27k); default: every matching file")
    p.add_argument("--skip-threshold-s", type=float, default=SKIP_THRESHOLD_S,
                   help="skip = play_time_ms / 1000 < this (the simulator's simulate.skip_threshold_s)")
    p.add_argument("--valid-days", type=int, default=1, help="the standard log's last N dates are the valid split")
    return p


main = common.main_of("satrank sources.kuairand", build_parser, convert)

if __name__ == "__main__":
    raise SystemExit(main())
