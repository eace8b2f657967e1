"""NeuroAda on bitsandbytes-quantized bases (QLoRA-style): 4-bit NF4/FP4 (any compute dtype) and 8-bit.

Every check compares against an independent reference built from the dequantized weight:
selection == per-row top-|W|, forward == the base layer's own output + a dense bypass,
gradients == the dense formula and reach theta only, merge == dequantize + ``W[i, idx] += theta``
+ re-quantize, and an adapter trained on the 4-bit base merges into the full-precision original
exactly as ``W[i, idx] += theta``. bitsandbytes 0.50 runs all of it on the CPU.

Each 4-bit check runs in both layouts bitsandbytes gives a weight on the CPU (``tests/bnb_layouts.py``):
``standard``, and ``packed`` (what an eval forward leaves on CPUs with AVX512-BF16), whose references
are taken from the standard layout before the packing, and whose logits are compared with logits of
the same kernel (both models evaluated without gradients).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeuroAdaConfig, NeuroAdaLayer
from neuroada_plugin.errors import UnsupportedTargetError
from neuroada_plugin.kit.bnb_cpu_layout import is_packed_for_cpu
from neuroada_plugin.kit.quantized import dequantize_weight
from neuroada_plugin.neuroada.bnb import QuantizedLinear

from bnb_layouts import (
    LAYOUTS,
    NO_PACKING_REASON,
    PACKING_CPU,
    dequantized_as_loaded,
    dequantized_as_packed,
    linear4bit_layers,
    load_bnb,
    pack_by_eval_forward,
    quantization_layouts,
    use_layout,
)
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 48000], [1, 2, 3, 4, 5, 6, 7, 8]])

# name -> BitsAndBytesConfig kwargs
QUANTIZATIONS = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16-double": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    ),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
LAYER_CLASS = {"int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def full_precision_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-fp32")
    tiny_llama(seed=3).save_pretrained(folder)
    return folder


def load_quantized(folder: Path, quantization: str):
    return load_bnb(folder, QUANTIZATIONS[quantization])


def neuroada_layers(model) -> dict[str, QuantizedLinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}
    assert len(layers) == 14
    return layers


def dense_delta(layer: NeuroAdaLayer, name: str = "default") -> torch.Tensor:
    """Independent reference: an [out, in] zero matrix with theta written at (i, idx[i, j])."""
    theta = layer.neuroada_theta[name].detach().float()
    indices = layer.neuroada_indices[name]
    delta = torch.zeros(layer.out_features, layer.in_features)
    for i in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            delta[i, indices[i, j]] += theta[i, j]
    return delta


@pytest.mark.parametrize(("quantization", "layout"), quantization_layouts(list(QUANTIZATIONS)))
def test_quantized_layers_select_forward_and_train_theta_only(full_precision_dir, quantization, layout):
    """``packed``: the model ran an eval forward before ``get_peft_model`` (bitsandbytes packed every 4-bit
    layer), so selection must read the packed layout: the reference is what the packed layer computes with."""
    model = load_quantized(full_precision_dir, quantization)
    expected_class = LAYER_CLASS.get(quantization, bnb.nn.Linear4bit)
    reference_weights = {
        name: (dequantized_as_packed(m) if layout == "packed" else dequantized_as_loaded(m))
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    use_layout(model, layout, TOKENS)
    with torch.no_grad():
        base_logits = model(TOKENS).logits
    peft_model = get_peft_model(model, NeuroAdaConfig(top_k=3))
    # Zero init: the adapted model computes exactly what the quantized base computed (same kernels: no grad).
    with torch.no_grad():
        assert torch.equal(peft_model(TOKENS).logits, base_logits)

    for name, layer in neuroada_layers(peft_model).items():
        assert isinstance(layer, QuantizedLinear) and isinstance(layer.base_layer, expected_class), name
        assert (layer.out_features, layer.in_features) == (layer.base_layer.out_features, layer.base_layer.in_features)
        # Selection == per-row top-|W| of the weight the layer computes with (compared by value: NF4 levels tie).
        key = name.removeprefix("base_model.model.")
        reference = reference_weights.get(key)
        if reference is None:  # 8-bit: read by the plugin's dequantizer (no other layout exists)
            reference = dequantize_weight(layer.base_layer)
        else:
            assert torch.equal(dequantize_weight(layer.base_layer), reference), name
        magnitude = reference.float().abs()
        indices = layer.neuroada_indices["default"]
        assert indices.shape == (layer.out_features, 3)
        assert all(len(set(row.tolist())) == 3 for row in indices)
        chosen = magnitude.gather(1, indices).sort(dim=1, descending=True).values
        assert torch.equal(chosen, magnitude.topk(3, dim=1).values), name

    # Forward == base layer's own (quantized) output + dense bypass; gradients by the dense formula.
    torch.manual_seed(0)
    for layer in neuroada_layers(peft_model).values():
        with torch.no_grad():
            layer.neuroada_theta["default"].normal_(0, 0.05)
    checked = list(neuroada_layers(peft_model).values())
    for layer in checked[:3] + checked[-2:]:  # q/k/v of layer 0 (64->64, 64->32), up/down of layer 1
        x = torch.randn(2, 5, layer.in_features, requires_grad=True)
        upstream = torch.randn(2, 5, layer.out_features)
        out = layer(x)
        with torch.no_grad():
            reference = layer.base_layer(x) + x @ dense_delta(layer).T
        torch.testing.assert_close(out, reference.to(out.dtype), rtol=1e-5, atol=1e-5)
        theta = layer.neuroada_theta["default"]
        theta.grad = None
        (out * upstream).sum().backward()
        indices = layer.neuroada_indices["default"]
        flat_x, flat_g = x.detach().reshape(-1, layer.in_features), upstream.reshape(-1, layer.out_features)
        expected_grad = torch.einsum("ti,tij->ij", flat_g, flat_x[:, indices])
        torch.testing.assert_close(theta.grad, expected_grad, rtol=1e-4, atol=1e-5)

    # A training step through the whole model: gradients reach theta and nothing else.
    for parameter in peft_model.parameters():
        parameter.grad = None
    peft_model(TOKENS, labels=TOKENS).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert len(trainable) == 14 and all(".neuroada_theta.default" in n for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if n in with_grad)


@pytest.mark.parametrize(("quantization", "layout"), quantization_layouts(["nf4-bf16-double", "fp4-fp32", "int8"]))
def test_merge_requantizes_with_a_warning_and_unmerge_restores_the_quantized_bytes(
    full_precision_dir, quantization, layout
):
    """``packed``: an eval forward after ``get_peft_model`` (an evaluation during training) packed every 4-bit layer;
    the merge must read the weights the adapter was created on, and unmerge must bring back the packed bytes."""
    model = load_quantized(full_precision_dir, quantization)
    loaded = {name: dequantized_as_loaded(m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if layout == "standard":
        use_layout(model, layout, TOKENS)
    peft_model = get_peft_model(model, NeuroAdaConfig(top_k=2))
    layers = neuroada_layers(peft_model)
    torch.manual_seed(1)
    for layer in layers.values():
        with torch.no_grad():
            layer.neuroada_theta["default"].normal_(0, 0.1)
    if layout == "packed":
        use_layout(peft_model, layout, TOKENS)
    before = {n: layer.base_layer.weight.data.clone() for n, layer in layers.items()}
    # Independent reference: the weight as loaded (bitsandbytes' own dequantization, taken before any
    # packing), plus theta at the selected entries, quantized again with bitsandbytes.
    expected = {}
    for name, layer in layers.items():
        original = loaded.get(name.removeprefix("base_model.model."))
        if original is None:  # 8-bit: one layout only
            original = dequantize_weight(layer.base_layer)
        else:
            assert torch.equal(dequantize_weight(layer.base_layer), original), name
        dense = (original.float() + dense_delta(layer)).to(original.dtype)
        if quantization == "int8":
            requantized = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to("cpu")
            expected[name] = bnb.functional.int8_vectorwise_dequant(requantized.data, requantized.SCB)
        else:
            weight = layer.base_layer.weight
            requantized = bnb.nn.Params4bit(
                dense,
                requires_grad=False,
                quant_type=weight.quant_type,
                blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics,
                quant_storage=weight.quant_storage,
            ).to("cpu")
            expected[name] = bnb.functional.dequantize_4bit(requantized.data, requantized.quant_state)

    with torch.no_grad():
        adapter_logits = peft_model(TOKENS).logits
    with pytest.warns(UserWarning, match=r"re-quantized, which rounds.*neuroada-plugin merge --base"):
        peft_model.merge_adapter()
    # (Reading the packed bytes as standard ones gave merged weights 0.1 away from these on a layer of this model.)
    for name, layer in layers.items():
        assert torch.equal(dequantize_weight(layer.base_layer), expected[name]), name
    if layout == "packed":  # the merged weight is packed by the next eval forward, and read back the same
        use_layout(peft_model, layout, TOKENS)
        for name, layer in layers.items():
            assert torch.equal(dequantize_weight(layer.base_layer), expected[name]), name

    peft_model.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight.data, before[name]), name
    with torch.no_grad():
        assert torch.equal(peft_model(TOKENS).logits, adapter_logits)

    with pytest.warns(UserWarning, match="rounds"):
        unloaded = peft_model.merge_and_unload()
    for name, module in unloaded.named_modules():
        if name in {n.removeprefix("base_model.model.") for n in layers}:
            assert type(module) is LAYER_CLASS.get(quantization, bnb.nn.Linear4bit)
            assert torch.equal(dequantize_weight(module), expected["base_model.model." + name]), name
    # The plain model goes back unhooked, in bitsandbytes' standard layout.
    for module in linear4bit_layers(unloaded):
        assert not module._forward_pre_hooks and not module._state_dict_pre_hooks
        assert not is_packed_for_cpu(module.weight)


@pytest.mark.skipif(not PACKING_CPU, reason=NO_PACKING_REASON)
@pytest.mark.parametrize("quantization", ["nf4-fp32", "nf4-bf16-double"])
def test_training_after_an_eval_forward_gets_the_gradients_of_the_weights_as_loaded(full_precision_dir, quantization):
    """An evaluation packs every 4-bit layer (also those without an adapter); bitsandbytes' packed kernel then
    returns no gradient for its input, so without the plugin's guard every theta below the top layer would get
    a gradient that misses the paths through the frozen 4-bit matmuls. With it, training resumes exactly."""
    model = load_quantized(full_precision_dir, quantization)
    config = NeuroAdaConfig(top_k=2, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)  # o/k/gate/up stay plain 4-bit layers: guarded too
    peft_model.train()

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        peft_model.zero_grad()
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    loss, gradients = loss_and_gradients()
    layers = linear4bit_layers(peft_model)
    assert len(layers) == 14 and not any(is_packed_for_cpu(layer.weight) for layer in layers)
    pack_by_eval_forward(peft_model, TOKENS)
    loss_after_eval, gradients_after_eval = loss_and_gradients()
    assert not any(is_packed_for_cpu(layer.weight) for layer in layers)
    assert torch.equal(loss_after_eval, loss)
    assert len(gradients) == 6 and all(g.abs().sum() > 0 for g in gradients.values())
    for name, gradient in gradients.items():
        assert torch.equal(gradients_after_eval[name], gradient), name


_FRESH_LOAD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    base_dir, adapter_dir, out = sys.argv[1:4]
    settings = json.loads(sys.argv[4])
    settings["bnb_4bit_compute_dtype"] = torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
        )
    if sys.argv[5] == "standard":  # as tests/bnb_layouts.py: bitsandbytes never packs for its CPU kernel
        for module in base.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, adapter_dir)  # no import of neuroada_plugin: the start-up hook
    tokens = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 48000], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(tokens).logits
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    torch.save({"logits": logits, "kind": type(layer).__name__, "indices": layer.neuroada_indices["default"]}, out)
    """
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_trained_on_4bit_saves_and_loads_in_a_fresh_process(full_precision_dir, tmp_path, layout):
    """``packed``: the layers were packed by an eval forward before training (as by an evaluation during a run):
    training restores the layout bitsandbytes trains in, and the base weights stay exactly as loaded."""
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    model = load_quantized(full_precision_dir, "nf4-fp32")
    loaded = {
        name: (p.data.clone(), p.quant_state.absmax.clone())
        for name, p in model.named_parameters()
        if p.dtype == torch.uint8
    }
    if layout == "standard":
        use_layout(model, layout, TOKENS)
    peft_model = get_peft_model(model, NeuroAdaConfig(top_k=2))
    if layout == "packed":
        use_layout(peft_model, layout, TOKENS)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.save_pretrained(tmp_path / "adapter")
    for name, param in peft_model.base_model.model.named_parameters():
        if param.dtype == torch.uint8:  # every 4-bit weight: its codes and block scales exactly as loaded
            assert not is_packed_for_cpu(param), name  # training and saving use the standard layout
            data, absmax = loaded[name.replace(".base_layer", "")]
            assert torch.equal(param.data, data) and torch.equal(param.quant_state.absmax, absmax), name
    peft_model.eval()  # inference, as in the fresh process below (where the CPU packs, both pack here)
    with torch.no_grad():
        expected = peft_model(TOKENS).logits

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 42 and not any("base_layer" in key or "weight" in key for key in saved)
    key = "base_model.model.model.layers.0.mlp.down_proj.neuroada_indices"
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert torch.equal(saved[key], layer.neuroada_indices["default"])

    out = tmp_path / "fresh.pt"
    subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_LOAD,
            str(full_precision_dir),
            str(tmp_path / "adapter"),
            str(out),
            json.dumps(settings),
            layout,
        ],
        check=True,
        cwd=ROOT,
        timeout=240,
    )
    fresh = torch.load(out)
    assert fresh["kind"] == "Linear4bit"
    assert torch.equal(fresh["indices"], layer.neuroada_indices["default"])
    assert torch.equal(fresh["logits"], expected)


