"""`python -m satrank.pipeline.sources.ratings`: explicit ratings with a self-selected (MNAR) training log and a
randomly assigned (MAR) test log -> the canonical Parquet splits (docs/data.md "Real logs: explicit ratings").

    python -m satrank.pipeline.sources.ratings --format triplets --src YAHOO_R3_DIR --out DIR
        [--train-file ydata-ymusic-rating-study-v1_0_train.txt] [--test-file ydata-ymusic-rating-study-v1_0_test.txt]
    python -m satrank.pipeline.sources.ratings --format coat --src COAT_DIR --out DIR
        [--user-feature-groups gender:2,age:6,location:3,fashion_interest:3]
        [--item-feature-groups gender:2,jacket_type:16,color:13,front_page:2]
    (both) [--positive-threshold 4] [--valid-fraction 0.1] [--unrated-per-rated 4|all] [--seed 0]

Why: Yahoo! R3 and Coat are the standard public checks of debiasing under missing-not-at-random answers: users
chose what to rate in the training log, and rated randomly assigned items in the test log. Mapping: a rating is
an answered questionnaire (questionnaire_answered = 1, satisfied = rating >= --positive-threshold); sampled
unrated (user, item) pairs of the training matrix are the unanswered rows the propensity model needs. Rating data
has no clicks, views or time: click = 1 exactly on rated rows, watch_time_s = duration_s = 0, skip = 0, and each
user's training rows are put in a seeded random order (timestamp = position) so histories stay causal. The MAR
ratings come after every training row and are split at random into valid / test.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError
from satrank.pipeline.sources import common
from satrank.pipeline.sources.histories import causal_histories

SOURCE = "ratings"
RATING_RANGE = (1, 5)  # Yahoo! R3 and Coat both rate 1..5 (Coat's 0 = unrated)
DEFAULT_FILES = {"triplets": ("ydata-ymusic-rating-study-v1_0_train.txt", "ydata-ymusic-rating-study-v1_0_test.txt"),
                 "coat": ("train.ascii", "test.ascii")}
COAT_USER_GROUPS = "gender:2,age:6,location:3,fashion_interest:3"  # Coat's README: the one-hot blocks of each row
COAT_ITEM_GROUPS = "gender:2,jacket_type:16,color:13,front_page:2"


class Ratings:
    """One rating file's kept records (raw user / item ids, rating) and its row accounting."""

    def __init__(self, file: Path, users: np.ndarray, items: np.ndarray, rating: np.ndarray, rows_in: int,
                 rejected: Dict[str, int]):
        self.file, self.users, self.items, self.rating = file, users, items, rating
        self.rows_in, self.rejected = rows_in, rejected


def _lines(path: Path) -> List[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path) as fh:
        return fh.read().splitlines()


def _check_ratings(rows: common.Rows, users: np.ndarray, items: np.ndarray, rating: np.ndarray) -> None:
    """Ratings outside RATING_RANGE and a (user, item) rated twice in one file are bad rows."""
    lo, hi = RATING_RANGE
    rows.bad((rating < lo) | (rating > hi), "rating", "out_of_range", f"rating outside {lo}..{hi}", rating)
    keep = np.flatnonzero(rows.keep)
    order = keep[np.lexsort((items[keep], users[keep]))]
    repeat = np.zeros(len(users), bool)
    repeat[order[1:]] = (users[order[1:]] == users[order[:-1]]) & (items[order[1:]] == items[order[:-1]])
    rows.bad(repeat, "item", "duplicate", "the user rated this item before in this file", items)


def read_triplets(path: Path, on_bad_row: str) -> Ratings:
    """`user item rating` per line, whitespace or tab separated, no header (Yahoo! R3); blank lines are ignored."""
    numbered = [(i, line.split()) for i, line in enumerate(_lines(path)) if line.strip()]
    n = len(numbered)
    fields = [[f[k] if k < len(f) else None for _, f in numbered] for k in range(3)]
    rows = common.Rows(on_bad_row, [str(path)], np.zeros(n, np.int64), np.array([i for i, _ in numbered], np.int64),
                       header_lines=0)
    extra = np.array([len(f) > 3 for _, f in numbered], bool)
    rows.bad(extra, "rating", "extra_fields", "more than 3 fields (user item rating)")
    users, items, rating = (common.parse_ints(rows, pa.array(fields[k], pa.string()), name)
                            for k, name in enumerate(("user", "item", "rating")))
    rows.bad(users < 0, "user", "negative", "negative id", users)
    rows.bad(items < 0, "item", "negative", "negative id", items)
    _check_ratings(rows, users, items, rating)
    keep = rows.keep
    return Ratings(path, users[keep], items[keep], rating[keep], n, rows.rejected())


