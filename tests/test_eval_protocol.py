"""Leave-one-out protocol: exclusive, distinct, deterministic and uniform negatives; last clicks."""
import numpy as np
import pytest
import torch

from satrank.models.metrics.protocol import build_loo_candidates, interactions_by_user, last_clicks


def _world(seed=0, n_items=500, n_users=60):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 200, n_users)
    sizes[:3] = (390, 395, 400 - 1)                   # < 25% of items free: the enumeration path
    inter = {int(u) * 7 + 3: rng.choice(n_items, size=int(k), replace=False) for u, k in enumerate(sizes)}
    last = {u: int(items[-1]) for u, items in inter.items()}
    return last, inter


def test_negatives_are_never_interacted_and_distinct_with_ground_truth_first():
    last, inter = _world()
    users, items = build_loo_candidates(last, inter, n_items=500, n_neg=99, seed=1)
    assert items.shape == (60, 100) and users.tolist() == sorted(last)
    for u, row in zip(users.tolist(), items):
        assert row[0] == last[u]
        neg = set(row[1:].tolist())
        assert len(neg) == 99                          # distinct
        assert not neg & set(inter[u].tolist())        # never interacted (incl. the ground truth)
        assert min(neg) >= 0 and max(neg) < 500


def test_ground_truth_is_excluded_even_when_not_listed_as_interacted():
    users, items = build_loo_candidates({5: 0}, {5: []}, n_items=100, n_neg=99, seed=0)
    assert sorted(items[0, 1:].tolist()) == list(range(1, 100))   # all 99 other items, 0 never


def test_same_seed_same_lists_other_seed_other_lists():
    last, inter = _world()
    a = build_loo_candidates(last, inter, 500, seed=7)[1]
    b = build_loo_candidates(last, inter, 500, seed=7)[1]
    c = build_loo_candidates(last, inter, 500, seed=8)[1]
    assert (a == b).all()
    assert (a[:, 1:] != c[:, 1:]).mean() > 0.9


def test_a_users_list_does_not_depend_on_the_other_users_in_the_call():
    last, inter = _world()
    users, items = build_loo_candidates(last, inter, 500, seed=3)
    some = {u: last[u] for u in list(last)[::5]}       # a "shard" of the users, dense ones included
    u2, i2 = build_loo_candidates(some, inter, 500, seed=3)
    assert (i2 == items[np.searchsorted(users, u2)]).all()


@pytest.mark.parametrize("n_items,n_interacted", [(200, 100), (1000, 900)])   # rejection / enumeration
def test_negatives_are_uniform_over_the_free_items(n_items, n_interacted):
    n_users, n_neg = 2000, 50
    inter = {u: np.arange(n_interacted) for u in range(n_users)}
    _, items = build_loo_candidates({u: 0 for u in range(n_users)}, inter, n_items, n_neg=n_neg, seed=0)
    counts = np.bincount(items[:, 1:].ravel(), minlength=n_items)
    assert counts[:n_interacted].sum() == 0
    free = counts[n_interacted:]                       # each free item: Binomial(2000, 0.5), sd 22.4
    assert len(free) == 100 and np.abs(free - 1000).max() < 120


def test_impossible_user_is_an_error_naming_the_user():
    inter = {1: np.arange(10), 2: np.arange(450)}      # user 2: 50 free items < 99
    with pytest.raises(ValueError, match=r"cannot sample 99 .*user 2: 50 free of 500"):
        build_loo_candidates({1: 0, 2: 0}, inter, n_items=500)


def test_bad_inputs_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match="interacted: no entry for 1 user"):
        build_loo_candidates({1: 0, 2: 0}, {1: [3]}, n_items=500)
    with pytest.raises(ValueError, match=r"interacted: item id\(s\) outside \[0, 500\) for user\(s\) \[2\]"):
        build_loo_candidates({1: 0, 2: 0}, {1: [3], 2: [500]}, n_items=500)
    with pytest.raises(ValueError, match="last_click: item id"):
        build_loo_candidates({1: -1}, {1: [3]}, n_items=500)
    with pytest.raises(ValueError, match="n_neg"):
        build_loo_candidates({1: 0}, {1: [3]}, n_items=500, n_neg=0)


def test_last_clicks_takes_latest_click_and_breaks_time_ties_by_largest_item():
    #        user item  ts  click
    rows = [(1, 10, 100, 1), (1, 11, 200, 1), (1, 12, 300, 0),    # user 1: latest click is item 11
            (2, 20, 50, 1), (2, 25, 50, 1), (2, 21, 50, 1),       # user 2: tie at ts 50 -> item 25
            (3, 30, 10, 0)]                                       # user 3: no click -> absent
    u, i, t, c = (np.array(col) for col in zip(*rows))
    assert last_clicks(u, i, t, c) == {1: 11, 2: 25}
    perm = np.random.default_rng(0).permutation(len(rows))
    assert last_clicks(torch.tensor(u[perm]), i[perm], t[perm], c[perm]) == {1: 11, 2: 25}
    with pytest.raises(ValueError, match="clicks: must be 0/1"):
        last_clicks(u, i, t, c * 2)
    with pytest.raises(ValueError, match="length mismatch"):
        last_clicks(u, i[:-1], t, c)


def test_interactions_by_user_are_sorted_unique_and_masked():
    out = interactions_by_user([2, 1, 2, 2, 1], [9, 4, 3, 9, 5], mask=[1, 1, 1, 1, 0])
    assert {k: v.tolist() for k, v in out.items()} == {1: [4], 2: [3, 9]}