def test_merge_cli_into_the_full_precision_original_equals_w_plus_theta(full_precision_dir, tmp_path):
    peft_model = get_peft_model(load_quantized(full_precision_dir, "nf4-bf16-double"), NeuroAdaConfig(top_k=2))
    torch.manual_seed(2)
    for layer in neuroada_layers(peft_model).values():
        with torch.no_grad():
            layer.neuroada_theta["default"].normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")

    subprocess.run(
        [
            sys.executable,
            "-m",
            "neuroada_plugin",
            "merge",
            "--base",
            str(full_precision_dir),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output",
            str(tmp_path / "merged"),
        ],
        check=True,
        cwd=ROOT,
        timeout=240,
    )
    original = load_file(full_precision_dir / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    patched = 0
    for key, weight in original.items():
        module = key.removesuffix(".weight")
        theta_key = f"base_model.model.{module}.neuroada_theta"
        if theta_key not in adapter:
            assert torch.equal(merged[key], weight), key
            continue
        reference = weight.clone()
        indices, theta = adapter[f"base_model.model.{module}.neuroada_indices"], adapter[theta_key]
        for i in range(indices.shape[0]):
            for j in range(indices.shape[1]):
                reference[i, indices[i, j]] = weight[i, indices[i, j]] + theta[i, j]
        assert torch.equal(merged[key], reference), key
        patched += 1
    assert patched == 14
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["method"] == "neuroada" and info["exact_merge"] is True and info["dtype"] == "F32"
    assert info["base_quantization"] is None  # merged into the full-precision original
    # PEFT 0.21 does not record the training quantization in the adapter folder; when a model card
    # carries PEFT's "quantization config was used during training" section, the merge records it.
    assert info["adapter_training_quantization"] is None
    card = tmp_path / "adapter" / "README.md"
    card.write_text(
        card.read_text()
        + "\n## Training procedure\n\nThe following `bitsandbytes` quantization config was used during training:\n"
        + "- quant_method: bitsandbytes\n- load_in_4bit: True\n- bnb_4bit_quant_type: nf4\n\n### Framework versions\n"
    )
    subprocess.run(
        [sys.executable, "-m", "neuroada_plugin", "merge", "--base", str(full_precision_dir), "--adapter",
         str(tmp_path / "adapter"), "--output", str(tmp_path / "merged2")],
        check=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    info = json.loads((tmp_path / "merged2" / "merge_info.json").read_text())
    assert info["adapter_training_quantization"] == {
        "quant_method": "bitsandbytes",
        "load_in_4bit": "True",
        "bnb_4bit_quant_type": "nf4",
    }

    # The merged full-precision model computes what the adapter computes on the unquantized base.
    fp_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(full_precision_dir), tmp_path / "adapter"
    )
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged_model(TOKENS).logits, fp_adapter(TOKENS).logits, rtol=1e-5, atol=1e-5)


