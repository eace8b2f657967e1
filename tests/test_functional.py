"""The sparse bypass against the dense masked reference, property-based."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroada_plugin import select_connections
from neuroada_plugin.neuroada import functional
from neuroada_plugin.neuroada.csr_bypass import CsrBypass, csr_path_supported, csr_pattern
from neuroada_plugin.neuroada.functional import merged_entries, sparse_bypass

PATHS = ("gather", "csr")


def bypass(path, x, theta, indices, compact=None):
    """``sparse_bypass`` through the gather op or the CSR op (asserting the CSR op really runs)."""
    if path == "gather":
        return sparse_bypass(x, theta, indices, compact)
    assert csr_path_supported(x, theta)
    delta = sparse_bypass(x, theta, indices, compact, csr_pattern(indices, x.shape[-1], compact))
    assert delta.grad_fn is None or delta.grad_fn.name() == CsrBypass.__name__ + "Backward"
    return delta


def dense_reference(x, weight, bias, theta, indices):
    """y = x (W + scatter(idx, theta))^T + b: what the official code computes."""
    delta = torch.zeros_like(weight, dtype=theta.dtype).scatter(1, indices, theta)
    return torch.nn.functional.linear(x, weight + delta.to(weight.dtype), bias)


def _case(seed, lead, out_features, in_features, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    bias = torch.randn(out_features, generator=g, dtype=dtype)
    x = torch.randn(*lead, in_features, generator=g, dtype=dtype)
    theta = torch.randn(out_features, k, generator=g, dtype=dtype)
    indices = select_connections(weight, k)
    return x, weight, bias, theta, indices


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 12),
    k_fraction=st.floats(0.0, 1.0),
)
def test_forward_and_gradients_equal_dense_reference(path, seed, lead, out_features, in_features, k_fraction):
    k = 1 + int(k_fraction * (in_features - 1))
    x, weight, bias, theta, indices = _case(seed, lead, out_features, in_features, k)
    x_ref, theta_ref = x.clone().requires_grad_(), theta.clone().requires_grad_()
    x_new, theta_new = x.clone().requires_grad_(), theta.clone().requires_grad_()

    y_ref = dense_reference(x_ref, weight, bias, theta_ref, indices)
    y_new = torch.nn.functional.linear(x_new, weight, bias) + bypass(path, x_new, theta_new, indices)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-12, atol=1e-12)

    upstream = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y_ref.dtype)
    (y_ref * upstream).sum().backward()
    (y_new * upstream).sum().backward()
    torch.testing.assert_close(theta_new.grad, theta_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9))
def test_chunked_path_equals_unchunked(seed, k):
    x, weight, bias, theta, indices = _case(seed, (3, 5), 7, 9, k)
    theta = theta.requires_grad_()
    expected = sparse_bypass(x, theta, indices)
    (grad_expected,) = torch.autograd.grad(expected.sum(), theta)
    original = functional._CHUNK_ELEMENTS
    functional._CHUNK_ELEMENTS = 1  # one connection column at a time
    try:
        chunked = sparse_bypass(x, theta, indices)
        (grad_chunked,) = torch.autograd.grad(chunked.sum(), theta)
    finally:
        functional._CHUNK_ELEMENTS = original
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_chunked, grad_expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_double_precision(path):
    x, weight, bias, theta, indices = _case(0, (2, 3), 5, 6, 3)
    assert torch.autograd.gradcheck(
        lambda a, t: bypass(path, a, t, indices), (x.requires_grad_(), theta.requires_grad_())
    )


@pytest.mark.parametrize("path", PATHS)
def test_bf16_input_with_fp32_theta_accumulates_in_fp32(path):
    x, weight, bias, theta, indices = _case(1, (64, 8), 16, 32, 2, dtype=torch.float32)
    x_bf16 = x.to(torch.bfloat16)
    theta = theta.requires_grad_()
    delta = bypass(path, x_bf16, theta, indices)
    assert delta.dtype == torch.float32
    expected = (x_bf16.float()[..., indices] * theta.detach()).sum(-1)
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(delta.sum(), theta)
    assert grad.dtype == torch.float32
    expected_grad = x_bf16.float()[..., indices].reshape(-1, 16, 2).sum(0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_no_gradient_requested_for_frozen_theta(path):
    x, weight, bias, theta, indices = _case(2, (4,), 3, 5, 2)
    x = x.requires_grad_()
    bypass(path, x, theta, indices).sum().backward()
    expected = torch.zeros_like(x).index_add_(-1, indices.flatten(), theta.flatten().expand(4, -1))
    torch.testing.assert_close(x.grad, expected)


def test_merged_entries_round_once_to_weight_dtype():
    original = torch.tensor([1.0, 256.0, -3.0], dtype=torch.bfloat16)
    theta = torch.tensor([0.001, 1.0, 0.5], dtype=torch.float32)
    merged = merged_entries(original, theta)
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == (original.float() + theta).to(torch.bfloat16).tolist()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 12),
    k=st.integers(1, 4),
    chunk=st.sampled_from([1, 7, 1 << 22]),
)
def test_compact_saved_columns_give_the_dense_reference_gradients(path, seed, out_features, in_features, k, chunk):
    """Keeping only x[..., columns] for backward changes no number (random indices, shared across rows)."""
    k = min(k, in_features)
    x, weight, bias, theta, _ = _case(seed, (2, 3), out_features, in_features, k)
    g = torch.Generator().manual_seed(seed + 7)
    # Distinct within a row (as every selection and checkpoint is), freely repeated across rows.
    indices = torch.stack([torch.randperm(in_features, generator=g)[:k] for _ in range(out_features)])
    share = functional.COMPACT_SAVE_MAX_SHARE
    functional.COMPACT_SAVE_MAX_SHARE = 1.0  # compact whatever the share, to exercise the path
    try:
        compact = functional.compact_columns(indices, in_features)
    finally:
        functional.COMPACT_SAVE_MAX_SHARE = share
    assert compact is not None
    columns, local = compact
    assert torch.equal(columns[local], indices)

    x_ref, theta_ref = x.clone().requires_grad_(), theta.clone().requires_grad_()
    x_new, theta_new = x.clone().requires_grad_(), theta.clone().requires_grad_()
    y_ref = dense_reference(x_ref, weight, bias, theta_ref, indices)
    original = functional._CHUNK_ELEMENTS
    functional._CHUNK_ELEMENTS = chunk
    try:
        y_new = torch.nn.functional.linear(x_new, weight, bias) + bypass(path, x_new, theta_new, indices, compact)
        upstream = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y_ref.dtype)
        (y_ref * upstream).sum().backward()
        (y_new * upstream).sum().backward()
    finally:
        functional._CHUNK_ELEMENTS = original
    torch.testing.assert_close(y_new, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta_new.grad, theta_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def _saved_shapes(fn):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("path", PATHS)
def test_only_the_selected_columns_are_kept_for_backward(path):
    """A selection reading 3 of 64 inputs keeps [tokens, 3] for backward, not the [tokens, 64] input."""
    indices = torch.tensor([[3, 7], [40, 3], [3, 7], [7, 40], [3, 40]])
    compact = functional.compact_columns(indices, 64)
    assert compact is not None and compact[0].tolist() == [3, 7, 40]
    x = torch.randn(4, 6, 64, requires_grad=True)
    theta = torch.randn(5, 2, requires_grad=True)
    shapes = _saved_shapes(lambda: bypass(path, x, theta, indices, compact))
    assert (24, 3) in shapes and (4, 6, 64) not in shapes
    # Frozen theta: dL/dx needs no input at all.
    frozen = theta.detach()
    assert (4, 6, 64) not in _saved_shapes(lambda: bypass(path, x, frozen, indices))
    # Above the share the whole input is kept (no copy).
    assert functional.compact_columns(torch.arange(40).view(40, 1), 64) is None
    assert (4, 6, 64) in _saved_shapes(lambda: bypass(path, x, theta, indices))


def test_layer_takes_the_csr_path_from_two_connections_on_cpu_fp32():
    """k=1 and bf16 arithmetic stay on the gather op; k>=2 in fp32 on the CPU runs CsrBypass."""
    from neuroada_plugin.neuroada.csr_bypass import CSR_MIN_K

    assert CSR_MIN_K == 2
    x = torch.randn(3, 8)
    theta = torch.zeros(4, 2, requires_grad=True)
    assert csr_path_supported(x, theta)
    assert csr_path_supported(x.bfloat16(), theta)  # fp32 arithmetic
    assert not csr_path_supported(x.bfloat16(), theta.detach().bfloat16())
    assert not csr_path_supported(x.to("meta"), theta)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_bf16_autocast_changes_no_bypass_number(path):
    """Under autocast (TRL's bf16=True on CPU) the bypass still runs in fp32, on either op."""
    x, weight, bias, theta, indices = _case(3, (4, 5), 6, 10, 3, dtype=torch.float32)
    theta = theta.requires_grad_()
    expected = bypass(path, x, theta, indices)
    (expected_grad,) = torch.autograd.grad(expected.sum(), theta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = bypass(path, x, theta, indices)
        (grad,) = torch.autograd.grad(delta.sum(), theta)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
