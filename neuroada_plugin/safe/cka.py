"""Linear CKA (centered kernel alignment) between two sets of features of the same examples.

SAFE scores an adapter by how much it changes its layer's output: ``1 - CKA(before, after)``.
Linear CKA is computed from the centred Gram matrices ``K = Xc Xc^T`` (``n x n`` for ``n``
probe tokens), which compares features of different widths and keeps the score's memory
independent of the layer width; everything is accumulated in float64.
"""

from __future__ import annotations

import torch

__all__ = ["centered_gram", "cka_from_grams", "linear_cka"]


def centered_gram(features: torch.Tensor) -> torch.Tensor:
    """``Xc @ Xc.T`` in float64 for ``features`` of shape ``[n, d]``, each column centred over the ``n`` rows."""
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """Linear CKA ``<Kx, Ky>_F / (||Kx||_F ||Ky||_F)`` of two centred Gram matrices, in [0, 1].

    Two constant (zero-variance) feature sets are identical for this purpose: CKA 1. One
    constant and one varying set share nothing: CKA 0.
    """
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"Gram matrices of different sizes: {tuple(gram_x.shape)} vs {tuple(gram_y.shape)}")
    norm_x = torch.linalg.matrix_norm(gram_x)
    norm_y = torch.linalg.matrix_norm(gram_y)
    if norm_x == 0 and norm_y == 0:
        return 1.0
    if norm_x == 0 or norm_y == 0:
        return 0.0
    value = (gram_x * gram_y).sum() / (norm_x * norm_y)
    return float(value.clamp(0.0, 1.0))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between features ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` of the same ``n`` examples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    return cka_from_grams(centered_gram(x), centered_gram(y))
