"""SMoA's math against independent references: a dense float64 formula, PEFT's HiRA (K = 1), its own saved orderings.

Generic behaviour (PEFT registration, save/load in a fresh process, merge == forward, disable, several adapters,
streaming merge == in-memory merge, Axolotl keys, wrong-base detection) is in the method contract and
tests/test_base_fingerprint.py, which run over SMoA like every registered method.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import HiraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from neuroada_plugin import AdapterCheckpointError, SmoaConfig
from neuroada_plugin.merge import merge_adapter_checkpoint
from neuroada_plugin.smoa import functional
from neuroada_plugin.smoa.functional import spectral_orders
from neuroada_plugin.smoa.layer import SmoaLayer

OUT, IN = 48, 40
F64 = torch.float64


class TwoLayers(nn.Module):
    """A tiny model with two targetable projections of different shapes."""

    def __init__(self, dtype: torch.dtype = F64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(IN, OUT).to(dtype)
        self.v_proj = nn.Linear(OUT, IN, bias=False).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def smoa_model(dtype: torch.dtype = F64, seed: int = 0, **config) -> nn.Module:
    config = {"target_modules": ["q_proj", "v_proj"], "init_weights": False, **config}
    return get_peft_model(TwoLayers(dtype, seed), SmoaConfig(**config))


def dense_reference(layer, adapter: str = "default") -> torch.Tensor:
    """``dW`` in float64 from the formula, written with one-hot selection matrices (no indexing shared with the code)."""
    weight = layer.get_base_layer().weight.detach().to(F64)
    out_features, in_features = weight.shape
    rows, cols = layer.smoa_rows[adapter], layer.smoa_cols[adapter]
    layout = layer.smoa_layout[adapter]
    a_flat, b_flat = layer.smoa_A[adapter].to(F64), layer.smoa_B[adapter].to(F64)
    eye = {"dtype": F64, "device": weight.device}
    delta = torch.zeros(out_features, in_features, **eye)
    row_at = col_at = a_at = b_at = 0
    for n_rows, n_cols, rank in zip(layout.row_sizes, layout.col_sizes, layout.ranks, strict=True):
        select_rows = torch.eye(out_features, **eye)[rows[row_at : row_at + n_rows]]  # [n_rows, out]
        select_cols = torch.eye(in_features, **eye)[cols[col_at : col_at + n_cols]]  # [n_cols, in]
        a = a_flat[a_at : a_at + rank * n_cols].reshape(rank, n_cols)
        b = b_flat[b_at : b_at + n_rows * rank].reshape(n_rows, rank)
        anchor = select_rows @ weight @ select_cols.T
        delta = delta + select_rows.T @ ((b @ a) * anchor) @ select_cols
        row_at, col_at, a_at, b_at = row_at + n_rows, col_at + n_cols, a_at + rank * n_cols, b_at + n_rows * rank
    return delta * layer.smoa_scaling[adapter]


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the forward passes that went through the fused ``base + update`` path (ModulatedLinear)."""
    calls: list[int] = []
    apply = functional.ModulatedLinear.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(functional.ModulatedLinear, "apply", counting)
    return calls


