"""NEAT: PEFT's PEANuT as the oracle, the lean forward's saved tensors, exact merge/unmerge, config checks."""

from __future__ import annotations

import pytest
import torch
from peft import PeanutConfig, get_peft_model
from torch import nn

from neuroada_plugin.neat import NeatConfig
from neuroada_plugin.neat.functional import ACTIVATIONS
from neuroada_plugin.neat.layer import NeatLayer

OUT, IN, R = 24, 20, 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def pair(depth: int, act_fn: str, scaling: float = 0.7):
    """A PEANuT model and a NEAT model on identical base weights, NEAT's adapter tensors copied from PEANuT's."""
    common = dict(r=R, depth=depth, act_fn=act_fn, scaling=scaling, target_modules=["up", "down"], init_weights=False)
    torch.manual_seed(1)
    peanut = get_peft_model(Tiny(), PeanutConfig(**common))
    neat = get_peft_model(Tiny(), NeatConfig(**common))
    with torch.no_grad():
        for name in ("up", "down"):
            src = getattr(peanut.base_model.model, name)
            dst = getattr(neat.base_model.model, name)
            assert torch.equal(src.base_layer.weight, dst.base_layer.weight)
            dst.neat_A["default"].copy_(src.peanut_A["default"].weight)
            dst.neat_B["default"].copy_(src.peanut_B["default"].weight)
            if depth:
                dst.neat_E["default"].copy_(torch.stack([m.weight for m in src.peanut_encoders["default"]]))
                dst.neat_D["default"].copy_(torch.stack([m.weight for m in src.peanut_decoders["default"]]))
    return peanut, neat


