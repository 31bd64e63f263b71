"""Tiny datasets in the official layouts of the converters' sources (satrank.pipeline.sources), written as the
downloads ship them, plus hand-placed rows whose converted values the tests check exactly.

KuaiRand (Pure variant file names): 12 users (raw ids 100..111), 20 videos (raw ids 5000, 5003, ...), ~300 standard
log rows over 3 dates and ~60 random-log rows. User 100's events are hand-placed (see KUAIRAND_HAND).
Yahoo! R3 triplets and Coat dense matrices: tens of users and items, a few hundred ratings.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

USER_COLUMNS = (["user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                 "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range", "friend_user_num",
                 "friend_user_num_range", "register_days", "register_days_range"]
                + [f"onehot_feat{k}" for k in range(18)])
VIDEO_COLUMNS = ["video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status", "video_duration",
                 "server_width", "server_height", "music_id", "music_type", "tag"]
LOG_COLUMNS = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
               "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
               "comment_stay_time", "is_profile_enter", "is_rand", "tab"]
DATES = (20220408, 20220409, 20220410)
T0_MS = 1649376000000  # 2022-04-08 00:00 UTC
DAY_MS = 86_400_000
USERS = list(range(100, 112))
VIDEOS = [5000 + 3 * k for k in range(20)]
DEGREES = ["full_active", "high_active", "middle_active", "UNKNOWN"]
# user 100's hand-placed events: (log, day, ms into the day, video, is_click, is_like, is_hate, play_time_ms, dur_ms)
KUAIRAND_HAND = [
    ("standard", 0, 1_000, 5000, 1, 1, 0, 12_000, 10_000),   # clicked, liked: answered, satisfied
    ("standard", 0, 2_000, 5003, 1, 0, 1, 2_500, 11_000),    # clicked, hated, short play: a skip
    ("standard", 0, 2_000, 5006, 0, 0, 0, 0, 12_000),        # same ms as the one before: not in its history
    ("random", 1, 500, 5009, 1, 0, 0, 7_000, 13_000),        # random log: the test split
    ("standard", 2, 100, 5012, 1, 1, 0, 14_000, 14_000),     # the last date: the valid split
]


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _log_row(user, video, day, ms, click, like, hate, play, dur, rand):
    t = T0_MS + day * DAY_MS + ms
    return [user, video, DATES[day], (ms // 60000) // 60 * 100 + (ms // 60000) % 60, t, click, like, 0, 0, 0, hate,
            int(play > 0.9 * dur), play, dur, 0, 0, 0, rand, 1]


def write_kuairand(root: Path, seed: int = 0) -> Path:
    """root/ with log_standard_*_pure.csv (two parts, as the download splits by date), log_random_*_pure.csv,
    user_features_pure.csv, video_features_basic_pure.csv."""
    rng = np.random.default_rng(seed)
    users = [[u, DEGREES[u % 4], 0, 0, int(u % 5 == 0), 10, "(0,10]", 3, "[1,10)", 1, "[1,5)", 200, "183+"]
             + [int(rng.integers(0, 5)) for _ in range(18)] for u in USERS]
    _write_csv(root / "user_features_pure.csv", USER_COLUMNS, users)
    videos = [[v, 900 + k % 6, "NORMAL", "2022-01-01", "ShortImport", "public",
               "" if k == 7 else 1000 * (10 + k), 720, 1280, 0, 0, "" if k == 5 else f"{k % 4 + 1},{k % 3 + 20}"]
              for k, v in enumerate(VIDEOS)]
    _write_csv(root / "video_features_basic_pure.csv", VIDEO_COLUMNS, videos)
    logs = {"standard": [[], []], "random": [[]]}
    for log, day, ms, video, click, like, hate, play, dur in KUAIRAND_HAND:
        part = 0 if (log == "random" or day == 0) else 1
        logs[log][part].append(_log_row(100, video, day, ms, click, like, hate, play, dur, int(log == "random")))
    for log, n in (("standard", 300), ("random", 60)):
        for _ in range(n):
            day = int(rng.integers(0, 3))
            user, video = int(rng.choice(USERS[1:])), int(rng.choice(VIDEOS))
            ms = int(rng.integers(10_000, DAY_MS))
            dur = 1000 * (10 + VIDEOS.index(video))
            click = int(rng.random() < 0.5)
            play = int(rng.uniform(0.05, 1.0) * dur) if click else int(rng.integers(0, 2000))
            like = int(click and rng.random() < 0.15)
            hate = int(click and not like and rng.random() < 0.05)
            part = 0 if (log == "random" or day == 0) else 1
            logs[log][part].append(_log_row(user, video, day, ms, click, like, hate, play, dur, int(log == "random")))
    _write_csv(root / "log_standard_4_08_to_4_21_pure.csv", LOG_COLUMNS, logs["standard"][0])
    _write_csv(root / "log_standard_4_22_to_5_08_pure.csv", LOG_COLUMNS, logs["standard"][1])
    _write_csv(root / "log_random_4_22_to_5_08_pure.csv", LOG_COLUMNS, logs["random"][0])
    return root


# Yahoo! R3 triplets: 15 users (raw ids 1..15), 30 songs (raw ids 1..30); user 1's ratings are hand-placed
YAHOO_TRAIN_HAND = [(1, 3, 5), (1, 7, 2), (1, 12, 4), (1, 20, 1)]
YAHOO_TEST_HAND = [(1, 5, 4), (1, 9, 3)]
TRIPLETS_TRAIN, TRIPLETS_TEST = "ydata-ymusic-rating-study-v1_0_train.txt", "ydata-ymusic-rating-study-v1_0_test.txt"


def write_triplets(root: Path, seed: int = 0) -> Path:
    """root/ydata-ymusic-rating-study-v1_0_{train,test}.txt: `user<TAB>item<TAB>rating` lines as Yahoo! R3 ships
    them; users 2..15 rate 12 songs (popular first, high ratings more likely) and 5 random songs in the test."""
    rng = np.random.default_rng(seed)
    train, test = list(YAHOO_TRAIN_HAND), list(YAHOO_TEST_HAND)
    popularity = 1.0 / np.arange(1, 31) ** 0.7
    for u in range(2, 16):
        for i in rng.choice(30, 12, replace=False, p=popularity / popularity.sum()):
            train.append((u, int(i) + 1, int(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.1, 0.2, 0.3, 0.3]))))
        for i in rng.choice(30, 5, replace=False):
            test.append((u, int(i) + 1, int(rng.choice([1, 2, 3, 4, 5], p=[0.3, 0.25, 0.2, 0.15, 0.1]))))
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in ((TRIPLETS_TRAIN, train), (TRIPLETS_TEST, test)):
        (root / name).write_text("".join(f"{u}\t{i}\t{r}\n" for u, i, r in rows))
    return root


COAT_USERS, COAT_ITEMS = 12, 16
COAT_USER_BLOCKS, COAT_ITEM_BLOCKS = (2, 6, 3, 3), (2, 16, 13, 2)  # Coat's one-hot blocks (gender, age, ...)


def _one_hot(rng, n, blocks):
    rows = []
    for _ in range(n):
        row = []
        for size in blocks:
            block = [0] * size
            block[int(rng.integers(0, size))] = 1
            row += block
        rows.append(row)
    return rows


def write_coat(root: Path, seed: int = 0) -> Path:
    """root/{train,test}.ascii (12 x 16 ratings, 0 = unrated) and root/user_item_features/{user,item}_features.ascii
    (one-hot rows in Coat's blocks); user 0 rates items 1 (5) and 4 (2) in train and item 2 (4) in test."""
    rng = np.random.default_rng(seed)
    train = np.zeros((COAT_USERS, COAT_ITEMS), int)
    test = np.zeros((COAT_USERS, COAT_ITEMS), int)
    train[0, 1], train[0, 4], test[0, 2] = 5, 2, 4
    for u in range(1, COAT_USERS):
        train[u, rng.choice(COAT_ITEMS, 6, replace=False)] = rng.integers(1, 6, 6)
        test[u, rng.choice(COAT_ITEMS, 4, replace=False)] = rng.integers(1, 6, 4)
    features = root / "user_item_features"
    features.mkdir(parents=True, exist_ok=True)
    for path, matrix in ((root / "train.ascii", train), (root / "test.ascii", test),
                         (features / "user_features.ascii", _one_hot(rng, COAT_USERS, COAT_USER_BLOCKS)),
                         (features / "item_features.ascii", _one_hot(rng, COAT_ITEMS, COAT_ITEM_BLOCKS))):
        path.write_text("".join(" ".join(str(v) for v in row) + "\n" for row in np.asarray(matrix)))
    return root