@pytest.mark.parametrize("path", ["fused", "separate", "fused-chunked"])
@pytest.mark.parametrize(
    "config",
    [dict(r=8, num_blocks=2), dict(r=6, num_blocks=3, alpha=3), dict(r=5, num_blocks=4, branch_ranks=[2, 0, 3, 0]),
     dict(r=4, num_blocks=1, alpha=16)],
    ids=["default", "k3", "uneven-ranks", "k1"],
)  # fmt: skip
def test_forward_and_every_gradient_equal_the_dense_formula(config, path, fused_calls, monkeypatch, device):
    """Both forward paths: ``base + update`` as one matmul (float64 here; row chunks of 5 rows in
    ``fused-chunked``) and the base layer plus the separate update. ``--device cuda`` runs it on a GPU."""
    monkeypatch.setattr(SmoaLayer, "fuse_with_base", path != "separate")
    if path == "fused-chunked":
        monkeypatch.setattr(functional, "_FUSED_CHUNK_ENTRIES", 5 * OUT)  # 5 rows of the wider (in = 48) layer
    model = smoa_model(**config).to(device)
    x = torch.randn(3, 7, IN, dtype=F64, device=device, requires_grad=True)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *[p for p in model.parameters() if p.requires_grad]])

    layers = [model.base_model.model.q_proj, model.base_model.model.v_proj]
    leaves = [torch.nn.Parameter(layer.smoa_A["default"].detach().clone()) for layer in layers]
    leaves += [torch.nn.Parameter(layer.smoa_B["default"].detach().clone()) for layer in layers]
    x_ref = x.detach().clone().requires_grad_(True)
    for layer, a, b in zip(layers, leaves[:2], leaves[2:], strict=True):
        layer.smoa_A["default"], layer.smoa_B["default"] = a, b  # the reference differentiates through these
    q, v = layers
    hidden = torch.tanh(x_ref @ (q.get_base_layer().weight + dense_reference(q)).T + q.get_base_layer().bias)
    y_ref = hidden @ (v.get_base_layer().weight + dense_reference(v)).T
    ref_grads = torch.autograd.grad(y_ref.square().sum(), [x_ref, leaves[0], leaves[2], leaves[1], leaves[3]])

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    assert len(fused_calls) == (0 if path == "separate" else 2)  # both layers took the path asked for