def inputs() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("act_fn", ["relu", "gelu", "tanh", "silu"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_outputs_and_gradients_equal_peanut(depth, act_fn):
    peanut, neat = pair(depth, act_fn)
    x = inputs()
    expected, got = peanut(x), neat(x)
    assert not torch.allclose(expected, peanut.get_base_model().down.base_layer(torch.tanh(x @ torch.zeros(IN, OUT))))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.square().sum().backward()
    got.square().sum().backward()
    for name in ("up", "down"):
        src = getattr(peanut.base_model.model, name)
        dst = getattr(neat.base_model.model, name)
        torch.testing.assert_close(
            dst.neat_A["default"].grad, src.peanut_A["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            dst.neat_B["default"].grad, src.peanut_B["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
        if depth:
            enc = torch.stack([m.weight.grad for m in src.peanut_encoders["default"]])
            torch.testing.assert_close(dst.neat_E["default"].grad, enc, rtol=1e-4, atol=1e-6)


def test_merged_model_equals_peanut_merge_and_unload():
    peanut, neat = pair(1, "relu")
    merged_peanut = peanut.merge_and_unload()
    merged_neat = neat.merge_and_unload()
    for name in ("up", "down"):
        torch.testing.assert_close(
            getattr(merged_neat, name).weight, getattr(merged_peanut, name).weight, rtol=1e-5, atol=1e-6
        )


def saved_for_backward(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_no_weight_sized_tensor_is_kept_for_backward(depth, base_dtype):
    """Only the frozen weight itself (no copy, no dW) of [out, in] size is saved; PEANuT saves a dense one."""
    base = nn.Linear(IN, OUT).to(base_dtype)
    layer = NeatLayer(base, "default", NeatConfig(r=R, depth=depth, target_modules=["x"], init_weights=False))
    for param in layer.parameters():
        if param is not base.weight and param is not base.bias:
            param.data = param.data.float()  # PEFT's autocast_adapter_dtype: float32 adapter on a bf16 base
    base.requires_grad_(False)
    x = torch.randn(3, 5, IN, dtype=base_dtype, requires_grad=True)  # 15 tokens: no shape collides with [out, in]
    saved = saved_for_backward(lambda: layer(x).float().sum().backward())
    big = [t for t in saved if t.numel() >= OUT * IN]
    assert big, "expected the base weight among the saved tensors (F.linear keeps it for dL/dx)"
    assert all(t.data_ptr() == base.weight.data_ptr() and t.dtype == base_dtype for t in big), [
        (tuple(t.shape), t.dtype) for t in big
    ]
    assert layer.neat_A["default"].grad is not None and layer.neat_B["default"].grad is not None

    peanut = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), PeanutConfig(r=R, target_modules=["0"]))
    peanut_weight = peanut.base_model.model[0].base_layer.weight
    saved = saved_for_backward(lambda: peanut(torch.randn(3, 5, IN, requires_grad=True)).sum().backward())
    assert any(t.numel() >= OUT * IN and t.data_ptr() != peanut_weight.data_ptr() for t in saved)


def test_merge_equals_forward_and_unmerge_is_exact():
    _, neat = pair(1, "gelu")
    x = inputs()
    with torch.no_grad():
        expected = neat(x)
        weights = {n: p.clone() for n, p in neat.named_parameters() if "neat_" not in n}
        neat.merge_adapter()
        torch.testing.assert_close(neat(x), expected, rtol=1e-5, atol=1e-6)
        neat.unmerge_adapter()
        for name, param in neat.named_parameters():
            if "neat_" not in name:
                assert torch.equal(param, weights[name]), name
        torch.testing.assert_close(neat(x), expected, rtol=0, atol=0)


def test_two_adapters_merge_against_the_pre_merge_weight():
    _, neat = pair(0, "relu")
    neat.add_adapter(
        "other", NeatConfig(r=2, act_fn="tanh", scaling=0.3, target_modules=["up", "down"], init_weights=False)
    )
    neat.base_model.set_adapter(["default", "other"])
    x = inputs()
    with torch.no_grad():
        expected = neat(x)  # both deltas read the original weight
        original = neat.base_model.model.up.base_layer.weight.clone()
        neat.merge_adapter(["default", "other"])
        torch.testing.assert_close(neat(x), expected, rtol=1e-5, atol=1e-6)
        neat.unmerge_adapter()
        assert torch.equal(neat.base_model.model.up.base_layer.weight, original)


def test_zero_init_is_the_base_model():
    model = get_peft_model(Tiny(), NeatConfig(r=R, target_modules=["up", "down"]))
    x = inputs()
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), base)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be >= 1"),
        ({"r": 2.5}, "r must be an integer"),
        ({"depth": -1}, "depth must be >= 0"),
        ({"act_fn": "nope"}, "act_fn must be one of"),
        ({"scaling": float("nan")}, "scaling must be finite"),
        ({"target_modules": []}, "empty"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeatConfig(**kwargs)


def test_config_fields_have_help_and_peanut_activations_exist():
    import dataclasses

    from transformers.activations import ACT2FN

    for f in dataclasses.fields(NeatConfig):
        if f.name in {"r", "depth", "act_fn", "scaling", "target_modules", "exclude_modules", "init_weights"}:
            assert f.metadata.get("help"), f.name
    assert set(ACTIVATIONS) <= set(ACT2FN)
    assert NeatConfig().peft_type == "NEAT"


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_equals_transformers_act2fn(name):
    """PEANuT applies ``ACT2FN[act_fn]``; the torch equivalents used here must compute the same function."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)


def test_checkpoint_rule_equals_the_layer_merge_bit_for_bit_and_checks_shapes(tmp_path):
    from pathlib import Path

    from neuroada_plugin.errors import AdapterCheckpointError
    from neuroada_plugin.merge.rules import AdapterModule
    from neuroada_plugin.neat.checkpoint import neat_checkpoint_rule

    _, neat = pair(2, "silu")
    layer = neat.base_model.model.up
    original = layer.base_layer.weight.detach().clone()
    tensors = {name: getattr(layer, f"neat_{name}")["default"].detach().clone() for name in ("A", "B", "E", "D")}
    config = {"depth": 2, "act_fn": "silu", "scaling": 0.7}

    def module(values):
        keys = {name: f"up.neat_{name}" for name in values}
        return AdapterModule("up", values, keys, config, Path(tmp_path / "adapter_model.safetensors"))

    (patch,) = neat_checkpoint_rule(module(tensors), {})
    streamed = patch.apply(original.clone())
    layer.merge()
    assert torch.equal(streamed, layer.base_layer.weight)
    with pytest.raises(AdapterCheckpointError, match="neat_B"):
        neat_checkpoint_rule(module({**tensors, "B": tensors["B"][:, :2]}), {})
    with pytest.raises(AdapterCheckpointError, match="neat_E and neat_D"):
        neat_checkpoint_rule(module({"A": tensors["A"], "B": tensors["B"]}), {})


def test_merge_rule_modules_import_only_torch():
    import subprocess
    import sys

    code = (
        "import sys; import neuroada_plugin.neat.checkpoint, neuroada_plugin.neat.functional; "
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]"]


def test_a_sharded_weight_is_refused_with_the_reason():
    """A flat weight that is not a DeepSpeed ZeRO-3 partition (nothing can gather it) cannot feed act(A @ W0): say
    so instead of a shape error. A real ZeRO-3 partition is gathered: tests/test_distributed_neat_zero3.py."""
    from neuroada_plugin.errors import UnsupportedTargetError

    model = Tiny()
    model.up.weight.data = torch.empty(0)
    with pytest.raises(UnsupportedTargetError, match=r"NEAT cannot adapt up: .*ZeRO-3"):
        get_peft_model(model, NeatConfig(r=R, target_modules=["up"]))
    model = get_peft_model(Tiny(), NeatConfig(r=R, target_modules=["up"]))
    model.base_model.model.up.base_layer.weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"NEAT layer \(24x20\) sees its frozen weight as a \(0,\) shard"):
        model(inputs())
