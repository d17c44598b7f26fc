"""The epoch's window order: every window exactly once, seeded, resumable, at any corpus size.

Oracles: the sorted order is range(n) (a bijection); below the exact limit it is numpy's
permutation of (seed, epoch), as the sampler always drew (so small runs are unchanged); above
it the keyed bijection is the same for the same (seed, epoch) however it is drawn (whole, or a
few indices at a time across block edges) and is well spread; the sampler over it visits every
window once per epoch and a resumed sampler continues the uninterrupted one's order.
"""

from __future__ import annotations

import numpy as np
import pytest

from bigbatch.data import window_order
from bigbatch.data.loader import GlobalBatchSampler
from bigbatch.data.window_order import WindowOrder


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4099, 70_001])
def test_the_keyed_order_visits_every_window_once(n):
    order = WindowOrder(n, seed=3, epoch=0, exact_max=0)
    whole = order.take(0, n)
    assert sorted(whole.tolist()) == list(range(n))
    again = WindowOrder(n, 3, 0, exact_max=0)
    drawn = np.concatenate([again.take(i, 7)
                            for i in range(0, n, 7)])  # across block edges (70,001 > 65,536)
    assert drawn.tolist() == whole.tolist()


def test_below_the_limit_the_order_is_numpys_permutation():
    n = 5000
    assert WindowOrder(n, 11, 2).take(0, n).tolist() == \
        np.random.default_rng([11, 2]).permutation(n).tolist()


def test_the_keyed_order_is_seeded_per_epoch_and_spread():
    n = 100_000
    a = WindowOrder(n, 7, 0, exact_max=0).take(0, n)
    assert a.tolist() == WindowOrder(n, 7, 0, exact_max=0).take(0, n).tolist()
    assert a.tolist() != WindowOrder(n, 7, 1, exact_max=0).take(0, n).tolist()
    assert a.tolist() != WindowOrder(n, 8, 0, exact_max=0).take(0, n).tolist()
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # position says nothing of index
    first = a[: n // 10]  # the first tenth of an epoch is spread over the whole corpus
    assert np.histogram(first, bins=10, range=(0, n))[0].min() > 0.8 * len(first) / 10
    assert (np.diff(a) == 1).sum() < n // 1000  # no runs of neighbours


def draw(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    return [sampler.next_global_batch().tolist() for _ in range(steps)]


def test_a_large_corpus_sampler_covers_each_epoch_and_resumes_exactly(monkeypatch):
    monkeypatch.setattr(window_order, "EXACT_ORDER_MAX_WINDOWS", 100)  # 1,003 is "large"
    n, batch = 1003, 20
    sampler = GlobalBatchSampler(n, batch, seed=5)
    assert sampler._order._table is None  # the keyed bijection, no table
    steps_per_epoch = n // batch
    epoch0 = draw(sampler, steps_per_epoch)
    flat = [i for step in epoch0 for i in step]
    assert len(set(flat)) == len(flat) == steps_per_epoch * batch  # each window at most once
    epoch1 = draw(sampler, steps_per_epoch)
    assert sampler.epoch == 1 and epoch1 != epoch0

    uninterrupted = GlobalBatchSampler(n, batch, seed=5)
    expected = draw(uninterrupted, 80)
    first = GlobalBatchSampler(n, batch, seed=5)
    before = draw(first, 33)
    resumed = GlobalBatchSampler(n, batch, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert before + draw(resumed, 47) == expected
