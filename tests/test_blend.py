"""lake.blend: the popularity mix as one extra inner-product dimension."""

from __future__ import annotations

import numpy as np
import pytest

from lake.blend import (
    BlendParams,
    blended_scores,
    index_vectors,
    popularity_prior,
    query_vector,
)


def test_weight_known_answers():
    b = BlendParams(beta=0.6, n0=2.0)
    # w(n) = beta * n0 / (n0 + n): 0.6 at n = 0, 0.3 at n = n0, 0.1 at n = 10
    np.testing.assert_allclose(b.weight(np.array([0, 2, 10])), [0.6, 0.3, 0.1])
    assert not BlendParams().active and b.active
    assert BlendParams.from_dict(b.to_dict()) == b and BlendParams.from_dict(None) == BlendParams()
    with pytest.raises(ValueError, match="beta"):
        BlendParams(beta=-1.0)


def test_index_and_query_vectors_give_the_blended_score():
    y = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    prior = popularity_prior(np.array([2.0, 8.0, 4.0]))
    assert prior.tolist() == [0.25, 1.0, 0.5]
    b = BlendParams(beta=1.0, n0=1.0)
    x = np.array([0.9, 0.1], np.float32)
    # a user with one item: w = 0.5; scores = x.y + 0.5 prior = [1.025, 0.6, 0.75]
    via_index = index_vectors(y, prior) @ query_vector(x, 1, b)
    np.testing.assert_allclose(via_index, [1.025, 0.6, 0.75], rtol=1e-6)
    dense = blended_scores(x[None, :], y, np.array([1]), prior, b)
    np.testing.assert_allclose(dense[0], via_index, rtol=1e-6)
    # a long history: the personal score decides (item 0), a short one: popularity (item 1)
    assert np.argmax(blended_scores(x[None, :], y, np.array([1000]), prior, b)) == 0
    assert np.argmax(blended_scores(0.1 * x[None, :], y, np.array([0]), prior, b)) == 1
