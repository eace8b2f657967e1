"""NEAT on bitsandbytes-quantized bases (4-bit NF4/FP4 and 8-bit): its update is a function of the dequantized weight.

NEAT's ``dW = s * B @ act(A @ W0)`` reads W0 in forward and backward; on a quantized base it reads the
weight the layer computes with (dequantized one layer at a time). Every check compares against an
independent reference built from bitsandbytes' own dequantization of the weight as loaded, in float64:
forward and gradients, the merge (dequantize, add ``dW(W0)``, quantize again with bitsandbytes), the
exact unmerge, reloading, and the merge of an adapter trained on a 4-bit/8-bit base into the
full-precision original, whose update must be computed from the weight it was trained against
(the original re-quantized with the recorded settings), not from the original itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeatConfig
from neuroada_plugin.kit.quantized import dequantize_weight
from neuroada_plugin.kit.quantized_write import reproduce_quantized
from neuroada_plugin.neat import NeatLayer

from bnb_layouts import dequantized_as_loaded, dequantized_as_packed, load_bnb, quantization_layouts, use_layout
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 48000], [1, 2, 3, 4, 5, 6, 7, 8]])
QUANTIZATIONS = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16-double-bf16storage": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,  # FSDP-QLoRA's storage: a float dtype that is not the weight's
    ),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
CONFIG = dict(r=4, depth=1, act_fn="silu", scaling=0.5, init_weights=False)


@pytest.fixture(scope="module")
def full_precision_dir(tmp_path_factory) -> Path:
    """A float32 checkpoint, loaded in bf16 for quantization (so the merge must cast as loading did)."""
    folder = tmp_path_factory.mktemp("tiny-fp32")
    tiny_llama(seed=5).save_pretrained(folder)
    return folder


def load_quantized(folder: Path, quantization: str):
    return load_bnb(folder, QUANTIZATIONS[quantization], dtype=torch.bfloat16)


def loaded_weights(model, packed_before_creation: bool = False) -> dict[str, torch.Tensor]:
    """bitsandbytes' own dequantization of every quantized linear layer, taken before any packing: what the
    layer computes with as loaded, or once packed (``packed_before_creation``: the adapter is created on a
    packed layer, so that is the weight it reads)."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name] = dequantized_as_packed(module) if packed_before_creation else dequantized_as_loaded(module)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name] = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return weights


def neat_layers(model) -> dict[str, NeatLayer]:
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, NeatLayer)}
    assert len(layers) == 14
    return layers


def reference_delta(weight: torch.Tensor, layer: NeatLayer, name: str = "default") -> torch.Tensor:
    """``s * B @ P(W)`` in float64, written out from the paper's formula (silu, one residual pair)."""
    f64 = torch.float64
    a, b = layer.neat_A[name].detach().to(f64), layer.neat_B[name].detach().to(f64)
    enc, dec = layer.neat_E[name].detach().to(f64), layer.neat_D[name].detach().to(f64)
    features = torch.nn.functional.silu(a @ weight.to(f64))
    residual = features
    features = torch.nn.functional.silu(enc[0] @ features)
    features = torch.nn.functional.silu(dec[0] @ features) + residual
    return layer.neat_scaling[name] * (b @ features)


