"""lake.strength: the one definition of event strength, with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from lake.config import InteractionSettings
from lake.strength import StrengthParams, score_batch, user_reference, value_factor

DAY = 86_400.0
P = StrengthParams({"view": 1.0, "purchase": 8.0, "rating": 1.0, "click": 0.0},
                   {"purchase": "log1p", "rating": "linear"}, half_life_days=10.0,
                   max_confidence=10.0)


def test_value_transforms_known_answers():
    v = np.array([np.nan, 0.0, -1.0, 1.0, 3.0])
    assert value_factor("none", v).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert value_factor("linear", v).tolist() == [1.0, 0.0, 0.0, 1.0, 3.0]
    np.testing.assert_allclose(value_factor("log1p", v), [1.0, 0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="unknown value transform"):
        value_factor("sqrt", v)


def test_scores_known_answers():
    types = np.array(["view", "view", "purchase", "purchase", "rating", "click", "play"])
    values = np.array([np.nan, np.nan, 3.0, np.nan, 4.0, np.nan, 1.0])
    ages = np.array([0.0, 10.0, 0.0, 20.0, 20.0, 0.0, 0.0]) * DAY
    ref = np.full(7, 1e9)
    got = P.scores(types, values, ref - ages, ref)
    # view fresh 1; view one half-life 0.5; purchase 8 * log2(1 + 3) = 16; purchase without
    # value two half-lives 8 * 0.25 = 2; rating 4 two half-lives = 1; weight 0 / unknown: 0
    np.testing.assert_allclose(got, [1.0, 0.5, 16.0, 2.0, 1.0, 0.0, 0.0])
    # the same events as codes into a list of names (the event log's form); "rating" is
    # weighted but absent from these names, "play" present but unweighted
    names = np.array(["click", "play", "purchase", "view"])
    codes = np.array([3, 3, 2, 2, 1, 0], dtype=np.uint8)
    got = P.scores(codes, values[[0, 1, 2, 3, 6, 5]], (ref - ages)[:6], ref[:6], names)
    np.testing.assert_allclose(got, [1.0, 0.5, 16.0, 2.0, 0.0, 0.0])
    assert P.cap(np.array([16.0, 3.0])).tolist() == [10.0, 3.0]
    # an event after the reference (clock skew) counts as age 0, never more than fresh
    assert P.scores(np.array(["view"]), np.array([np.nan]), np.array([2e9]), np.array([1e9]))[0] \
        == 1.0
    no_decay = P.with_changes(half_life_days=None)
    assert no_decay.scores(np.array(["view"]), np.array([np.nan]), np.array([0.0]),
                           np.array([1e9]))[0] == 1.0


def test_user_reference_is_each_users_latest_event():
    ref = user_reference(np.array([0, 1, 0, 0]), np.array([5.0, 7.0, 9.0, 1.0]), 3)
    assert ref[:2].tolist() == [9.0, 7.0] and ref[2] == -math.inf


def test_round_trip_and_settings():
    assert StrengthParams.from_dict(P.to_dict()) == P
    s = StrengthParams.from_settings(InteractionSettings())
    assert s.half_life_days == InteractionSettings().half_life_days
    assert set(s.transforms.values()) == {"log1p"}
    with pytest.raises(ValueError, match="half_life_days"):
        StrengthParams({"view": 1.0}, half_life_days=0.0)
    with pytest.raises(ValueError, match="unknown value transform"):
        StrengthParams({"view": 1.0}, {"view": "square"})


def test_score_batch_adds_the_scores_to_arrow():
    ts = pa.array([0, 10 * 1_000_000 * int(DAY)], pa.timestamp("us", tz="UTC"))
    ref = pa.array([10 * 1_000_000 * int(DAY)] * 2, pa.timestamp("us", tz="UTC"))
    b = pa.record_batch({"event_type": ["view", "rating"], "value": [None, 2.0],
                         "ts": ts, "ref_ts": ref})
    out = score_batch(b, P)
    assert out.column("score").to_pylist() == [0.5, 2.0]
