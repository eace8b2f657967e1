"""Wrong-base detection (neuroada_plugin/kit/fingerprint.py), for every registered method with a streaming merge.

An adapter records a fingerprint of each adapted base weight when it is created; ``merge``, ``verify`` and PEFT
loading compare it with the weights they see. Checked here against what a user meets: the README's quick start
adapter merged onto a randomly initialised model of the same shapes (it used to return 0, and verify said
bit-identical), the explicit overrides, an adapter saved before fingerprints existed, and the expected mismatch
of an adapter trained on a 4-bit base merged into its full-precision original.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.kit.fingerprint import (
    OVERRIDE_ENV,
    TOLERANCE,
    BaseMismatchError,
    fingerprint_distance,
    weight_fingerprint,
)
from neuroada_plugin.registry import methods

from tiny_models import tiny_llama

# Every built-in method (a test-only method registered by another test module is left out).
METHODS = [
    spec.name for spec in methods().values() if spec.checkpoint_rule and spec.config.startswith("neuroada_plugin.")
]
SMALL = dict(vocab_size=1000)


def _config(method: str):
    return methods()[method].data_free_config(init_weights=False)


@pytest.fixture(scope="module", params=METHODS)
def trained(request, tmp_path_factory) -> dict:
    """A base, an adapter created on it (random values), and a random model of the same shapes."""
    root = tmp_path_factory.mktemp(request.param)
    tiny_llama(seed=0, **SMALL).save_pretrained(root / "base")
    tiny_llama(seed=1, **SMALL).save_pretrained(root / "other")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), _config(request.param))
    model.save_pretrained(root / "adapter")
    prefix = methods()[request.param].prefix
    saved = load_file(root / "adapter" / "adapter_model.safetensors")
    fingerprints = {k: v for k, v in saved.items() if k.endswith(f".{prefix}fingerprint")}
    adapted = [m for m in model.modules() if isinstance(m, methods()[request.param].tuner_class().tuner_layer_cls)]
    assert len(fingerprints) == len(adapted) >= 4 and all(v.shape == (16,) for v in fingerprints.values())
    return {"root": root, "method": request.param, "prefix": prefix, "fingerprints": fingerprints, "layers": len(adapted)}


def _merge(root: Path, base: str, out: str, *extra: str, capsys) -> tuple[int, str]:
    code = plugin_main(
        ["merge", "--base", str(root / base), "--adapter", str(root / "adapter"), "--output", str(root / out), "-q"]
        + list(extra)
    )
    return code, " ".join(capsys.readouterr().err.split())


def test_the_fingerprint_is_the_weights_and_tells_models_apart():
    weight = tiny_llama(seed=0, **SMALL).model.layers[0].mlp.down_proj.weight.detach()
    other = tiny_llama(seed=1, **SMALL).model.layers[0].mlp.down_proj.weight.detach()
    recorded = weight_fingerprint(weight)
    # Independent reference: the definition with the signs drawn the documented way, in float64.
    signs = torch.Generator().manual_seed(20251205 + 1_000_003 * 64 + 128)
    inputs = torch.randint(0, 2, (1, 128), generator=signs)[0] * 2 - 1
    outputs = torch.randint(0, 2, (16, 64), generator=signs) * 2 - 1
    expected = outputs.double() @ (weight.double() @ inputs.double())
    torch.testing.assert_close(recorded.double(), expected, rtol=1e-5, atol=1e-5)  # float32 accumulation
    assert fingerprint_distance(recorded, weight_fingerprint(weight.bfloat16())) < 0.01
    assert fingerprint_distance(recorded, weight_fingerprint(other)) > 3 * TOLERANCE


def test_merge_onto_another_model_is_refused_unless_allowed(trained, capsys):
    root = trained["root"]
    code, err = _merge(root, "other", "refused", capsys=capsys)
    assert code == 2 and "the adapter was created on other base weights" in err
    assert "model.layers.0" in err and "--allow-base-mismatch" in err and "base_model_name_or_path" in err
    assert not (root / "refused").exists()

    code, _ = _merge(root, "other", "allowed", "--allow-base-mismatch", capsys=capsys)
    assert code == 0
    recorded = json.loads((root / "allowed" / "merge_info.json").read_text())["base_fingerprint"]
    assert recorded["mismatch_allowed"] is True and recorded["layers_checked"] == trained["layers"]
    assert recorded["max_distance"] > 3 * TOLERANCE

    code, _ = _merge(root, "base", "right", capsys=capsys)
    assert code == 0
    recorded = json.loads((root / "right" / "merge_info.json").read_text())["base_fingerprint"]
    assert recorded["layers_checked"] == trained["layers"] and recorded["max_distance"] < 1e-5 and not recorded["mismatch_allowed"]


def test_verify_and_peft_loading_refuse_another_model(trained, capsys, monkeypatch):
    root = trained["root"]
    if not (root / "right").exists():
        assert _merge(root, "base", "right", capsys=capsys)[0] == 0
    command = ["verify", "--base", str(root / "other"), "--adapter", str(root / "adapter"), "--merged"]
    assert plugin_main([*command, str(root / "right"), "-q"]) == 2
    assert "created on other base weights" in " ".join(capsys.readouterr().err.split())

    other = AutoModelForCausalLM.from_pretrained(root / "other")
    with pytest.raises(BaseMismatchError, match=r"layer model\.layers\.0\..*NEUROADA_ALLOW_BASE_MISMATCH=1"):
        PeftModel.from_pretrained(other, root / "adapter")
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "other"), root / "adapter")
    assert sum(1 for n, _ in loaded.named_buffers() if f".{trained['prefix']}fingerprint." in n) == trained["layers"]


def test_an_adapter_saved_before_fingerprints_merges_and_loads_without_a_check(trained, tmp_path, capsys):
    root = trained["root"]
    old = tmp_path / "old-adapter"
    old.mkdir()
    (old / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    saved = load_file(root / "adapter" / "adapter_model.safetensors")
    save_file({k: v for k, v in saved.items() if k not in trained["fingerprints"]}, old / "adapter_model.safetensors")
    code = plugin_main(["merge", "--base", str(root / "other"), "--adapter", str(old), "--output", str(tmp_path / "m")])
    assert code == 0
    assert f"records no base fingerprint ({trained['layers']} layers" in " ".join(capsys.readouterr().err.split())
    recorded = json.loads((tmp_path / "m" / "merge_info.json").read_text())["base_fingerprint"]
    assert recorded["layers_checked"] == 0 and recorded["layers_without_fingerprint"] == trained["layers"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), old)
    assert not [w for w in caught if "missing" in str(w.message).lower()]  # no "missing adapter keys" warning
    fingerprints = [b for n, b in loaded.named_buffers() if f".{trained['prefix']}fingerprint." in n]
    assert len(fingerprints) == trained["layers"] and all(not b.any() for b in fingerprints)  # "not recorded", saved as such


def test_an_adapter_trained_on_4bit_merges_into_its_full_precision_original(tmp_path, capsys):
    tiny_llama(seed=0, **SMALL).save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
            device_map="cpu",
        )
    get_peft_model(quantized, _config("neuroada")).save_pretrained(tmp_path / "adapter")
    code = plugin_main(
        ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output",
         str(tmp_path / "merged"), "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((tmp_path / "merged" / "merge_info.json").read_text())["base_fingerprint"]
    # Compared, and the 4-bit rounding shows (FP4: the coarsest bitsandbytes offers), yet far below the tolerance.
    assert recorded["layers_checked"] == 14 and 0.01 < recorded["max_distance"] < TOLERANCE / 2