@pytest.mark.parametrize(("quantization", "layout"), quantization_layouts(list(QUANTIZATIONS)))
def test_forward_and_gradients_equal_the_dense_reference_of_the_dequantized_weight(
    full_precision_dir, quantization, layout
):
    """``packed``: an eval forward packed every 4-bit layer before the adapter was created."""
    model = load_quantized(full_precision_dir, quantization)
    weights = loaded_weights(model, packed_before_creation=layout == "packed")
    use_layout(model, layout, TOKENS)
    peft_model = get_peft_model(model, NeatConfig(**CONFIG))
    layers = neat_layers(peft_model)
    recorded = peft_model.peft_config["default"].base_quantization
    assert sorted(m for group in recorded for m in group["modules"]) == sorted(layers)
    if layout == "standard":  # the recorded settings reproduce each weight from the full-precision original
        original = load_file(full_precision_dir / "model.safetensors")
        for group in recorded:
            for module in group["modules"]:
                reproduced = reproduce_quantized(original[f"{module}.weight"], group["settings"])
                assert torch.equal(reproduced, weights[module]), module

    torch.manual_seed(0)
    for name, layer in layers.items():
        # float32 adapter tensors on every quantized base (also the bf16 storage of FSDP-QLoRA)
        assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if "neat_" in n), name
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        expected = x @ reference_delta(weights[name], layer).T
        out = layer.adapter_output(x.float(), "default")
        torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=1e-5)

        # Gradients of every adapter tensor: autograd through the float64 formula as the reference.
        params = {k: layer._tensors("default")[i] for i, k in enumerate("ABED")}
        grads = torch.autograd.grad(out.sum(), list(params.values()))
        ref_params = {k: p.detach().double().requires_grad_(True) for k, p in params.items()}
        w = weights[name].double()
        features = torch.nn.functional.silu(ref_params["A"] @ w)
        residual = features
        features = torch.nn.functional.silu(ref_params["E"][0] @ features)
        features = torch.nn.functional.silu(ref_params["D"][0] @ features) + residual
        ref_out = x @ (layer.neat_scaling["default"] * (ref_params["B"] @ features)).T
        ref_grads = torch.autograd.grad(ref_out.sum(), list(ref_params.values()))
        for key, grad, ref in zip(params, grads, ref_grads, strict=True):
            torch.testing.assert_close(grad.double(), ref, rtol=2e-4, atol=1e-4, msg=f"{name} d{key}")

    # Training the whole model: only NEAT's tensors get gradients; nothing weight-sized in float is saved.
    peft_model.train()
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft_model(TOKENS, labels=TOKENS).loss.backward()
    shapes = {(layer.out_features, layer.in_features) for layer in layers.values()}
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]
    assert not dense, f"weight-sized float tensors saved for backward: {dense}"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == trainable and len(trainable) == 14 * 4
    assert all(".neat_" in n for n in trainable)


@pytest.mark.parametrize(("quantization", "layout"), quantization_layouts(["nf4-bf16-double-bf16storage", "int8"]))
def test_merge_requantizes_from_the_pre_merge_weight_and_unmerge_restores_the_bytes(
    full_precision_dir, quantization, layout
):
    """``packed``: an eval forward after the adapters were created (an evaluation during training) packed every
    4-bit layer; the merge reads the weights as loaded and unmerge brings back the packed bytes."""
    model = load_quantized(full_precision_dir, quantization)
    weights = loaded_weights(model)
    if layout == "standard":
        use_layout(model, layout, TOKENS)
    peft_model = get_peft_model(model, NeatConfig(**CONFIG))
    peft_model.add_adapter("second", NeatConfig(**{**CONFIG, "r": 2}))
    layers = neat_layers(peft_model)
    if layout == "packed":
        use_layout(peft_model, layout, TOKENS)
    before = {n: layer.base_layer.weight.data.view(torch.uint8).clone() for n, layer in layers.items()}  # bytes
    with torch.no_grad():
        unmerged_logits = peft_model(TOKENS).logits

    def quantized_like(layer: NeatLayer, dense: torch.Tensor) -> torch.Tensor:
        """Independent reference of a merge: ``dense`` quantized by bitsandbytes with the layer's settings, read back."""
        weight = layer.base_layer.weight
        if quantization == "int8":
            q = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to("cpu")
            return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB)
        q = bnb.nn.Params4bit(
            dense, requires_grad=False, quant_type=weight.quant_type, blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics, quant_storage=weight.quant_storage,
        ).to("cpu")  # fmt: skip
        return bnb.functional.dequantize_4bit(q.data, q.quant_state)

    with pytest.warns(UserWarning, match=r"quantized again, which rounds.*neuroada-plugin merge --base"):
        peft_model.merge_adapter(["default"])
    first = {}
    for name, layer in layers.items():
        w = weights[name]
        expected = quantized_like(layer, (w.double() + reference_delta(w, layer)).to(w.dtype))
        merged = dequantize_weight(layer.base_layer)
        # The float32 merge arithmetic and the float64 reference may round a value across a quantization
        # boundary: compare the merged weight, not the codes, with a bound of one quantization step.
        step = (w.float().abs().max() / (7 if quantization == "int8" else 3)).item()
        assert (merged.float() - expected.float()).abs().max() <= step, name
        assert (merged.float() != expected.float()).float().mean() < 0.01, name
        first[name] = merged
    # A second adapter merged on top reads the weight from before the first merge (kept as its quantized bytes).
    with pytest.warns(UserWarning, match="rounds"):
        peft_model.merge_adapter(["second"])
    for name, layer in layers.items():
        w = weights[name]
        expected = quantized_like(layer, (first[name].double() + reference_delta(w, layer, "second")).to(w.dtype))
        merged = dequantize_weight(layer.base_layer)
        assert (merged.float() != expected.float()).float().mean() < 0.01, name

    peft_model.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight.data.view(torch.uint8), before[name]), name
        assert torch.equal(dequantize_weight(layer.base_layer), weights[name]), name
    with torch.no_grad():
        assert torch.equal(peft_model(TOKENS).logits, unmerged_logits)


