"""Connection selection against plain, independent references."""

from __future__ import annotations

import pytest
import torch

from neuroada_plugin import select_connections


def reference_topk(weight: torch.Tensor, k: int, largest: bool = True) -> list[list[int]]:
    """Per-row top-k by |w| in pure Python, ties broken towards the lower input index."""
    rows = []
    for row in weight.abs().float().tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j] if largest else row[j], j))
        rows.append(sorted(order[:k]))
    return rows


CASES = [(shape, k) for shape in [(1, 1), (3, 7), (16, 16), (33, 65), (8, 300)] for k in (1, 2, 5) if k <= shape[1]]


@pytest.mark.parametrize(("shape", "k"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitude_selection_matches_reference(shape, k, dtype):
    out_features, in_features = shape
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(out_features * 131 + k)).to(dtype)
    indices = select_connections(weight, k)
    assert indices.dtype == torch.int64 and indices.shape == (out_features, k)
    assert indices.tolist() == reference_topk(weight, k)


def test_smallest_selection_matches_reference():
    weight = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    assert select_connections(weight, 4, "smallest").tolist() == reference_topk(weight, 4, largest=False)


def test_ties_are_broken_towards_lower_index():
    # bf16 rounds many values to equal magnitudes; +x and -x tie too.
    weight = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    assert select_connections(weight, 2).tolist() == [[1, 2], [0, 1]]
    assert select_connections(weight, 1, "smallest").tolist() == [[0], [0]]


def test_large_weight_is_processed_in_blocks_with_the_same_result(monkeypatch):
    from neuroada_plugin.neuroada import selection

    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    expected = reference_topk(weight, 3)
    monkeypatch.setattr(selection, "_BLOCK_ELEMENTS", 64 * 7)  # 7 rows per block, last block partial
    assert select_connections(weight, 3).tolist() == expected


def test_random_selection_is_seeded_uniform_and_salted():
    weight = torch.zeros(64, 32)
    a = select_connections(weight, 3, "random", seed=1, salt="layers.0.q_proj")
    b = select_connections(weight, 3, "random", seed=1, salt="layers.0.q_proj")
    c = select_connections(weight, 3, "random", seed=1, salt="layers.1.q_proj")
    d = select_connections(weight, 3, "random", seed=2, salt="layers.0.q_proj")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    for row in a.tolist():
        assert row == sorted(set(row)) and len(row) == 3 and row[0] >= 0 and row[-1] < 32
    # every input column gets picked by some row: not a fixed pattern
    assert len(set(a.flatten().tolist())) > 24


def test_selection_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and in_features=4"):
        select_connections(torch.ones(2, 4), 5)
    with pytest.raises(ValueError, match="unknown selection"):
        select_connections(torch.ones(2, 4), 1, "gradient")