def test_with_one_block_it_is_peft_hira_times_alpha_over_r():
    r, alpha = 4, 10.0
    model = smoa_model(r=r, num_blocks=1, alpha=alpha)
    hira = get_peft_model(TwoLayers(), HiraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    for name in ("q_proj", "v_proj"):
        ours, theirs = getattr(model.base_model.model, name), getattr(hira.base_model.model, name)
        rows, cols = ours.smoa_rows["default"], ours.smoa_cols["default"]
        a = ours.smoa_A["default"].detach().view(r, -1)
        b = ours.smoa_B["default"].detach().view(-1, r)
        with torch.no_grad():  # HiRA's A, B in natural coordinates: entry (i, j) of B A sits at (rows[i], cols[j])
            theirs.hira_A["default"][:, cols] = a
            theirs.hira_B["default"][rows] = b
    x = torch.randn(2, 5, IN, dtype=F64)
    base = TwoLayers()(x)
    with torch.no_grad():
        # Layer by layer: the first layer's updates are linear in dW, so compare the q_proj deltas directly.
        q_ours, q_hira = model.base_model.model.q_proj, hira.base_model.model.q_proj
        base_q = q_ours.get_base_layer()(x)
        torch.testing.assert_close(q_ours(x) - base_q, (alpha / r) * (q_hira(x) - base_q), rtol=1e-12, atol=1e-12)
        # HiRA's get_delta_weight is the modulation B A; its update is W0 * (B A).
        hira_delta = q_hira.get_base_layer().weight * q_hira.get_delta_weight("default")
        torch.testing.assert_close(q_ours.get_delta_weight("default"), (alpha / r) * hira_delta, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(model(x), base)


def saved_for_backward(fn) -> list[torch.Tensor]:
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize(
    "base_dtype, fuse", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)],
    ids=["float32-fused", "float32-separate", "bfloat16"],
)  # fmt: skip
def test_no_weight_block_is_kept_for_backward(base_dtype, fuse, fused_calls, monkeypatch):
    """Nothing weight- or block-sized is saved but the frozen weight itself (F.linear's, separate path; the
    fused path saves not even that); HiRA saves a dense dW."""
    monkeypatch.setattr(SmoaLayer, "fuse_with_base", fuse)
    model = smoa_model(base_dtype, r=4, num_blocks=2)
    if base_dtype != torch.float32:
        for name, param in model.named_parameters():
            if "smoa_" in name:
                param.data = param.data.float()  # PEFT's autocast_adapter_dtype: float32 adapter on a bf16 base
    layer = model.base_model.model.q_proj
    x = torch.randn(3, IN, dtype=base_dtype, requires_grad=True)  # 3 tokens: activations stay far below a block
    saved = saved_for_backward(lambda: layer(x).float().sum().backward())
    block = (OUT // 2) * (IN // 2)
    big = [t for t in saved if t.numel() >= block]
    weight = layer.get_base_layer().weight
    fused = fuse and base_dtype == torch.float32
    assert len(fused_calls) == int(fused)  # bfloat16 keeps the separate path (kit/fused.py)
    assert all(t.data_ptr() == weight.data_ptr() and t.dtype == base_dtype for t in big), [
        (tuple(t.shape), t.dtype) for t in big
    ]
    assert len(big) == (0 if fused else 1)
    assert layer.smoa_A["default"].grad is not None and layer.smoa_B["default"].grad is not None

    hira = get_peft_model(TwoLayers(base_dtype), HiraConfig(r=2, target_modules=["q_proj"])).base_model.model.q_proj
    saved = saved_for_backward(lambda: hira(torch.randn(3, IN, dtype=base_dtype, requires_grad=True)).sum().backward())
    assert any(t.numel() >= OUT * IN and t.data_ptr() != hira.get_base_layer().weight.data_ptr() for t in saved)


def _two_adapters(model: nn.Module) -> None:
    model.add_adapter("other", SmoaConfig(target_modules=["q_proj", "v_proj"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize(
    "case",
    ["bfloat16", "autocast", "dropout-training", "two-adapters", "trained-weight", "hooked-base", "tf32", "bf16-matmul"],
)
def test_the_fused_path_is_not_taken_where_it_would_round_or_skip_something(case, fused_calls, monkeypatch):
    """Rounding ``W0 + dW`` into bfloat16 (or under autocast / TF32) would drop small updates; dropout
    applies to the update's input only; a hook on the base layer expects its forward to run."""
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    model = smoa_model(dtype, dropout=0.1 if case == "dropout-training" else 0.0)
    layer = model.base_model.model.q_proj
    x = torch.randn(2, 3, IN, dtype=dtype)
    hook_calls = []
    if case == "two-adapters":
        _two_adapters(model)
    elif case == "trained-weight":
        layer.get_base_layer().weight.requires_grad_(True)
    elif case == "hooked-base":
        layer.get_base_layer().register_forward_hook(lambda *_: hook_calls.append(1))
    elif case == "tf32":
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    elif case == "bf16-matmul":  # torch's newer per-backend setting; put back before any assertion can fail
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    model.train(case == "dropout-training")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            y = layer(x)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert fused_calls == []
    assert hook_calls == ([1] if case == "hooked-base" else [])
    if case == "autocast":  # the update in float32 (it once raised here), the sum in autocast's bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = layer.get_base_layer()(x)
        update = x.double() @ dense_reference(layer).T
        assert update.abs().max() > 0.1
        torch.testing.assert_close(y.double(), base.double() + update, rtol=1e-2, atol=1e-2)


def test_the_fused_path_equals_the_separate_one_in_float32(fused_calls, monkeypatch, device):
    """Same numbers to float32 rounding (with bias, uneven ranks, eval-mode dropout) and the same gradients."""
    model = smoa_model(torch.float32, r=5, num_blocks=3, branch_ranks=[3, 0, 2], dropout=0.2).eval().to(device)
    x = torch.randn(4, 6, IN, device=device, requires_grad=True)
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(SmoaLayer, "fuse_with_base", fuse)
        y = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((y, *torch.autograd.grad(y.sin().sum(), [x, *params])))
    assert len(fused_calls) == 2
    for fused, separate in zip(*results, strict=True):
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)


def test_orderings_sort_rows_and_columns_by_spectral_centroid():
    """Checked against centroids from a float64 SVD: non-decreasing along each ordering (up to float32 noise)."""
    weight = TwoLayers(torch.float32).q_proj.weight.detach()
    rows, cols = spectral_orders(weight)
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    for vectors, order in ((u, rows), (vh.T, cols)):
        energy = (vectors * sigma).square()
        centroid = (energy * torch.arange(len(sigma), dtype=F64)).sum(1) / energy.sum(1)
        assert torch.equal(torch.sort(order).values, torch.arange(len(order)))
        assert bool((centroid[order].diff() > -1e-3).all())
        assert not torch.equal(order, torch.arange(len(order)))


def test_orderings_do_not_depend_on_the_thread_count():
    weights = [TwoLayers(torch.float32, seed).q_proj.weight.detach() for seed in range(3)]
    weights.append(torch.randn(384, 256))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [spectral_orders(w) for w in weights]
        torch.set_num_threads(max(2, threads))
        multi = [spectral_orders(w) for w in weights]
    finally:
        torch.set_num_threads(threads)
    for (rows_1, cols_1), (rows_n, cols_n) in zip(single, multi, strict=True):
        assert torch.equal(rows_1, rows_n) and torch.equal(cols_1, cols_n)


def test_orderings_are_saved_and_loaded_bit_for_bit_never_recomputed(tmp_path, monkeypatch):
    model = smoa_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    layer = model.base_model.model.q_proj
    rows_key = next(k for k in saved if k.endswith("q_proj.smoa_rows"))
    assert saved[rows_key].dtype == torch.int64 and torch.equal(saved[rows_key], layer.smoa_rows["default"])
    x = torch.randn(2, IN, dtype=F64)
    with torch.no_grad():
        expected = model(x)

    calls = []
    monkeypatch.setattr(functional, "spectral_orders", lambda w: calls.append(1) or (None, None))
    monkeypatch.setattr("neuroada_plugin.smoa.layer.spectral_orders", functional.spectral_orders)
    loaded = PeftModel.from_pretrained(TwoLayers(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert not calls  # inference loading never ran an SVD
    monkeypatch.undo()

    # A trainable load runs PEFT's creation path (which orders from this weight), but the file's orderings win:
    # here "this weight" orders differently (reversed), and the loaded model still equals the saved one.
    monkeypatch.setattr(
        "neuroada_plugin.smoa.layer.spectral_orders",
        lambda w: tuple(o.flip(0) for o in spectral_orders(w)),
    )
    trainable = PeftModel.from_pretrained(TwoLayers(), tmp_path, is_trainable=True)
    assert torch.equal(trainable.base_model.model.q_proj.smoa_rows["default"], layer.smoa_rows["default"])
    with torch.no_grad():
        assert torch.equal(trainable(x), expected)


def test_an_adapter_created_for_inference_orders_itself_on_first_use():
    fresh = smoa_model()
    later = get_peft_model(TwoLayers(), SmoaConfig(target_modules=["q_proj", "v_proj"], inference_mode=True))
    layer = later.base_model.model.q_proj
    assert "default" in layer._pending_orders
    later(torch.randn(1, IN, dtype=F64))
    assert torch.equal(layer.smoa_rows["default"], fresh.base_model.model.q_proj.smoa_rows["default"])
    assert not layer._pending_orders


def test_merge_equals_the_dense_formula_and_unmerge_is_exact():
    model = smoa_model()
    layer = model.base_model.model.q_proj
    weight = layer.get_base_layer().weight.detach().clone()
    expected = weight + dense_reference(layer)
    model.add_adapter("second", SmoaConfig(target_modules=["q_proj", "v_proj"], init_weights=False, r=4))
    expected_both = expected + dense_reference(layer, "second")  # both modulate the pre-merge weight
    model.base_model.merge_adapter(["default"])  # float64 weights merge in float64
    torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-14)
    model.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)
    model.base_model.merge_adapter(["default", "second"])
    torch.testing.assert_close(layer.get_base_layer().weight, expected_both, rtol=0, atol=1e-14)
    model.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)


def test_a_nan_adapter_merges_nothing():
    model = smoa_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "smoa_" not in n}
    with torch.no_grad():
        model.base_model.model.v_proj.smoa_B["default"][0] = float("nan")
    with pytest.raises(Exception, match=r"SMoA adapter 'default' into layer v_proj.*non-finite.*Nothing was merged"):
        model.merge_adapter()
    for name, param in model.named_parameters():
        if "smoa_" not in name:
            assert torch.equal(param, weights[name])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), r"SmoaConfig.r must be >= 1"),
        (dict(num_blocks=0), r"SmoaConfig.num_blocks must be >= 1"),
        (dict(r=2.5), r"SmoaConfig.r must be an integer"),
        (dict(dropout=1.0), r"SmoaConfig.dropout must be in \[0, 1\)"),
        (dict(alpha=float("nan")), r"SmoaConfig.alpha must be a finite number"),
        (dict(num_blocks=3, branch_ranks=[4, 4]), r"branch_ranks has 2 entries but num_blocks=3"),
        (dict(r=8, branch_ranks=[4, 3]), r"branch_ranks \[4, 3\] sum to 7, but r=8"),
        (dict(r=8, branch_ranks=[9, -1]), r"non-negative integers"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmoaConfig(**kwargs)


def test_more_blocks_than_a_layer_has_rows_is_refused_and_nothing_changes():
    model = TwoLayers()
    with pytest.raises(ValueError, match=r"num_blocks=41 exceeds layer v_proj's smaller side \(40"):
        get_peft_model(model, SmoaConfig(target_modules=["q_proj", "v_proj"], r=41, num_blocks=41))
    assert isinstance(model.q_proj, nn.Linear) and isinstance(model.v_proj, nn.Linear)


def test_a_damaged_or_foreign_adapter_file_is_refused_naming_the_layer(tmp_path):
    model = smoa_model()
    model.save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("v_proj.smoa_cols"))
    broken = dict(tensors)
    broken[key] = torch.zeros_like(tensors[key])  # not a permutation
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    save_file(broken, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckpointError, match=r"SMoA layer v_proj: .*smoa_cols.* not a permutation of 0\.\.47"):
        PeftModel.from_pretrained(TwoLayers(), tmp_path / "bad")
    with pytest.raises(AdapterCheckpointError, match=r"layer v_proj: .*smoa_cols.* not a permutation"):
        from neuroada_plugin.merge.rules import AdapterModule
        from neuroada_plugin.smoa.checkpoint import read_smoa_module

        module = AdapterModule(
            "v_proj", {"A": tensors[key.replace("cols", "A")], "B": tensors[key.replace("cols", "B")],
                       "rows": tensors[key.replace("cols", "rows")], "cols": broken[key]},
            {name: f"v_proj.smoa_{name}" for name in ("A", "B", "rows", "cols")}, {"r": 8, "num_blocks": 2},
            tmp_path / "bad" / "adapter_model.safetensors",
        )  # fmt: skip
        read_smoa_module(module)

    # Made with other block ranks than the config says: refused with both layouts named.
    other = smoa_model(num_blocks=3, branch_ranks=[6, 1, 1])
    other.save_pretrained(tmp_path / "ranks")
    config = json.loads((tmp_path / "ranks" / "adapter_config.json").read_text())
    (tmp_path / "ranks" / "adapter_config.json").write_text(json.dumps({**config, "branch_ranks": None}))
    with pytest.raises(AdapterCheckpointError, match=r"SMoA layer .*smoa_A.* ranks \[3, 3, 2\] on blocks of"):
        PeftModel.from_pretrained(TwoLayers(), tmp_path / "ranks")


def test_streaming_merge_uses_the_saved_orderings(tmp_path):
    """The merge CLI reads the file's orderings: an adapter whose orderings are not the weight's own still merges
    to what the in-memory model computes with them (nothing recomputed from the base)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2)
    )  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SmoaConfig(target_modules=["q_proj", "down_proj"], init_weights=False))
    for layer in (model.base_model.model.model.layers[0].self_attn.q_proj, model.base_model.model.model.layers[0].mlp.down_proj):
        layer.smoa_rows["default"] = layer.smoa_rows["default"].flip(0)
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    in_memory = model.merge_and_unload().state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(merged[name], in_memory[name])


def test_a_file_without_its_orderings_is_refused_not_reordered(tmp_path):
    smoa_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(("smoa_rows", "smoa_cols"))},
              tmp_path / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(AdapterCheckpointError, match=r"SMoA layer q_proj: .*factors but not both of its orderings"):
        PeftModel.from_pretrained(TwoLayers(), tmp_path)