@pytest.fixture(scope="module")
def trained_on_4bit(full_precision_dir, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A NEAT adapter trained 3 steps on the NF4 base (double quantization, bf16), saved; and the weights it saw."""
    model = load_quantized(full_precision_dir, "nf4-bf16-double-bf16storage")
    weights = loaded_weights(model)
    use_layout(model, "standard", TOKENS)
    peft_model = get_peft_model(model, NeatConfig(r=4, depth=1, act_fn="silu"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        logits = peft_model(TOKENS).logits
    folder = tmp_path_factory.mktemp("neat-nf4") / "adapter"
    peft_model.save_pretrained(folder)
    torch.save(logits, folder.parent / "logits.pt")
    return folder, weights


def test_adapter_trained_on_4bit_records_the_quantization_and_reloads_exactly(full_precision_dir, trained_on_4bit):
    folder, _ = trained_on_4bit
    config = json.loads((folder / "adapter_config.json").read_text())
    (group,) = config["base_quantization"]
    assert group["settings"] == {
        "kind": "bnb_4bit", "quant_type": "nf4", "blocksize": 64, "compress_statistics": True, "dtype": "bfloat16",
    }  # fmt: skip
    assert len(group["modules"]) == 14
    tensors = load_file(folder / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if ".neat_" in k)

    model = load_quantized(full_precision_dir, "nf4-bf16-double-bf16storage")
    use_layout(model, "standard", TOKENS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = PeftModel.from_pretrained(model, folder)
    assert not [w for w in caught if "quantized base" in str(w.message)]  # loaded onto the base it was trained on
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, torch.load(folder.parent / "logits.pt"))
    # On the full-precision original the adapter reproduces the quantized weight it was trained against: every
    # layer adds exactly the update it adds on the 4-bit base (the base matmuls themselves differ).
    fp_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full_precision_dir), folder)
    quantized_layers, fp_layers = neat_layers(reloaded), neat_layers(fp_model)
    for name, layer in fp_layers.items():
        x = torch.randn(3, layer.in_features)
        assert layer.reproduced_quantization == {"default": group["settings"]}, name
        assert not quantized_layers[name].reproduced_quantization, name
        with torch.no_grad():
            assert torch.equal(layer.adapter_output(x, "default"), quantized_layers[name].adapter_output(x, "default"))


def merge_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuroada_plugin", "merge", "--no-progress", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip


def test_merge_into_the_full_precision_original_computes_the_update_from_the_requantized_weight(
    full_precision_dir, trained_on_4bit, tmp_path
):
    folder, weights = trained_on_4bit
    out = merge_cli("--base", full_precision_dir, "--adapter", folder, "--output", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    original = load_file(full_precision_dir / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full_precision_dir), folder)
    layers = neat_layers(reloaded)
    for key, weight in original.items():
        module = key.removesuffix(".weight")
        if module not in layers:
            assert torch.equal(merged[key], weight), key
            continue
        # The weight it was trained against: the original quantized again exactly as loading did.
        assert torch.equal(reproduce_quantized(weight, _settings(folder)), weights[module])
        expected = weight.double() + reference_delta(weights[module], layers[module])
        wrong = weight.double() + reference_delta(weight, layers[module])  # what a merge that ignored it would give
        assert merged[key].dtype == torch.float32
        error = (merged[key].double() - expected).abs().max().item()
        assert error <= 1e-6 * expected.abs().max().item(), key
        assert (merged[key].double() - wrong).abs().max().item() > 100 * error, key
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["update_computed_from"] == "re-quantized base"
    assert info["adapter_base_quantization"][0]["settings"]["quant_type"] == "nf4"
    assert info["patch_notes"]["reproduced_fingerprint_distance"] == 0.0  # the very weight it recorded
    assert info["base_fingerprint"]["max_distance"] > 0.01  # the original itself differs from its NF4 version

    # PEFT's in-memory merge on the full-precision base reproduces the same weights, bit for bit (--verify), and
    # the merged model computes what the unmerged adapter computes on the original.
    out = merge_cli("--base", full_precision_dir, "--adapter", folder, "--output", tmp_path / "v", "--verify")
    assert out.returncode == 0, out.stderr
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged_model(TOKENS).logits, reloaded(TOKENS).logits, rtol=1e-5, atol=1e-5)


def _settings(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())["base_quantization"][0]["settings"]


def test_merge_refuses_a_base_whose_requantized_weight_is_not_the_one_trained_against(
    full_precision_dir, trained_on_4bit, tmp_path
):
    """A checkpoint 2% off (another revision) passes the coarse base check (it accepts any NF4 rounding), but
    its NF4 version is not the weight NEAT learned against: refused, nothing written; allowed on request."""
    folder, _ = trained_on_4bit
    other = tmp_path / "other"
    other.mkdir()
    for item in full_precision_dir.iterdir():
        if item.name != "model.safetensors":
            (other / item.name).write_bytes(item.read_bytes())
    save_file({k: (v * 1.02).to(v.dtype) for k, v in load_file(full_precision_dir / "model.safetensors").items()},
              other / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    out = merge_cli("--base", other, "--adapter", folder, "--output", tmp_path / "merged")
    assert out.returncode == 2, out.stderr
    assert "trained on a bnb_4bit quantization" in out.stderr and "--allow-base-mismatch" in out.stderr
    assert not (tmp_path / "merged").exists()
    out = merge_cli("--base", other, "--adapter", folder, "--output", tmp_path / "merged", "--allow-base-mismatch")
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["patch_notes"]["reproduced_fingerprint_distance"] > 0.01


def test_lora_export_of_an_adapter_trained_on_4bit_equals_its_merge(full_precision_dir, trained_on_4bit, tmp_path):
    """``neat-to-lora`` computes P from the original quantized again too: the exported LoRA on the full-precision
    original computes what the merged checkpoint computes (and what the NEAT adapter computes there)."""
    folder, _ = trained_on_4bit
    done = subprocess.run(
        [sys.executable, "-m", "neuroada_plugin", "neat-to-lora", "--base", str(full_precision_dir),
         "--adapter", str(folder), "--output", str(tmp_path / "lora")],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = merge_cli("--base", full_precision_dir, "--adapter", folder, "--output", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full_precision_dir), tmp_path / "lora")
    neat = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(full_precision_dir), folder)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        expected = merged(TOKENS).logits
        torch.testing.assert_close(lora(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(neat(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
