"""Popularity blend for short histories: the one definition both layers score with.

A user with two events has a poorly determined vector; popularity is then the better bet,
and on sparse logs it is the best baseline there is. The served score mixes the two,
weighted by how little the model knows about the user:

    score(u, i) = x_u . y_i + w(n_u) * prior_i,   w(n) = beta * n0 / (n0 + n)

where n_u is the number of distinct items in the user's history and prior_i the item's
popularity scaled to [0, 1]. beta and n0 are chosen on the validation split (beta = 0:
plain ALS). Because the mix is an inner product in one extra dimension,
[x_u, w(n_u)] . [y_i, prior_i], the FAISS index serves it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BlendParams:
    beta: float = 0.0
    n0: float = 10.0

    def __post_init__(self) -> None:
        if not (self.beta >= 0 and np.isfinite(self.beta)):
            raise ValueError(f"blend beta must be finite and >= 0, got {self.beta}")
        if not self.n0 > 0:
            raise ValueError(f"blend n0 must be > 0, got {self.n0}")

    @property
    def active(self) -> bool:
        return self.beta > 0

    def weight(self, n_items: np.ndarray | float) -> np.ndarray:
        """w(n) for history lengths `n` (float64)."""
        n = np.asarray(n_items, dtype=np.float64)
        return self.beta * self.n0 / (self.n0 + n)

    def to_dict(self) -> dict[str, float]:
        return {"beta": float(self.beta), "n0": float(self.n0)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BlendParams:
        if not d:
            return cls()
        return cls(float(d["beta"]), float(d["n0"]))


def popularity_prior(item_popularity: np.ndarray) -> np.ndarray:
    """Item popularity scaled so the most popular item is 1 (float32)."""
    p = np.asarray(item_popularity, dtype=np.float64)
    top = float(p.max()) if p.size else 0.0
    return (p / top if top > 0 else np.zeros_like(p)).astype(np.float32)


def index_vectors(item_factors: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """[y_i, prior_i] rows: what the item index holds when the blend is active."""
    y = np.asarray(item_factors, dtype=np.float32)
    return np.ascontiguousarray(np.hstack([y, np.asarray(prior, np.float32).reshape(-1, 1)]))


def query_vector(user_vector: np.ndarray, n_items: int, blend: BlendParams) -> np.ndarray:
    """[x_u, w(n_u)]: the query matching `index_vectors`."""
    x = np.asarray(user_vector, dtype=np.float32).reshape(-1)
    return np.append(x, np.float32(blend.weight(n_items))).astype(np.float32)


def blended_scores(user_factors: np.ndarray, item_factors: np.ndarray, n_items: np.ndarray,
                   prior: np.ndarray, blend: BlendParams) -> np.ndarray:
    """Dense (b x items) blended scores for a batch of users (the evaluation's scorer)."""
    s = np.asarray(user_factors, np.float32) @ np.asarray(item_factors, np.float32).T
    if blend.active:
        s += blend.weight(n_items).astype(np.float32)[:, None] * prior[None, :]
    return s
