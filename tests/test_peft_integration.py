"""NeuroAda as a native PEFT method: injection, save/load, merge, adapters, dtypes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeuroAdaConfig, NeuroAdaLayer
from neuroada_plugin.kit.fingerprint import weight_fingerprint

from tiny_models import tiny_llama

TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 48000], [1, 2, 3, 4, 5, 6, 7, 8]])
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def base_linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "neuroada_" not in n}


def test_zero_init_leaves_outputs_unchanged_and_counts_out_times_k():
    base = tiny_llama()
    expected = logits(base)
    expected_count = sum(m.out_features * 3 for n, m in base.named_modules() if n.endswith(PROJECTIONS))
    model = get_peft_model(base, NeuroAdaConfig(top_k=3))
    assert torch.equal(logits(model), expected)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected_count == 2 * 3 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".neuroada_theta.default" in n for n in names)
    adapted = [n for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)]
    assert sorted(n.rsplit(".", 1)[-1] for n in adapted) == sorted(PROJECTIONS * 2)
    assert not any("embed" in n or "lm_head" in n for n in adapted)


def test_all_linear_excludes_output_head():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}
    assert adapted == set(PROJECTIONS)


def test_layers_to_transform_and_exclude_modules():
    config = NeuroAdaConfig(layers_to_transform=[1], layers_pattern="layers", exclude_modules=["down_proj"])
    model = get_peft_model(tiny_llama(), config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)]
    assert len(adapted) == 6 and all(".layers.1." in n and "down_proj" not in n for n in adapted)


def test_layer_forward_matches_merged_weight_and_dense_delta():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2, init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 4, layer.in_features)
    base_weight = layer.get_base_layer().weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert (delta != 0).sum(1).tolist() == [2] * layer.out_features  # exactly k per row
    torch.testing.assert_close(layer(x), x @ (base_weight + delta).T, rtol=1e-6, atol=1e-6)


@pytest.fixture
def trained_adapter(tmp_path, tiny_llama_dir) -> tuple[Path, torch.Tensor]:
    """An adapter with non-zero theta on the saved tiny Llama, plus its logits."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(base, NeuroAdaConfig(top_k=2, init_weights=False))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return out, logits(model)


