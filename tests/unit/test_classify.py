"""Top-k strings of the V2 classification extension."""

from __future__ import annotations

import numpy as np
import pytest

from service.classify import top_k


def test_top_k_ranks_each_image_and_uses_labels():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]], np.float32).reshape(2, 1, 1, 3)
    assert top_k(scores, 2, ["cat", "dog", "eel"]) == [
        ["0.700000:1:dog", "0.200000:2:eel"],
        ["0.500000:0:cat", "0.500000:1:dog"],  # a tie keeps index order
    ]


def test_top_k_clamps_k_and_labels_by_index_without_labels():
    rows = top_k(np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3), 10)
    assert rows == [[f"{v:f}:{v}:{v}" for v in (5, 4, 3, 2, 1, 0)]]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_scores_are_the_k_largest(seed):
    a = np.random.default_rng(seed).standard_normal((3, 1, 1, 50)).astype(np.float32)
    for row, values in zip(top_k(a, 5), a.reshape(3, -1), strict=True):
        got = [float(s.split(":")[0]) for s in row]
        assert got == pytest.approx(sorted(values, reverse=True)[:5], abs=1e-6)
        assert [values[int(s.split(":")[1])] for s in row] == pytest.approx(got, abs=1e-6)
