"""SMoA's update rebuilt from a saved adapter's tensors alone, in float64: the reference of the end-to-end tests.

``dW[R_k, C_k] = (alpha / r) * (B_k @ A_k) * W0[R_k, C_k]`` (arXiv 2601.07507). Written here from the
formula and the saved files only (nothing of ``neuroada_plugin`` is imported): the saved orderings
``smoa_rows`` / ``smoa_cols`` permute ``W0``'s rows and columns; cut into ``K`` contiguous groups (the
first ``n % K`` one larger), they give the diagonal blocks; ``smoa_A`` / ``smoa_B`` hold every block's
``A_k [r_k, |C_k|]`` / ``B_k [|R_k|, r_k]`` flattened row-major, block after block. The update is built
in the permuted coordinates as ``blockdiag(B_k A_k) * W0[rows][:, cols]`` and moved back with one-hot
permutation matrices (no scatter shared with the implementation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

F64 = torch.float64


def group_sizes(total: int, parts: int) -> list[int]:
    """``parts`` contiguous group sizes of ``total`` items, the first ``total % parts`` one larger."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def block_ranks(config: dict) -> list[int]:
    """Rank of each block: ``branch_ranks``, else ``r`` split like the rows (first blocks larger)."""
    ranks = config.get("branch_ranks")
    return list(ranks) if ranks is not None else group_sizes(config["r"], config["num_blocks"])


def trainable_count(out_features: int, in_features: int, config: dict) -> int:
    """Entries of ``smoa_A`` + ``smoa_B`` of one layer: ``sum_k r_k (|R_k| + |C_k|)``."""
    k = config["num_blocks"]
    sizes = zip(group_sizes(out_features, k), group_sizes(in_features, k), block_ranks(config), strict=True)
    return sum(rank * (n_rows + n_cols) for n_rows, n_cols, rank in sizes)


def dense_delta(w0: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """The float64 ``dW [out, in]`` of one layer from its saved ``A``, ``B``, ``rows``, ``cols`` and the config."""
    w = w0.to(F64)
    out_features, in_features = w.shape
    k, ranks = config["num_blocks"], block_ranks(config)
    rows, cols = tensors["rows"], tensors["cols"]
    assert torch.equal(rows.sort().values, torch.arange(out_features)), "smoa_rows is not a permutation"
    assert torch.equal(cols.sort().values, torch.arange(in_features)), "smoa_cols is not a permutation"
    a_flat, b_flat = tensors["A"].to(F64), tensors["B"].to(F64)
    modulations, a_at, b_at = [], 0, 0
    for n_rows, n_cols, rank in zip(group_sizes(out_features, k), group_sizes(in_features, k), ranks, strict=True):
        a = a_flat[a_at : a_at + rank * n_cols].reshape(rank, n_cols)
        b = b_flat[b_at : b_at + n_rows * rank].reshape(n_rows, rank)
        modulations.append(b @ a)  # [n_rows, n_cols]; zeros for a block of rank 0
        a_at, b_at = a_at + rank * n_cols, b_at + n_rows * rank
    assert (a_at, b_at) == (a_flat.numel(), b_flat.numel()), "smoa_A / smoa_B sizes do not match the config"
    select_rows = torch.eye(out_features, dtype=F64)[rows]  # P_r @ W == W[rows]
    select_cols = torch.eye(in_features, dtype=F64)[cols]
    permuted = torch.block_diag(*modulations) * (select_rows @ w @ select_cols.T)
    return (config["alpha"] / config["r"]) * (select_rows.T @ permuted @ select_cols)


def adapter_tensors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Base weight key -> {"A", "B", "rows", "cols", "fingerprint"}, read straight from adapter_model.safetensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        module, _, name = key.removeprefix("base_model.model.").rpartition(".smoa_")
        out.setdefault(f"{module}.weight", {})[name] = tensor
    return out


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def dense_state(base_state: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The base state in float64 with every adapted weight replaced by ``W0 + dW``."""
    config = adapter_config(adapter_dir)
    state = {key: value.to(F64) for key, value in base_state.items()}
    for key, tensors in adapter_tensors(adapter_dir).items():
        state[key] = state[key] + dense_delta(base_state[key], tensors, config)
    return state


def dense_model(model_dir: Path, adapter_dir: Path):
    """The float64 model (``transformers``, no PEFT) with ``W0 + dW`` written into its weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    base_state = load_file(Path(model_dir) / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F64)
    missing, unexpected = model.load_state_dict(dense_state(base_state, adapter_dir), strict=False)
    assert not unexpected and all("rotary" in key for key in missing), (missing, unexpected)
    return model.eval()