def read_matrix(path: Path) -> List[List[str]]:
    """A dense whitespace-separated matrix (one row per user); rows of different widths are refused."""
    rows = [line.split() for line in _lines(path) if line.strip()]
    if not rows:
        raise DataError(f"{path}: empty matrix")
    for r, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise DataError(f"{path}: row {r} (line {r + 1}): {len(row)} columns, row 0 has {len(rows[0])}")
    return rows


def read_coat_ratings(path: Path, on_bad_row: str) -> Tuple[Ratings, Tuple[int, int]]:
    """Coat's train.ascii / test.ascii: user x item ratings, 0 = unrated; every other cell is one rating row."""
    cells = np.array(read_matrix(path), dtype=object)
    shape = cells.shape
    rated = cells != "0"
    user, item = np.nonzero(rated)
    rows = common.Rows(on_bad_row, [str(path)], np.zeros(len(user), np.int64), user, header_lines=0,
                       matrix_column=item)
    rating = common.parse_ints(rows, pa.array(cells[rated].astype(str).tolist(), pa.string()), "rating")
    _check_ratings(rows, user, item, rating)
    keep = rows.keep
    return Ratings(path, user[keep], item[keep], rating[keep], len(user), rows.rejected()), shape


def parse_groups(spec: str, option: str) -> List[Tuple[str, int]]:
    groups = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"{option} {spec!r}: expected name:size,name:size,... (sizes >= 1)")
        groups.append((m.group(1), int(m.group(2))))
    return groups