class _FakeGPTQLinear(torch.nn.Module):
    """Stands in for a GPTQ/AWQ layer: packed integer weights, no bitsandbytes class."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 64, 128
        self.register_buffer("qweight", torch.zeros(8, 128, dtype=torch.int32))


def test_other_quantization_schemes_are_refused_naming_what_is_supported():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj = _FakeGPTQLinear()
    with pytest.raises(UnsupportedTargetError, match=r"up_proj \(_FakeGPTQLinear\).*bitsandbytes Linear4bit") as info:
        get_peft_model(model, NeuroAdaConfig())
    assert "Linear8bitLt" in str(info.value)
    assert not any(isinstance(m, NeuroAdaLayer) for m in model.modules())


@pytest.mark.parametrize(("quantization", "layout"), quantization_layouts(["nf4-bf16-double", "int8"]))
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_saved_adapter_reloads_onto_the_quantized_base_exactly(
    full_precision_dir, tmp_path, quantization, layout, low_cpu_mem_usage
):
    """``packed``: saved after an eval forward packed the base; both models are compared packed, as users run them."""
    model = load_quantized(full_precision_dir, quantization)
    if layout == "standard":
        use_layout(model, layout, TOKENS)
    peft_model = get_peft_model(model, NeuroAdaConfig(top_k=2, init_weights=False))
    if layout == "packed":
        use_layout(peft_model, layout, TOKENS)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(TOKENS).logits
    base = load_quantized(full_precision_dir, quantization)
    if layout == "standard":
        use_layout(base, layout, TOKENS)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
    layers, saved_layers = neuroada_layers(loaded), neuroada_layers(peft_model)
    for name, layer in layers.items():
        assert type(layer) is type(saved_layers[name])
        assert torch.equal(layer.neuroada_indices["default"], saved_layers[name].neuroada_indices["default"]), name
        assert torch.equal(layer.neuroada_theta["default"], saved_layers[name].neuroada_theta["default"]), name
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, expected)
