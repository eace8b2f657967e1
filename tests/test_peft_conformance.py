"""PEFT conformance: NeuroAda through PEFT's generic API on small custom models, the way PEFT tests its tuners.

Every test here runs over ``CASES`` (configurations x models). Where PEFT's convention is a
matter of behaviour rather than arithmetic (which adapters train after a load, which dtype an
adapter gets), the oracle is PEFT's own LoRA on the same model driven through the same calls,
so the tests follow whatever the installed PEFT does. Method arithmetic is checked against a
dense reference ``W + scatter(theta)`` built independently of the layer's sparse op.

The models use SiLU, not ReLU: NeuroAda trains single input connections, and in a ReLU MLP a
selected connection can read a unit that is zero for every sample, so its theta never gets a
gradient; "every trainable value changes after a step" would then fail for a legitimate
reason. SiLU's gradient is non-zero almost everywhere, so that check stays strict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from neuroada_plugin import NeuroAdaConfig, NeuroAdaLayer, NeuroAdaModel, select_connections

IN, HIDDEN, OUT = 12, 24, 6


class MLP(nn.Module):
    """``lin0 -> SiLU -> lin1`` (optionally a LayerNorm between them, optionally no biases)."""

    def __init__(self, bias: bool = True, layer_norm: bool = False) -> None:
        super().__init__()
        self.lin0 = nn.Linear(IN, HIDDEN, bias=bias)
        self.norm = nn.LayerNorm(HIDDEN) if layer_norm else nn.Identity()
        self.act = nn.SiLU()
        self.lin1 = nn.Linear(HIDDEN, OUT, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.norm(self.lin0(x))))


MODELS = {
    "bias": dict(bias=True),
    "no_bias": dict(bias=False),
    "layernorm": dict(bias=True, layer_norm=True),
}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    config: dict = field(default_factory=dict)

    def build_model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> MLP:
        torch.manual_seed(seed)
        return MLP(**MODELS[self.model]).to(dtype).eval()

    def neuroada(self, **overrides) -> NeuroAdaConfig:
        return NeuroAdaConfig(**{**self.config, **overrides})

    def lora(self) -> LoraConfig:
        """The LoRA config that adapts the same modules (the oracle for generic behaviour)."""
        keep = {k: v for k, v in self.config.items() if k in ("target_modules", "modules_to_save")}
        return LoraConfig(r=2, **keep)

    @property
    def targets(self) -> list[str]:
        targets = self.config["target_modules"]
        return [targets] if isinstance(targets, str) else list(targets)


CONFIGS = {
    "k1-first": dict(target_modules=["lin0"], top_k=1),
    "k3-last": dict(target_modules=["lin1"], top_k=3),
    "k8-both": dict(target_modules=["lin0", "lin1"], top_k=8),
    "k2-first-save-last": dict(target_modules=["lin0"], top_k=2, modules_to_save=["lin1"]),
    "k4-random-both": dict(target_modules=["lin0", "lin1"], top_k=4, selection="random", seed=7),
    "k5-last-smallest": dict(target_modules=["lin1"], top_k=5, selection="smallest"),
}
CASES = [Case(f"{c}-{m}", m, cfg) for c, cfg in CONFIGS.items() for m in MODELS]
# A LayerNorm model that also trains the norm in full (modules_to_save on a non-linear module).
CASES.append(
    Case(
        "k2-both-save-norm-layernorm",
        "layernorm",
        dict(target_modules=["lin0", "lin1"], top_k=2, modules_to_save=["norm"]),
    )
)
IDS = [case.name for case in CASES]

X = torch.randn(5, IN, generator=torch.Generator().manual_seed(123))


def output(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype))


def adapted_layers(model: nn.Module) -> dict[str, NeuroAdaLayer]:
    return {
        name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, NeuroAdaLayer)
    }


def randomise(model: nn.Module, adapter: str = "default", seed: int = 1) -> None:
    """Give the adapter's theta (and its modules_to_save copy) non-zero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}" in name and ("neuroada_theta" in name or "modules_to_save" in name):
                param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param.dtype))


def dense_reference(base: MLP, model: nn.Module, adapters: list[str]) -> MLP:
    """The base model with ``W[i, idx[i, j]] += theta[i, j]`` for every adapter, written densely in float64."""
    reference = copy.deepcopy(base).double()
    for name, layer in adapted_layers(model).items():
        weight = reference.get_submodule(name).weight
        for adapter in adapters:
            theta = layer.neuroada_theta[adapter].detach().double()
            indices = layer.neuroada_indices[adapter]
            for i in range(theta.shape[0]):
                for j in range(theta.shape[1]):
                    weight.data[i, indices[i, j]] += theta[i, j]
    return reference


