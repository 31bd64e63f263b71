"""Tests for the simulated short-video world (pipeline/sim/simulate.py, pipeline/sim/world.py)."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq
import pytest

from satrank.pipeline.config import ConfigError, from_dict, load_yaml, to_dict
from satrank.pipeline.sim.world import HistoryBuffers, build_world, feed_back, true_probs
from satrank.pipeline.sim.simulate import (CANDIDATE_SCHEMA, IMPRESSION_SCHEMA, ITEM_SCHEMA, SimulateConfig, main,
                                           simulate)

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(users=300, items=400, impressions=30000, topics=8, authors=50, shard_rows=4000,
             row_group_rows=1000, candidate_requests=50, candidates_per_request=20)
L_STR = pa.list_(pa.int64())


def small(**kw) -> SimulateConfig:
    return SimulateConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "w"
    # answer_bias one nat above the default: enough dissatisfied answers in 30k rows to wrap that ring buffer
    res = simulate(out, small(seed=3, answer_bias=-5.5))
    return out, res


def read_split(out: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / split).glob("part-*.parquet"))])


def read_log(out: Path) -> pa.Table:
    return pa.concat_tables([read_split(out, s) for s in ("train", "valid", "test")])


def file_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    cfg = small(impressions=8000)
    simulate(tmp_path / "a", cfg)
    simulate(tmp_path / "b", cfg)
    simulate(tmp_path / "c", dataclasses.replace(cfg, seed=1))
    a, b, c = (file_bytes(tmp_path / d) for d in "abc")
    assert len(a) >= 5 and a == b
    assert (tmp_path / "a/world.json").read_bytes() == (tmp_path / "b/world.json").read_bytes()
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_schema_is_exactly_canonical(world_dir):
    out, _ = world_dir
    expected = [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                ("request_id", pa.int64()), ("author_id", pa.int64()), ("category_id", pa.int64()),
                ("user_activity", pa.int64()), ("hist_click", L_STR), ("hist_satisfied", L_STR),
                ("hist_dissatisfied", L_STR), ("hist_skip", L_STR), ("duration_s", pa.float32()),
                ("click", pa.int8()), ("watch_time_s", pa.float32()), ("skip", pa.int8()),
                ("questionnaire_answered", pa.int8()), ("satisfied", pa.int8()),
                ("true_p_click", pa.float32()), ("true_p_satisfied", pa.float32()), ("true_p_answered", pa.float32())]
    for split in ("train", "valid", "test"):
        for p in (out / split).glob("part-*.parquet"):
            s = pq.read_schema(p)
            assert [(f.name, f.type) for f in s] == expected, p
    cand = ["request_id", "user_id", "item_id", "timestamp", "author_id", "category_id", "user_activity",
            "hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip", "duration_s",
            "true_p_click", "true_p_satisfied", "true_p_answered"]
    s = pq.read_schema(next((out / "candidates").glob("part-*.parquet")))
    assert s.names == cand and s.equals(CANDIDATE_SCHEMA) and IMPRESSION_SCHEMA.names == [n for n, _ in expected]


def test_items_table_has_one_row_per_item_and_matches_every_impression_and_candidate_row(world_dir):
    out, res = world_dir
    assert res["items"] == {"rows": SMALL["items"], "path": "items/part-00000.parquet"}
    assert json.loads((out / "world.json").read_text())["items"] == res["items"]
    assert sorted(p.name for p in (out / "items").iterdir()) == ["part-00000.parquet"]  # no temp file left
    items = pq.read_table(out / res["items"]["path"])
    assert items.schema.equals(ITEM_SCHEMA)
    assert pq.ParquetFile(out / res["items"]["path"]).metadata.row_group(0).column(0).compression == "ZSTD"
    ids = items.column("item_id").to_numpy()
    assert np.array_equal(ids, np.arange(SMALL["items"]))  # exactly one row per item id, in id order
    for rows in (read_log(out), read_split(out, "candidates")):
        i = rows.column("item_id").to_numpy()
        for col in ("author_id", "category_id", "duration_s"):  # bit-equal, duration_s float32 included
            assert np.array_equal(rows.column(col).to_numpy(), items.column(col).to_numpy()[i]), col
    # the same table whatever the log: it is the world's, rebuilt from the seed
    world = build_world(small(seed=3))
    assert np.array_equal(items.column("author_id").to_numpy(), world.item_author)
    assert np.array_equal(items.column("duration_s").to_numpy(), world.duration.astype(np.float32))


def test_labels_are_consistent_and_truth_is_calibrated(world_dir):
    out, res = world_dir
    t = read_log(out).to_pydict()
    ans = np.array(t["questionnaire_answered"])
    sat = t["satisfied"]
    assert all((s is None) == (a == 0) for s, a in zip(sat, ans))
    watch, dur = np.array(t["watch_time_s"]), np.array(t["duration_s"])
    skip, click = np.array(t["skip"]), np.array(t["click"])
    thr = SimulateConfig().skip_threshold_s
    assert np.array_equal(skip, (watch < thr).astype(np.int8)) and (watch >= 0).all()
    assert (watch <= dur + 1e-4).all()
    assert np.median(watch[click == 1]) > 3 * np.median(watch[click == 0])
    # true_p_* are the probabilities the labels were drawn from
    for label, truth, tol in (("click", "true_p_click", 0.01), ("questionnaire_answered", "true_p_answered", 0.003)):
        assert abs(np.mean(t[label]) - np.mean(t[truth])) < tol
    pc = np.array(t["true_p_click"])
    for lo, hi in ((0.0, 0.2), (0.4, 0.6), (0.8, 1.0)):
        m = (pc >= lo) & (pc < hi)
        assert abs(click[m].mean() - pc[m].mean()) < 0.03


def test_answer_rate_is_sparse_between_1_and_5_percent(world_dir):
    out, res = world_dir
    rate = float(np.mean(read_log(out).column("questionnaire_answered").to_numpy()))
    assert 0.01 <= rate <= 0.05
    assert rate == pytest.approx(res["stats"]["answer_rate"])


def test_clicked_but_dissatisfied_is_at_least_a_quarter_of_clicks(world_dir):
    out, res = world_dir
    assert res["stats"]["clicked_dissatisfied_share"] >= 0.25  # realised latent satisfaction
    t = read_log(out)
    pc, ps = t.column("true_p_click").to_numpy(), t.column("true_p_satisfied").to_numpy()
    assert (pc * (1 - ps)).sum() / pc.sum() >= 0.25


def test_attractiveness_moves_click_probability_but_not_satisfaction():
    cfg = small()
    world = build_world(cfg)
    users, items = np.arange(cfg.users).repeat(3), np.tile(np.arange(3), cfg.users)
    pc0, ps0, _, _ = true_probs(world, cfg, users, items)
    world.attractiveness[:3] += 2.0
    pc1, ps1, _, _ = true_probs(world, cfg, users, items)
    assert (pc1 > pc0).all() and np.array_equal(ps1, ps0)
    world.quality[:3] += 2.0
    pc2, ps2, _, _ = true_probs(world, cfg, users, items)
    assert np.array_equal(pc2, pc1) and (ps2 > ps1).all()


def test_attractiveness_correlates_with_logged_click_truth_not_satisfaction_truth(world_dir):
    out, _ = world_dir
    world = build_world(small(seed=3))  # the world is rebuilt exactly from the seed
    t = read_log(out)
    attr = world.attractiveness[t.column("item_id").to_numpy()]
    assert np.corrcoef(attr, t.column("true_p_click").to_numpy())[0, 1] > 0.4
    assert abs(np.corrcoef(attr, t.column("true_p_satisfied").to_numpy())[0, 1]) < 0.05
    assert np.allclose(world.duration[t.column("item_id").to_numpy()], t.column("duration_s").to_numpy(), rtol=1e-6)


def test_answering_follows_long_views_and_biases_observed_satisfaction(world_dir, tmp_path):
    _, res = world_dir
    st = res["stats"]
    assert st["answer_rate_given_satisfied"] > 1.2 * st["answer_rate_given_dissatisfied"]

    def gap(cfg, out):
        simulate(out, cfg)
        t = read_log(out)
        t = t.filter(pac.equal(t.column("questionnaire_answered"), 1))
        return np.mean(t.column("satisfied").to_numpy()) - np.mean(t.column("true_p_satisfied").to_numpy()), t.num_rows

    # Visible from the files alone: answered rows are more satisfied than their true probability says, when
    # answering depends on the realised label (MNAR)...
    g, n = gap(small(seed=5, answer_bias=-3.0, answer_w_satisfied=1.0, answer_w_watch=0.0), tmp_path / "mnar")
    assert n > 2000 and g > 0.08
    # ...or on the share of the video watched (observed, and longer for satisfied views: the default)...
    gw, nw = gap(small(seed=5, answer_bias=-4.5, answer_w_satisfied=0.0, answer_w_watch=3.0), tmp_path / "watch")
    assert nw > 2000 and gw > 0.08
    # ...and the gap vanishes when answering ignores both (missing at random given user and item).
    g0, n0 = gap(small(seed=5, answer_bias=-3.0, answer_w_satisfied=0.0, answer_w_watch=0.0), tmp_path / "mar")
    assert n0 > 2000 and abs(g0) < 0.03


def test_long_views_answer_more_often_than_short_ones(tmp_path):
    """The default answer mechanism (answer_w_watch): the questionnaire shows in the player, so the share of the
    video watched (logged, unlike satisfaction) drives answering; rho(u, i, behaviour) can see it (docs/stage1.md)."""
    out = tmp_path / "w"
    simulate(out, small(seed=7, impressions=60000, answer_bias=-4.0, answer_w_satisfied=0.0, answer_w_watch=3.0))
    t = read_log(out)
    world = build_world(small(seed=7, answer_bias=-4.0))
    click = t.column("click").to_numpy() == 1
    frac = t.column("watch_time_s").to_numpy() / world.duration[t.column("item_id").to_numpy()]
    ans = t.column("questionnaire_answered").to_numpy() == 1
    long_view, short_view = click & (frac > 0.6), click & (frac < 0.3)
    # long views answer more often than short ones: e^(3 * ~0.5) ~ 4x in odds
    assert ans[long_view].mean() > 2.5 * ans[short_view].mean()
def test_active_users_are_more_satisfied_only_through_sat_w_activity(world_dir, tmp_path):
    def by_bucket(out):
        t = read_log(out)
        act, ps = t.column("user_activity").to_numpy(), t.column("true_p_satisfied").to_numpy()
        return [ps[act == a].mean() for a in range(5)]

    out, _ = world_dir
    m = by_bucket(out)
    assert all(b > a for a, b in zip(m, m[1:])) and m[4] - m[0] > 0.1, m
    simulate(tmp_path / "flat", small(seed=3, answer_bias=-5.5, sat_w_activity=0.0))
    m0 = by_bucket(tmp_path / "flat")
    assert max(m0) - min(m0) < 0.05, m0


def test_activity_drives_appearances_and_answering(world_dir):
    out, res = world_dir
    t = read_log(out)
    act, ans = t.column("user_activity").to_numpy(), t.column("questionnaire_answered").to_numpy()
    rate = [ans[act == k].mean() for k in range(5)]
    assert rate[4] > 2 * rate[0] and rate[3] > rate[1]
    per_user = res["stats"]["impressions_per_user_by_activity"]
    assert all(a < b for a, b in zip(per_user, per_user[1:]))
    assert set(np.unique(act)) <= set(range(5))


def test_history_ring_buffer_keeps_last_ids_oldest_first():
    h = HistoryBuffers(3, {"hist_click": 5})
    for v in range(1, 8):
        h.push("hist_click", np.array([0]), np.array([v]))
    h.push("hist_click", np.array([2, 0]), np.array([42, 8]))
    offsets, values = h.snapshot("hist_click", np.array([0, 1, 2, 0]))
    assert offsets.tolist() == [0, 5, 5, 6, 11]
    assert values.tolist() == [4, 5, 6, 7, 8, 42, 4, 5, 6, 7, 8]


def test_histories_are_causal_by_replaying_the_log(world_dir):
    out, _ = world_dir
    rows = read_log(out).to_pylist()
    assert [r["request_id"] for r in rows] == list(range(len(rows)))
    events = defaultdict(lambda: defaultdict(list))  # user -> history -> [(ts, item)]
    caps = {"hist_click": 50, "hist_satisfied": 20, "hist_dissatisfied": 5, "hist_skip": 20}
    checked = 0
    for r in rows:
        ev = events[r["user_id"]]
        for name, cap in caps.items():
            past = ev[name]
            assert len(r[name]) <= cap
            assert r[name] == [i for _, i in past[-cap:]], (r["request_id"], name)
            assert all(ts < r["timestamp"] for ts, _ in past[-cap:])
            checked += len(r[name])
        if r["click"]:
            ev["hist_click"].append((r["timestamp"], r["item_id"]))
        if r["questionnaire_answered"]:
            ev["hist_satisfied" if r["satisfied"] else "hist_dissatisfied"].append((r["timestamp"], r["item_id"]))
        if r["skip"]:
            ev["hist_skip"].append((r["timestamp"], r["item_id"]))
    assert checked > 100000
    assert max(len(r["hist_click"]) for r in rows) == 50 and max(len(r["hist_dissatisfied"]) for r in rows) == 5
    for r in read_split(out, "candidates").to_pylist()[::7]:  # candidates carry the final histories
        for name, cap in caps.items():
            assert r[name] == [i for _, i in events[r["user_id"]][name][-cap:]]


def test_splits_are_time_ordered_contiguous_shards(world_dir):
    out, res = world_dir
    cfg = small()
    prev_max, sizes = None, []
    for split in ("train", "valid", "test"):
        parts = sorted((out / split).glob("part-*.parquet"))
        sizes.append(sum(pq.ParquetFile(p).metadata.num_rows for p in parts))
        for p in parts:
            md = pq.ParquetFile(p).metadata
            assert md.num_rows <= cfg.shard_rows
            assert all(md.row_group(i).num_rows <= cfg.row_group_rows for i in range(md.num_row_groups))
            ts = pq.read_table(p, columns=["timestamp"]).column("timestamp").to_numpy()
            assert (np.diff(ts) >= 0).all()
            if prev_max is not None:
                assert prev_max <= ts.min()
            prev_max = ts.max()
        assert len(parts) == -(-sizes[-1] // cfg.shard_rows)
    assert sizes == [24000, 3000, 3000] and [res["splits"][s]["rows"] for s in ("train", "valid", "test")] == sizes
    assert not list(out.rglob("*.tmp"))
    meta = json.loads((out / "world.json").read_text())
    assert meta["sizes"]["impressions"] == 30000 and meta["config"]["seed"] == 3


def test_candidates_have_unique_requests_with_configured_count_after_the_log(world_dir):
    out, res = world_dir
    c = read_split(out, "candidates").to_pydict()
    per_req = defaultdict(list)
    for rid, item in zip(c["request_id"], c["item_id"]):
        per_req[rid].append(item)
    assert len(per_req) == 50 and all(len(v) == 20 == len(set(v)) for v in per_req.values())
    users = {}
    for rid, u in zip(c["request_id"], c["user_id"]):
        assert users.setdefault(rid, u) == u
    assert len(set(users.values())) == 50  # one request per sampled user
    assert min(per_req) >= 30000  # disjoint from impression request ids
    assert min(c["timestamp"]) > res["splits"]["test"]["max_ts"]
    assert all(0.0 <= p <= 1.0 for p in c["true_p_satisfied"])


def test_yaml_section_matches_dataclass_defaults():
    raw = load_yaml(REPO / "configs" / "sim.yaml")
    assert to_dict(from_dict(SimulateConfig, raw["simulate"], "simulate")) == to_dict(SimulateConfig())


# ------------------------------------------------------------------------------ the alternative world
ALT_KEYS = {"sat_w_attractiveness": -0.5, "answer_w_watch": -4.0, "answer_w_click": 2.0, "answer_bias": -5.0,
            "popularity_quality_corr": 0.0, "personalization": 0.8}


def alt_small(**kw) -> SimulateConfig:
    raw = load_yaml(REPO / "configs" / "sim_alt.yaml")["simulate"]
    return from_dict(SimulateConfig, {**raw, **SMALL, **kw}, "simulate")


def test_alt_yaml_differs_from_the_default_only_in_its_documented_simulate_keys():
    raw, alt = load_yaml(REPO / "configs" / "sim.yaml"), load_yaml(REPO / "configs" / "sim_alt.yaml")
    assert {k: v for k, v in raw.items() if k != "simulate"} == {k: v for k, v in alt.items() if k != "simulate"}
    default, other = to_dict(SimulateConfig()), to_dict(from_dict(SimulateConfig, alt["simulate"], "simulate"))
    assert {k: other[k] for k in other if other[k] != default[k]} == ALT_KEYS


def test_sat_w_attractiveness_lowers_satisfaction_only_when_set():
    for w, moves in ((0.0, False), (-0.5, True)):
        cfg = small(sat_w_attractiveness=w)
        world = build_world(cfg)
        users, items = np.arange(cfg.users).repeat(3), np.tile(np.arange(3), cfg.users)
        pc0, ps0, _, _ = true_probs(world, cfg, users, items)
        world.attractiveness[:3] += 2.0
        pc1, ps1, _, _ = true_probs(world, cfg, users, items)
        assert (pc1 > pc0).all()  # click-bait moves clicks in both worlds
        assert (ps1 < ps0).all() if moves else np.array_equal(ps1, ps0)


def test_sat_taste_own_gives_satisfaction_its_own_topic_affinity_and_leaves_everything_else_bit_identical():
    shared_cfg, own_cfg = small(), small(sat_taste="own")
    shared, own = build_world(shared_cfg), build_world(own_cfg)
    assert shared.sat_affinity is shared.affinity  # the default world reads the click affinity itself
    for f in dataclasses.fields(shared):
        if f.name != "sat_affinity":
            assert np.array_equal(getattr(shared, f.name), getattr(own, f.name)), f.name
    assert np.array_equal(own.sat_affinity, build_world(small(sat_taste="own")).sat_affinity)  # seeded
    # an independent draw: per user, the two tastes' topic affinities are uncorrelated on average
    corr = np.mean([np.corrcoef(own.affinity[u], own.sat_affinity[u])[0, 1] for u in range(own_cfg.users)])
    assert abs(corr) < 0.1, corr
    users, items = np.arange(own_cfg.users).repeat(3), np.tile(np.arange(3), own_cfg.users)
    pc_s, ps_s, _, _ = true_probs(shared, shared_cfg, users, items)
    pc_o, ps_o, _, _ = true_probs(own, own_cfg, users, items)
    assert np.array_equal(pc_s, pc_o) and not np.allclose(ps_s, ps_o)  # clicks unchanged, satisfaction moved
    with pytest.raises(ConfigError, match=r"simulate\.sat_taste: must be 'shared' or 'own', got 'mine'"):
        small(sat_taste="mine").validate()


def _monte_carlo_answer_rate(cfg: SimulateConfig, world, user: int, item: int, n: int, rng) -> float:
    """P(answered) of one (user, item) by drawing click, satisfaction and watch time as docs/simulator.md says."""
    u, i = np.array([user]), np.array([item])
    pc, ps, _, base = true_probs(world, cfg, u, i)
    click, sat = rng.random(n) < pc[0], rng.random(n) < ps[0]
    d = world.duration[item]
    f = np.where(click, np.where(sat, rng.beta(*cfg.watch_beta_satisfied, n), rng.beta(*cfg.watch_beta_dissatisfied, n)),
                 np.minimum(rng.exponential(cfg.scroll_mean_s, n), d) / d)
    logit = base[0] + cfg.answer_w_click * click + cfg.answer_w_satisfied * sat + cfg.answer_w_watch * f
    return float((1.0 / (1.0 + np.exp(-logit))).mean())


@pytest.mark.parametrize("w_watch", [3.0, -4.0])
def test_true_p_answered_is_the_marginal_for_either_sign_of_answer_w_watch(w_watch):
    """The quadrature over the watched share (world._mean_answer_prob) against plain Monte Carlo of the story."""
    cfg = alt_small(answer_w_watch=w_watch, answer_bias=-1.0, answer_w_satisfied=0.7)  # rates ~0.3: tight MC
    world = build_world(cfg)
    rng = np.random.default_rng(0)
    for user, item in ((0, 0), (5, 17), (42, 3), (123, 250)):
        _, _, pa_, _ = true_probs(world, cfg, np.array([user]), np.array([item]))
        mc = _monte_carlo_answer_rate(cfg, world, user, item, 400_000, rng)
        assert abs(pa_[0] - mc) < 0.003, (w_watch, user, item, pa_[0], mc)  # MC s.e. < 0.001


def test_alt_world_keeps_the_premise_with_answers_driven_by_short_views(tmp_path):
    out = tmp_path / "alt"
    res = simulate(out, alt_small(seed=2, impressions=60000))
    st, t = res["stats"], read_log(out)
    # answers sparse and their marginal exact; click-bait moves clicks and (here) lowers satisfaction
    assert 0.01 <= st["answer_rate"] <= 0.03, st["answer_rate"]
    assert abs(st["answer_rate"] - st["mean_true_p_answered"]) < 0.002
    world = build_world(alt_small(seed=2))
    attr = world.attractiveness[t.column("item_id").to_numpy()]
    assert np.corrcoef(attr, t.column("true_p_click").to_numpy())[0, 1] > 0.4
    assert np.corrcoef(attr, t.column("true_p_satisfied").to_numpy())[0, 1] < -0.1
    # missing not at random, the other way round: dissatisfied impressions answer more, so answered rows
    # look LESS satisfied than their true probability says
    assert st["answer_rate_given_dissatisfied"] > 1.5 * st["answer_rate_given_satisfied"]
    assert st["observed_satisfied_rate_answered"] < st["mean_true_p_satisfied_answered"] - 0.08
    click = t.column("click").to_numpy() == 1
    frac = t.column("watch_time_s").to_numpy() / world.duration[t.column("item_id").to_numpy()]
    ans = t.column("questionnaire_answered").to_numpy() == 1
    assert ans[click & (frac < 0.3)].mean() > 2.5 * ans[click & (frac > 0.6)].mean()


def test_a_non_finite_weight_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="simulate.sat_w_attractiveness: must be finite"):
        small(sat_w_attractiveness=float("nan")).validate()


def test_cli_refuses_users_and_items_above_vocab_and_non_positive_numbers(tmp_path, capsys):
    base = ["--out", str(tmp_path / "x"), "--impressions", "100"]
    assert main(base + ["--users", "20001"]) == 2
    err = capsys.readouterr().err
    assert "--users" in err and "vocab_size 20000" in err
    assert main(base + ["--items", "50001"]) == 2
    assert "--items" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--impressions", "0"]) == 2
    assert "--impressions must be > 0" in capsys.readouterr().err
    assert main(base + ["--users", "-3"]) == 2 and "--users" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_world_with_flags_and_set_overrides(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--users", "25000", "--items", "200", "--impressions", "3000", "--seed", "9",
            "--set", "data.sparse.user_id.vocab_size=30000", "--set", "simulate.candidate_requests=10", "--quiet"]
    assert main(args) == 0
    meta = json.loads((out / "world.json").read_text())
    assert meta["sizes"]["users"] == 25000 and meta["seed"] == 9 and meta["candidates"]["rows"] == 1000
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # never mixes two runs' shards
    with pytest.raises(ConfigError, match="simulate.topics"):
        simulate(tmp_path / "bad", small(topics=0))


def test_sat_feedback_moves_the_users_later_click_logit_for_the_topic_by_its_satisfaction_exactly():
    """sat_feedback > 0: a clicked view moves the user's click offset for the item's topic by +w (satisfied) or -w
    (not), clipped to +-cap; unclicked views move nothing; satisfaction itself is untouched. 0 = stationary."""
    assert build_world(small()).click_drift is None
    cfg = small(sat_feedback=0.5, sat_feedback_cap=0.8)
    world = build_world(cfg)
    items = np.array([0, 1, 2])
    users = np.array([0, 1, 2])
    t = world.item_topic[items]
    pc0, ps0, _, _ = true_probs(world, cfg, users, items)
    click, sat = np.array([True, True, False]), np.array([True, False, True])
    feed_back(world, cfg, users, items, click, sat)
    assert world.click_drift[users, t].tolist() == [0.5, -0.5, 0.0]
    assert np.count_nonzero(world.click_drift) == 2
    feed_back(world, cfg, users, items, click, sat)
    assert world.click_drift[users, t].tolist() == [0.8, -0.8, 0.0]  # clipped at the cap
    pc1, ps1, _, _ = true_probs(world, cfg, users, items)
    logit = lambda p: np.log(p / (1 - p))
    assert np.allclose(logit(pc1) - logit(pc0), [0.8, -0.8, 0.0])
    assert np.array_equal(ps1, ps0)
    with pytest.raises(ConfigError, match=r"simulate\.sat_feedback: must be >= 0"):
        small(sat_feedback=-0.1).validate()


def test_a_feedback_world_keeps_the_premise_and_the_stationary_world_is_bit_identical(tmp_path):
    """The default (sat_feedback 0) writes the same bytes as before the option existed (feed_back is a no-op), and a
    feedback world still logs sparse answers with clicked-but-dissatisfied views (the premise)."""
    base = simulate(tmp_path / "a", small(seed=5))
    again = simulate(tmp_path / "b", small(seed=5, sat_feedback=0.0))
    fb = simulate(tmp_path / "c", small(seed=5, sat_feedback=0.25))
    for split in ("train", "test", "candidates"):
        a, b = (pq.read_table(d / split).to_pydict() for d in (tmp_path / "a", tmp_path / "b"))
        assert a == b, split
    # the feedback draws no random numbers: the same impressions and candidates, other click probabilities
    for split in ("train", "candidates"):
        a, c = (pq.read_table(d / split) for d in (tmp_path / "a", tmp_path / "c"))
        assert a.column("item_id").equals(c.column("item_id")) and a.column("user_id").equals(c.column("user_id"))
        assert not np.allclose(a.column("true_p_click").to_numpy(), c.column("true_p_click").to_numpy())
        assert np.array_equal(a.column("true_p_satisfied").to_numpy(), c.column("true_p_satisfied").to_numpy())
    assert 0.005 < fb["stats"]["answer_rate"] < 0.05 and fb["stats"]["clicked_dissatisfied_share"] > 0.1