def test_saved_adapter_holds_config_theta_and_integer_indices(trained_adapter):
    adapter_dir, _ = trained_adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEUROADA" and config["top_k"] == 2
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    theta_keys = [k for k in tensors if k.endswith("neuroada_theta")]
    index_keys = [k for k in tensors if k.endswith("neuroada_indices")]
    fingerprint_keys = [k for k in tensors if k.endswith("neuroada_fingerprint")]
    assert len(theta_keys) == len(index_keys) == len(fingerprint_keys) == 14 and len(tensors) == 42
    assert all(tensors[k].dtype == torch.int64 and tensors[k].shape[1] == 2 for k in index_keys)
    assert all(tensors[k].dtype == torch.float32 for k in theta_keys)
    # The base fingerprint of each layer is that of the weight the adapter was created on.
    base = dict(
        AutoModelForCausalLM.from_pretrained(
            json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        ).named_parameters()
    )
    for key in fingerprint_keys:
        weight = base[key.removeprefix("base_model.model.").replace("neuroada_fingerprint", "weight")]
        assert torch.equal(tensors[key], weight_fingerprint(weight.detach())), key


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    assert "neuroada_plugin" not in sys.modules
    mode, base_dir, adapter_dir, out = sys.argv[1:5]
    tokens = torch.tensor({tokens})
    if mode == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    elif mode == "peft_low_mem":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir, low_cpu_mem_usage=True)
    elif mode == "auto_peft":
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(adapter_dir)
        assert any("neuroada_theta" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.save(model(tokens).logits, out)
    """
).format(tokens=TOKENS.tolist())


@pytest.mark.parametrize("mode", ["peft", "peft_low_mem", "auto_peft", "transformers"])
def test_fresh_process_loads_adapter_without_importing_plugin(trained_adapter, tiny_llama_dir, tmp_path, mode):
    adapter_dir, expected = trained_adapter
    out = tmp_path / "logits.pt"
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, mode, str(tiny_llama_dir), str(adapter_dir), str(out)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert torch.equal(torch.load(out), expected)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_for_inference_never_runs_selection(trained_adapter, tiny_llama_dir, monkeypatch, low_cpu_mem_usage):
    from neuroada_plugin.neuroada import layer as layer_module

    def forbidden(*args, **kwargs):
        raise AssertionError("selection must not run when the indices come from the file")

    monkeypatch.setattr(layer_module, "select_connections", forbidden)
    adapter_dir, expected = trained_adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, low_cpu_mem_usage=low_cpu_mem_usage)
    assert torch.equal(logits(model), expected)
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(logits(model), expected)


def test_inference_mode_config_without_file_selects_on_first_use(tmp_path):
    """A deferred selection (inference_mode) still equals the eager one, also when saved first."""
    eager = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2))
    deferred = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2, inference_mode=True))
    deferred.save_pretrained(tmp_path / "deferred")
    saved = load_file(tmp_path / "deferred" / "adapter_model.safetensors")
    for name, module in eager.named_modules():
        if isinstance(module, NeuroAdaLayer):
            key = name.removesuffix("") + ".neuroada_indices"
            assert torch.equal(saved[key], module.neuroada_indices["default"])


def test_merge_and_unload_is_exact_and_removes_adapter_modules(trained_adapter, tiny_llama_dir):
    adapter_dir, expected = trained_adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_dir)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("neuroada" in n for n in merged.state_dict())
    # the merged weights differ from the base exactly at the selected entries
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj"
    w_merged = merged.model.layers[1].mlp.up_proj.weight
    w_base = base.model.layers[1].mlp.up_proj.weight
    expected_weight = w_base.detach().clone()
    expected_weight.scatter_(
        1,
        tensors[f"{key}.neuroada_indices"],
        (w_base.gather(1, tensors[f"{key}.neuroada_indices"]) + tensors[f"{key}.neuroada_theta"]).detach(),
    )
    assert torch.equal(w_merged, expected_weight)


def test_merge_unmerge_restores_base_weights_bit_for_bit():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=4, init_weights=False))
    before = base_linear_weights(model)
    adapter_logits = logits(model)
    model.merge_adapter()
    assert any(not torch.equal(p, before[n]) for n, p in base_linear_weights(model).items())
    torch.testing.assert_close(logits(model), adapter_logits, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    after = base_linear_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert torch.equal(logits(model), adapter_logits)


def test_disable_adapter_gives_base_outputs_also_when_merged():
    base = tiny_llama()
    expected_base = logits(base)
    model = get_peft_model(base, NeuroAdaConfig(init_weights=False))
    with model.disable_adapter():
        assert torch.equal(logits(model), expected_base)
    assert not torch.equal(logits(model), expected_base)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits(model), expected_base)


def test_multiple_adapters_add_set_delete():
    base = tiny_llama()
    expected_base = logits(base)
    model = get_peft_model(base, NeuroAdaConfig(top_k=1, init_weights=False, seed=1))
    model.add_adapter("other", NeuroAdaConfig(top_k=3, init_weights=False, seed=2, selection="random"))
    out_default = logits(model)
    model.set_adapter("other")
    out_other = logits(model)
    assert not torch.equal(out_default, out_other)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".other") for n in trainable)

    # both active at once: deltas add up
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features)
    both = layer(x)
    w = layer.get_base_layer().weight
    torch.testing.assert_close(
        both, x @ (w + layer.get_delta_weight("default") + layer.get_delta_weight("other")).T, rtol=1e-6, atol=1e-6
    )

    model.set_adapter("default")
    assert torch.equal(logits(model), out_default)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), out_default)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected_base)


def test_two_merged_adapters_unmerge_exactly():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2, init_weights=False, seed=1))
    model.add_adapter("b", NeuroAdaConfig(top_k=2, init_weights=False, seed=5))
    before = base_linear_weights(model)
    model.base_model.merge_adapter(["default", "b"])
    model.base_model.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in base_linear_weights(model).items())


def test_indices_stay_integer_through_bf16_cast_and_round_trip(tmp_path):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2, init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    indices_before = layer.neuroada_indices["default"].clone()
    model = model.to(torch.bfloat16)  # casts every float tensor, theta included
    assert layer.neuroada_indices["default"].dtype == torch.int64
    assert torch.equal(layer.neuroada_indices["default"], indices_before)
    bf16_logits = logits(model)
    model.save_pretrained(tmp_path / "bf16")

    reloaded = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), tmp_path / "bf16")
    reloaded_layer = reloaded.base_model.model.model.layers[0].mlp.gate_proj
    assert reloaded_layer.neuroada_indices["default"].dtype == torch.int64
    assert torch.equal(reloaded_layer.neuroada_indices["default"], indices_before)
    # the config asks for fp32 theta; cast like the saved model was to compare like with like
    assert reloaded_layer.neuroada_theta["default"].dtype == torch.float32
    assert torch.equal(logits(reloaded.to(torch.bfloat16)), bf16_logits)


def test_bf16_base_with_fp32_theta_round_trip(tmp_path):
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), NeuroAdaConfig(top_k=2, init_weights=False))
    expected = logits(model)
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), tmp_path / "a")
    thetas = {n: p for n, p in reloaded.named_parameters() if "neuroada_theta" in n}
    assert thetas and all(p.dtype == torch.float32 for p in thetas.values())
    assert all(b.dtype == torch.int64 for n, b in reloaded.named_buffers() if "neuroada_indices" in n)
    assert torch.equal(logits(reloaded), expected)


def test_fp32_theta_on_bf16_base_is_kept_and_trains():
    base = tiny_llama(dtype=torch.bfloat16)
    model = get_peft_model(base, NeuroAdaConfig(top_k=1))
    thetas = [p for n, p in model.named_parameters() if p.requires_grad]
    assert thetas and all(p.dtype == torch.float32 for p in thetas)
    out = model(TOKENS, labels=TOKENS)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in thetas)
    model16 = get_peft_model(tiny_llama(dtype=torch.bfloat16), NeuroAdaConfig(theta_dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters() if p.requires_grad)


def test_registration_is_idempotent_across_reload():
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import neuroada_plugin.neuroada as method
    import neuroada_plugin.peft_registration as registration

    importlib.reload(registration)
    reloaded = importlib.reload(method)
    assert peft.PeftType("NEUROADA") is peft.PeftType.NEUROADA
    assert list(peft.PeftType).count(peft.PeftType.NEUROADA) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.NEUROADA] is reloaded.NeuroAdaConfig
    model = get_peft_model(tiny_llama(), reloaded.NeuroAdaConfig())
    assert model.peft_config["default"].peft_type.value == "NEUROADA"


def test_csr_and_gather_paths_train_identically_in_a_peft_model(monkeypatch):
    """k=3 on the CPU runs CsrBypass in every layer; the gather op gives the same loss and gradients."""
    from neuroada_plugin.neuroada import layer as layer_module

    def loss_and_grads(min_k: int):
        monkeypatch.setattr(layer_module, "CSR_MIN_K", min_k)
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(seed=3), NeuroAdaConfig(top_k=3))
        with torch.no_grad():  # non-zero theta, so dL/dx through the bypass matters
            for name, param in model.named_parameters():
                if "neuroada_theta" in name:
                    param.normal_(0.0, 0.05)
        input_ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
        seen = []
        loss = model(input_ids=input_ids, labels=input_ids).loss
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.append(node)
                stack.extend(next_fn for next_fn, _ in node.next_functions)
        ops = {node.name() for node in seen}
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, ops

    csr_loss, csr_grads, csr_ops = loss_and_grads(2)
    gather_loss, gather_grads, gather_ops = loss_and_grads(10**9)
    assert "CsrBypassBackward" in csr_ops and "SparseBypassBackward" not in csr_ops
    assert "SparseBypassBackward" in gather_ops and "CsrBypassBackward" not in gather_ops
    assert len(csr_grads) == 14  # theta of 7 projections x 2 layers
    torch.testing.assert_close(csr_loss, gather_loss, rtol=1e-6, atol=1e-6)
    for name, grad in gather_grads.items():
        torch.testing.assert_close(csr_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