def trainable_pattern(model: nn.Module, prefix: str) -> dict[tuple[str, str], bool]:
    """``{(adapter name, kind): requires_grad}`` over adapter tensors, with method-specific names erased."""
    pattern: dict[tuple[str, str], bool] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "modules_to_save" in parts:
            key = (parts[parts.index("modules_to_save") + 1], "modules_to_save")
        elif any(part.startswith(prefix) for part in parts):
            adapter = next(parts[i + 1] for i, part in enumerate(parts) if part.startswith(prefix))
            key = (adapter, "adapter")
        else:
            key = ("<base>", "base")
        pattern[key] = pattern.get(key, False) or param.requires_grad
    return pattern


def adapter_dtypes(model: nn.Module, prefix: str) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if f".{prefix}" in n}


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attributes_and_trainable_count(case):
    model = get_peft_model(case.build_model(), case.neuroada())
    assert isinstance(model.base_model, NeuroAdaModel)
    assert model.active_adapter == "default" and model.peft_config["default"] is not None
    layers = adapted_layers(model)
    assert sorted(layers) == sorted(case.targets)
    for layer in layers.values():
        assert isinstance(layer, BaseTunerLayer) and layer.active_adapters == ["default"]
        assert layer.neuroada_indices["default"].dtype == torch.int64
    saved = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save.default" in n)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(layer.out_features * case.config["top_k"] for layer in layers.values()) + saved


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selection_is_the_configured_rule(case):
    model = get_peft_model(case.build_model(), case.neuroada())
    reference = case.build_model()
    for name, layer in adapted_layers(model).items():
        expected = select_connections(
            reference.get_submodule(name).weight,
            case.config["top_k"],
            case.config.get("selection", "magnitude"),
            seed=case.config.get("seed", 0),
            salt=name,
        )
        assert torch.equal(layer.neuroada_indices["default"], expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_custom_adapter_name(case):
    model = get_peft_model(case.build_model(), case.neuroada(), adapter_name="custom")
    assert model.active_adapter == "custom"
    keys = [n for n, _ in model.named_parameters() if "neuroada_theta" in n]
    assert keys and all(n.endswith(".neuroada_theta.custom") for n in keys)
    assert all(layer.active_adapters == ["custom"] for layer in adapted_layers(model).values())


# --------------------------------------------------------------------------- forward and merge


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_dense_reference(case):
    base = case.build_model()
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    reference = dense_reference(base, model, ["default"])
    if "modules_to_save" in case.config:
        for name in case.config["modules_to_save"]:
            trained = model.base_model.model.get_submodule(name).modules_to_save["default"]
            reference.get_submodule(name).load_state_dict({k: v.double() for k, v in trained.state_dict().items()})
    torch.testing.assert_close(output(model), output(reference).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_init_is_the_base_model(case):
    base = case.build_model()
    model = get_peft_model(case.build_model(), case.neuroada())
    assert torch.equal(output(model), output(base))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_fp32_and_unmerge_exact(case):
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    unmerged = output(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "neuroada_" not in n}
    model.merge_adapter()
    torch.testing.assert_close(output(model), unmerged, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "neuroada_" not in n)
    plain = model.merge_and_unload()
    assert not adapted_layers(plain) and not any("neuroada_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(output(plain), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_fp16(case):
    model = get_peft_model(case.build_model(dtype=torch.float16), case.neuroada(init_weights=False))
    randomise(model)
    unmerged = output(model)
    plain = model.merge_and_unload()
    assert {p.dtype for p in plain.parameters()} == {torch.float16}
    torch.testing.assert_close(output(plain), unmerged, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_is_idempotent(case):
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    model.merge_adapter()
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="[Aa]lready merged"):
        model.merge_adapter()
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_safe_merge_equals_merge(case):
    first = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(first)
    second = copy.deepcopy(first)
    plain = first.merge_and_unload()
    safe = second.merge_and_unload(safe_merge=True)
    safe_state = safe.state_dict()
    assert all(torch.equal(value, safe_state[name]) for name, value in plain.state_dict().items())


# --------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_load(case, safe_serialization, tmp_path):
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    expected = output(model)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights_file = tmp_path / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin")
    assert weights_file.exists() and len(list(tmp_path.glob("adapter_model.*"))) == 1
    state = load_file(weights_file) if safe_serialization else torch.load(weights_file, weights_only=True)
    assert {k for k in state if "neuroada_" in k} == {
        f"base_model.model.{n}.neuroada_{kind}" for n in case.targets for kind in ("theta", "indices", "fingerprint")
    }
    loaded = PeftModel.from_pretrained(case.build_model(), tmp_path)
    saved_config = {**model.peft_config["default"].to_dict(), "inference_mode": True, "auto_mapping": None}
    assert {**loaded.peft_config["default"].to_dict(), "auto_mapping": None} == saved_config
    assert torch.equal(output(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_with_low_cpu_mem_usage(case, tmp_path):
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    expected = output(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build_model(), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(output(loaded), expected)
    loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    loaded.set_adapter("again")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(output(loaded), expected)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_updates_exactly_the_adapter(case):
    model = get_peft_model(case.build_model(), case.neuroada())
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("neuroada_theta.default" in n or "modules_to_save.default" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable and "neuroada_theta" in name:
            assert (param != before[name]).all(), f"{name}: some theta did not move"
        elif name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not move"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"


# --------------------------------------------------------------------------- disable and delete


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapters(case):
    base = case.build_model()
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    adapted = output(model)
    assert not torch.allclose(adapted, output(base))
    with model.disable_adapter():
        assert torch.equal(output(model), output(base))
    assert torch.equal(output(model), adapted)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapters_with_merging(case):
    base = case.build_model()
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    randomise(model)
    adapted = output(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output(model), output(base), rtol=0, atol=0)
    torch.testing.assert_close(output(model), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_delete_adapter(case):
    model = get_peft_model(case.build_model(), case.neuroada())
    model.add_adapter("other", case.neuroada(init_weights=False))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other" in n for n in model.state_dict())
    for layer in adapted_layers(model).values():
        assert "other" not in layer.neuroada_theta and "other" not in layer.neuroada_indices
    # Deleting the active adapter leaves the remaining one active, as in PEFT.
    model.add_adapter("other", case.neuroada(init_weights=False))
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and list(model.peft_config) == ["other"]
    assert all(layer.active_adapters == ["other"] for layer in adapted_layers(model).values())


# --------------------------------------------------------------------------- several adapters


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_random_adapters_differ_and_are_reproducible(case):
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    model.add_adapter("other", case.neuroada(init_weights=False))
    again = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    for name, layer in adapted_layers(model).items():
        assert not torch.equal(layer.neuroada_theta["default"], layer.neuroada_theta["other"])
        assert torch.equal(layer.neuroada_theta["default"], adapted_layers(again)[name].neuroada_theta["default"])
        # Selection depends on the weights and config only (TRL copies theta between adapters).
        assert torch.equal(layer.neuroada_indices["default"], layer.neuroada_indices["other"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_several_active_adapters_differ_and_combine(case):
    base = case.build_model()
    model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    model.add_adapter("other", case.neuroada(init_weights=False))
    if "modules_to_save" in case.config:
        # PEFT allows one active modules_to_save copy at a time, for every tuner: same refusal as LoRA.
        lora = get_peft_model(case.build_model(), case.lora())
        lora.add_adapter("other", case.lora())
        for peft_model in (model, lora):
            with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
                peft_model.base_model.set_adapter(["default", "other"])
        return
    outputs = {}
    for active in (["default"], ["other"], ["default", "other"]):
        model.base_model.set_adapter(active)
        outputs[tuple(active)] = output(model)
        reference = dense_reference(base, model, active)
        torch.testing.assert_close(outputs[tuple(active)], output(reference).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[("default",)], outputs[("other",)])
    assert not torch.allclose(outputs[("default", "other")], outputs[("default",)])
    # Merging both gives the same model as running both.
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(output(model), outputs[("default", "other")], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_precision_forward_with_and_without_autocast(case, dtype):
    base = case.build_model()
    reference_model = get_peft_model(case.build_model(), case.neuroada(init_weights=False))
    reference = output(reference_model)
    for autocast_adapter_dtype in (True, False):
        model = get_peft_model(
            case.build_model(dtype=dtype),
            case.neuroada(init_weights=False),
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        theta_dtype = torch.float32 if autocast_adapter_dtype else dtype
        assert adapter_dtypes(model, "neuroada_theta") == {theta_dtype}
        result = output(model)
        assert result.dtype == dtype
        torch.testing.assert_close(result.float(), reference, rtol=5e-2, atol=5e-2)
        with torch.autocast("cpu", dtype=dtype):
            autocast_result = model(X)
        torch.testing.assert_close(autocast_result.float(), reference, rtol=5e-2, atol=5e-2)
    del base


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no-autocast"])
def test_adapter_dtype_follows_peft_on_every_entry_point(case, dtype, autocast_adapter_dtype, tmp_path):
    """get_peft_model, add_adapter, from_pretrained and load_adapter give theta LoRA's dtype."""
    flag = {"autocast_adapter_dtype": autocast_adapter_dtype}
    results = {}
    for prefix, make_config in (("lora_", case.lora), ("neuroada_", case.neuroada)):
        seen = []
        model = get_peft_model(case.build_model(dtype=dtype), make_config(), **flag)
        seen.append(adapter_dtypes(model, prefix))
        model.add_adapter("other", make_config(), **flag)
        seen.append({p.dtype for n, p in model.named_parameters() if f".{prefix}" in n and ".other" in n})
        model.save_pretrained(tmp_path / prefix)
        loaded = PeftModel.from_pretrained(case.build_model(dtype=dtype), tmp_path / prefix, **flag)
        seen.append(adapter_dtypes(loaded, prefix))
        loaded.load_adapter(tmp_path / prefix, adapter_name="again", **flag)
        seen.append({p.dtype for n, p in loaded.named_parameters() if f".{prefix}" in n and ".again" in n})
        results[prefix] = seen
    assert results["neuroada_"] == results["lora_"]
    assert results["lora_"] == [{torch.float32 if autocast_adapter_dtype else dtype}] * 4


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("pinned", ["float32", "bfloat16", "float64"])
def test_explicit_theta_dtype_wins_over_the_flag(pinned, autocast_adapter_dtype, tmp_path):
    case = CASES[0]
    model = get_peft_model(
        case.build_model(dtype=torch.bfloat16),
        case.neuroada(theta_dtype=pinned),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    assert adapter_dtypes(model, "neuroada_theta") == {getattr(torch, pinned)}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        case.build_model(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype
    )
    assert adapter_dtypes(loaded, "neuroada_theta") == {getattr(torch, pinned)}


def test_fp64_base_keeps_fp64_theta_like_lora():
    case = CASES[0]
    neuroada = get_peft_model(case.build_model(dtype=torch.float64), case.neuroada())
    lora = get_peft_model(case.build_model(dtype=torch.float64), case.lora())
    assert adapter_dtypes(neuroada, "neuroada_theta") == adapter_dtypes(lora, "lora_") == {torch.float64}


# --------------------------------------------------------------------------- requires_grad


def _requires_grad_story(case: Case, make_config, prefix: str, tmp_path) -> list[dict]:
    """Drive a model through PEFT's adapter-management calls; record which adapters train after each."""
    story = []
    model = get_peft_model(case.build_model(), make_config())
    story.append(trainable_pattern(model, prefix))
    model.add_adapter("other", make_config())
    story.append(trainable_pattern(model, prefix))
    model.set_adapter("other")
    story.append(trainable_pattern(model, prefix))
    model.set_adapter("default")
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(case.build_model(), tmp_path, is_trainable=True)
    story.append(trainable_pattern(loaded, prefix))
    loaded.load_adapter(tmp_path, adapter_name="trainable", is_trainable=True)
    story.append(trainable_pattern(loaded, prefix))
    loaded.load_adapter(tmp_path, adapter_name="frozen", is_trainable=False)
    story.append(trainable_pattern(loaded, prefix))
    loaded.set_adapter("trainable")
    story.append(trainable_pattern(loaded, prefix))

    frozen = PeftModel.from_pretrained(case.build_model(), tmp_path)
    story.append(trainable_pattern(frozen, prefix))
    return story


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_requires_grad_after_load_and_set_adapter_matches_lora(case, tmp_path):
    neuroada = _requires_grad_story(case, case.neuroada, "neuroada_", tmp_path / "neuroada")
    lora = _requires_grad_story(case, case.lora, "lora_", tmp_path / "lora")
    assert neuroada == lora
    # Sanity of the oracle: a fresh model trains its adapter, base weights never train.
    assert neuroada[0][("default", "adapter")] and not neuroada[0][("<base>", "base")]