def read_one_hot(path: Path, groups: List[Tuple[str, int]], n_rows: int, prefix: str) -> Dict[str, np.ndarray]:
    """Coat's side features: one row per user (item), one-hot blocks in `groups` order; exactly one 1 per block.
    Returns `<prefix>_<group>` -> the hot index of each row. Any other layout is refused (file, row, column)."""
    m = read_matrix(path)
    width = sum(size for _, size in groups)
    if len(m) != n_rows or len(m[0]) != width:
        raise DataError(f"{path}: {len(m)} rows x {len(m[0])} columns, expected {n_rows} x {width} "
                        f"(one row per id of the rating matrix; blocks {groups})")
    try:
        x = np.array(m, dtype=float)
    except ValueError:
        bad = next((r, c) for r, row in enumerate(m) for c, v in enumerate(row) if not _is_number(v))
        raise DataError(f"{path}: row {bad[0]} (line {bad[0] + 1}), column {bad[1]}: not a number "
                        f"({m[bad[0]][bad[1]]!r})") from None
    out, start = {}, 0
    for name, size in groups:
        block = x[:, start:start + size]
        wrong = ~(np.isin(block, (0.0, 1.0)).all(1) & (block.sum(1) == 1))
        if wrong.any():
            r = int(np.argmax(wrong))
            raise DataError(f"{path}: row {r} (line {r + 1}), columns {start}..{start + size - 1} ({prefix} {name}): "
                            f"not one-hot ({block[r].tolist()})")
        out[f"{prefix}_{name}"] = block.argmax(1).astype(np.int64)
        start += size
    return out


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def sample_unrated(rng: np.random.Generator, users: np.ndarray, items: np.ndarray, n_items: int,
                   per_rated: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Per user, min(per_rated x rated, unrated) items drawn uniformly without replacement from the items the user
    did not rate in the training log (per_rated None: all of them)."""
    out_u, out_i = [], []
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for chunk in np.split(order, bounds) if len(order) else []:
        unrated = np.setdiff1d(np.arange(n_items), items[chunk])
        k = len(unrated) if per_rated is None else min(len(unrated), int(round(per_rated * len(chunk))))
        out_i.append(np.sort(rng.choice(unrated, size=k, replace=False)))
        out_u.append(np.full(k, users[chunk[0]]))
    if not out_u:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_u).astype(np.int64), np.concatenate(out_i).astype(np.int64)


def convert(args: argparse.Namespace) -> Dict[str, Any]:
    started = time.perf_counter()
    if not RATING_RANGE[0] <= args.positive_threshold <= RATING_RANGE[1]:
        raise ConfigError(f"--positive-threshold must be a rating {RATING_RANGE[0]}..{RATING_RANGE[1]}, "
                          f"got {args.positive_threshold}")
    if not 0.0 < args.valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    try:
        per_rated = None if args.unrated_per_rated == "all" else float(args.unrated_per_rated)
    except ValueError:
        per_rated = -1.0
    if per_rated is not None and not per_rated >= 0:
        raise ConfigError(f"--unrated-per-rated must be >= 0 or all, got {args.unrated_per_rated}")
    if not args.src.is_dir():
        raise ConfigError(f"--src {str(args.src)!r}: not a directory")
    default_train, default_test = DEFAULT_FILES[args.format]
    train_path, test_path = args.src / (args.train_file or default_train), args.src / (args.test_file or default_test)
    rng = np.random.default_rng(args.seed)
    with common.Output(args.out, args.overwrite) as output:
        side: Dict[str, np.ndarray] = {}
        groups: Dict[str, List[Tuple[str, int]]] = {"user": [], "item": []}
        if args.format == "coat":
            train, shape = read_coat_ratings(train_path, args.on_bad_row)
            test, test_shape = read_coat_ratings(test_path, args.on_bad_row)
            if test_shape != shape:
                raise DataError(f"{test_path}: a {test_shape[0]} x {test_shape[1]} matrix, {train_path} is "
                                f"{shape[0]} x {shape[1]} (users x items must agree)")
            user_vocab, item_vocab = common.DenseVocab(np.arange(shape[0])), common.DenseVocab(np.arange(shape[1]))
            groups = {"user": parse_groups(args.user_feature_groups, "--user-feature-groups"),
                      "item": parse_groups(args.item_feature_groups, "--item-feature-groups")}
            features = args.src / "user_item_features"
            side.update(read_one_hot(features / "user_features.ascii", groups["user"], shape[0], "user"))
            side.update(read_one_hot(features / "item_features.ascii", groups["item"], shape[1], "item"))
        else:
            train, test = read_triplets(train_path, args.on_bad_row), read_triplets(test_path, args.on_bad_row)
            user_vocab = common.DenseVocab(np.concatenate([train.users, test.users]))
            item_vocab = common.DenseVocab(np.concatenate([train.items, test.items]))
        n_items = item_vocab.size
        t_user, t_item = user_vocab.index(train.users), item_vocab.index(train.items)
        un_user, un_item = sample_unrated(rng, t_user, t_item, n_items, per_rated)
        m_user, m_item = user_vocab.index(test.users), item_vocab.index(test.items)
        n_train, n_unrated, n_mar = len(t_user), len(un_user), len(m_user)
        user = np.concatenate([t_user, un_user, m_user])
        item = np.concatenate([t_item, un_item, m_item])
        rating = np.concatenate([train.rating, np.zeros(n_unrated, np.int64), test.rating])
        rated = rating > 0
        satisfied = rated & (rating >= args.positive_threshold)
        is_mar = np.arange(len(user)) >= n_train + n_unrated
        # pseudo-time: each user's training rows in a seeded random order (1, 2, ...); the MAR rows after them all
        timestamp = np.zeros(len(user), np.int64)
        train_rows = np.flatnonzero(~is_mar)
        shuffled = train_rows[rng.permutation(len(train_rows))]
        shuffled = shuffled[np.argsort(user[shuffled], kind="stable")]
        starts = np.searchsorted(user[shuffled], user[shuffled], side="left")
        timestamp[shuffled] = np.arange(len(shuffled)) - starts + 1
        timestamp[is_mar] = int(timestamp.max(initial=0)) + 1
        lengths = common.history_lengths(common.sim_defaults())
        hist = causal_histories(user, timestamp, item, {
            "hist_click": rated, "hist_satisfied": satisfied, "hist_dissatisfied": rated & ~satisfied,
            "hist_skip": np.zeros(len(user), bool)}, lengths)
        zeros = np.zeros(len(user))
        columns = {"user_id": user, "item_id": item, "timestamp": timestamp, **hist, "duration_s": zeros,
                   "click": rated, "watch_time_s": zeros, "skip": zeros, "questionnaire_answered": rated,
                   "satisfied": satisfied, "rating": pa.array(rating.astype(np.int8), mask=~rated)}
        names = [f"{kind}_{g}" for kind in ("user", "item") for g, _ in groups[kind]]
        for name in names:
            columns[name] = side[name][user if name.startswith("user_") else item]
        table = common.impression_table(columns, names, extra=["rating"])
        mar_rows = np.flatnonzero(is_mar)
        n_valid = int(round(args.valid_fraction * n_mar))
        valid_rows = np.sort(rng.choice(mar_rows, size=n_valid, replace=False))
        splits = {"train": train_rows, "valid": valid_rows, "test": np.setdiff1d(mar_rows, valid_rows)}
        rows_out = {}
        for split, idx in splits.items():
            idx = idx[np.lexsort((item[idx], user[idx], timestamp[idx]))]
            output.write_parquet(f"{split}/part-00000.parquet", table.take(pa.array(idx)))
            rows_out[split] = len(idx)
        item_columns = {"item_id": pa.array(np.arange(n_items, dtype=np.int64))}
        item_columns.update({n: pa.array(side[n]) for n in names if n.startswith("item_")})
        item_columns["duration_s"] = pa.array(np.zeros(n_items, np.float32))
        output.write_parquet("items/part-00000.parquet", pa.table(item_columns))
        output.write_parquet("vocab/user_id.parquet", user_vocab.table())
        output.write_parquet("vocab/item_id.parquet", item_vocab.table())
        changes, replace = config_changes(user_vocab.size, n_items, groups)
        common.write_config(output, SOURCE, changes, replace)
        details = {"options": {"format": args.format, "positive_threshold": args.positive_threshold,
                               "valid_fraction": args.valid_fraction, "unrated_per_rated": args.unrated_per_rated,
                               "seed": args.seed, "on_bad_row": args.on_bad_row, "train_file": str(train_path),
                               "test_file": str(test_path)},
                   "vocab_sizes": {"user_id": user_vocab.size, "item_id": n_items,
                                   **{n: size for kind in groups for n, size in
                                      ((f"{kind}_{g}", s) for g, s in groups[kind])}},
                   "satisfied_rate": {"train": float(satisfied[:n_train].mean()) if n_train else None,
                                      "mar": float(satisfied[is_mar].mean()) if n_mar else None}}
        rejected = {f"{Path(r.file).name}:{k}": v for r in (train, test) for k, v in r.rejected.items()}
        return common.finish(output, SOURCE, {str(train.file): train.rows_in, str(test.file): test.rows_in},
                             rejected, rows_out, {"unrated_train": n_unrated}, details, started)


def config_changes(n_users: int, n_items: int, groups: Dict[str, List[Tuple[str, int]]]
                   ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(changes, whole replacements) of configs/sim.yaml for rating data: its ids and one-hot side features, no
    watch-time heads (watch_time_s is 0), and propensity.behaviour = [] because click equals answered here (the
    propensity job refuses a behaviour input that determines the answer: satrank.jobs.stage1_checks)."""
    defaults = common.sim_defaults()
    user_side = [f"user_{g}" for g, _ in groups["user"]]
    item_side = [f"item_{g}" for g, _ in groups["item"]]
    sparse = [{"name": "user_id", "column": "user_id", "vocab_size": n_users, "out_of_range": "error", "table": "user"},
              {"name": "item_id", "column": "item_id", "vocab_size": n_items, "out_of_range": "error", "table": "item"}]
    sparse += [{"name": f"{kind}_{g}", "column": f"{kind}_{g}", "vocab_size": size, "out_of_range": "error",
                "table": f"{kind}_{g}"} for kind in ("user", "item") for g, size in groups[kind]]
    changes = {
        "data": {"sparse": sparse, "sequence": common.sequences(defaults, n_items), "truth_columns": [],
                 "items": {"sparse": item_side, "dense": ["duration_s"]}},
        "pretrain": {"tower": {"user_features": ["user_id", *user_side]}, "watch_time_weight": 0.0},
        "propensity": {"features": ["user_id", "item_id", *user_side, *item_side], "dense": [], "behaviour": []},
        "model": {"user_features": ["user_id", *user_side], "item_attr_features": item_side,
                  "watch_time_head": False},
        "loss": {"watch_time_weight": 0.0},
        "evaluate": common.loo_negatives(n_items),
    }
    replace = {"embeddings.tables": {"item": {"sharding": "row_wise", "dim": None},
                                     "user": {"sharding": "row_wise", "dim": None}}}
    return changes, replace


def build_parser() -> argparse.ArgumentParser:
    p = common.parser("satrank sources.ratings", __doc__.split("\n\n")[0])
    p.add_argument("--format", choices=("triplets", "coat"), required=True,
                   help="triplets: `user item rating` lines (Yahoo! R3); coat: dense user x item matrices + one-hot "
                        "side features (Coat)")
    p.add_argument("--train-file", default=None, help="the MNAR (self-selected) ratings, relative to --src "
                                                      "(default: ydata-...-v1_0_train.txt / train.ascii)")
    p.add_argument("--test-file", default=None, help="the MAR (randomly assigned) ratings, relative to --src "
                                                     "(default: ydata-...-v1_0_test.txt / test.ascii)")
    p.add_argument("--positive-threshold", type=int, default=4, help="satisfied = rating >= this")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of the MAR ratings drawn at random (seeded) into valid/; the rest is test/")
    p.add_argument("--unrated-per-rated", default="4",
                   help="unrated (user, item) pairs sampled per rated training row of the user, as unanswered rows "
                        "for the propensity model; `all` = every unrated pair (fine for Coat's 290 x 300)")
    p.add_argument("--seed", type=int, default=0, help="unrated sampling, training order, valid/test draw")
    p.add_argument("--user-feature-groups", default=COAT_USER_GROUPS,
                   help="coat: one-hot blocks of user_item_features/user_features.ascii, name:size,...")
    p.add_argument("--item-feature-groups", default=COAT_ITEM_GROUPS,
                   help="coat: one-hot blocks of user_item_features/item_features.ascii, name:size,...")
    return p


main = common.main_of("satrank sources.ratings", build_parser, convert)

if __name__ == "__main__":
    raise SystemExit(main())
