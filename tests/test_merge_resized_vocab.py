"""Adapters of a model whose vocabulary was resized for new tokens (Axolotl's ``pad_token`` on SmolLM2, TRL/PEFT
with added tokens): the streaming merge, ``verify`` and vLLM.

PEFT saves both embedding layers whole when the vocabulary differs from the base's
(``save_embedding_layers="auto"``). References: PEFT's own ``merge_and_unload()`` on the base resized
the same way (bit for bit), the tokenizer saved with the adapter, and greedy tokens of the unmerged
adapter in Transformers (vLLM must generate the same, the added token included).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_serving_vllm as serving_test
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_serving_vllm import MAX_TOKENS, TINY, _greedy, train_until_stable, vllm_offline_generate
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuroada_plugin import AdapterCheckpointError, NeatConfig, NeuroAdaConfig
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.merge import merge_adapter_checkpoint

from tiny_models import save_tiny_llama

vllm_python = serving_test.vllm_python
NEW_TOKEN = "<|sep|>"
BASE_VOCAB = 49152


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _base(root: Path, tie: bool, shard: str | None = None, **overrides) -> Path:
    base = save_tiny_llama(root / "base", seed=0, tie_word_embeddings=tie, **overrides)
    if shard:  # re-save sharded, as large checkpoints are
        model = AutoModelForCausalLM.from_pretrained(base)
        (base / "model.safetensors").unlink()
        model.save_pretrained(base, max_shard_size=shard)
        assert (base / "model.safetensors.index.json").is_file()
    return base


def _resized(base: Path, tokenizer) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    return model


def _adapter_with_a_new_token(root: Path, base: Path, config) -> tuple[Path, AutoTokenizer]:
    """Add a token, resize, one AdamW step on a batch that uses it, save the adapter with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [NEW_TOKEN]})
    assert len(tokenizer) == BASE_VOCAB + 1
    torch.manual_seed(0)
    model = get_peft_model(_resized(base, tokenizer), config)
    ids = tokenizer(f"Question {NEW_TOKEN} answer {NEW_TOKEN} done", return_tensors="pt")["input_ids"]
    assert BASE_VOCAB in ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    for key in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        assert saved[key].shape[0] == BASE_VOCAB + 1  # PEFT saved the resized embeddings whole
    return adapter, tokenizer


def _peft_merge(base: Path, adapter: Path, tokenizer) -> dict[str, torch.Tensor]:
    merged = PeftModel.from_pretrained(_resized(base, tokenizer), adapter).merge_and_unload()
    return {name: value.detach().clone() for name, value in merged.state_dict().items()}


@pytest.mark.parametrize(
    ("tie", "shard", "method"),
    [(False, None, "neuroada"), (True, None, "neuroada"), (False, "300KB", "neuroada"), (True, "300KB", "neat")],
    ids=["untied", "tied", "untied-sharded", "tied-sharded-neat"],
)
def test_resized_vocabulary_merges_like_peft_and_verifies(tmp_path, capsys, tie, shard, method):
    base = _base(tmp_path, tie, shard)
    config = NeuroAdaConfig(top_k=2) if method == "neuroada" else NeatConfig(r=2, init_weights=False)
    adapter, tokenizer = _adapter_with_a_new_token(tmp_path, base, config)
    out = tmp_path / "merged"
    assert plugin_main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert "resized the vocabulary: 49152 -> 49153 tokens" in capsys.readouterr().err

    got, want = _checkpoint(out), _peft_merge(base, adapter, tokenizer)
    if tie:  # the checkpoint stores the tied embedding once
        assert "lm_head.weight" not in got and torch.equal(
            want.pop("lm_head.weight"), want["model.embed_tokens.weight"]
        )
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert got["model.embed_tokens.weight"].shape == (BASE_VOCAB + 1, 64)

    config_json = json.loads((out / "config.json").read_text())
    assert config_json["vocab_size"] == BASE_VOCAB + 1 and config_json["tie_word_embeddings"] is tie
    merged_tokenizer = AutoTokenizer.from_pretrained(out)  # from the adapter folder: it knows the new token
    assert len(merged_tokenizer) == BASE_VOCAB + 1 and merged_tokenizer.convert_tokens_to_ids(NEW_TOKEN) == BASE_VOCAB
    info = json.loads((out / "merge_info.json").read_text())
    assert (info["base_vocab_size"], info["vocab_size"], info["tokenizer_from"]) == (
        BASE_VOCAB,
        BASE_VOCAB + 1,
        "adapter",
    )
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
        assert set(index["weight_map"]) == set(got)

    assert plugin_main(["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(out), "-q"]) == 0
    assert "weights bit-identical to merge_and_unload in float32" in capsys.readouterr().out


def test_a_half_resized_vocabulary_is_refused_naming_what_is_missing(tmp_path):
    base = _base(tmp_path, tie=False)
    adapter, _ = _adapter_with_a_new_token(tmp_path, base, NeuroAdaConfig())
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(
        AdapterCheckpointError, match=r"resizes model.embed_tokens.weight to 49153 rows.*lm_head.weight"
    ):
        merge_adapter_checkpoint(base, adapter, tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_with_two_different_values_are_refused(tmp_path):
    base = _base(tmp_path, tie=True)
    adapter, _ = _adapter_with_a_new_token(tmp_path, base, NeuroAdaConfig())
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterCheckpointError, match=r"hold different values, but the base model ties them"):
        merge_adapter_checkpoint(base, adapter, tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_vllm_serves_the_merged_checkpoint_with_the_added_token(vllm_python, tmp_path):
    """A NeuroAda adapter learns texts whose prompts contain the added token (id 49152, its embedding row
    exists only in the resized model); vLLM on the merged checkpoint generates exactly the unmerged adapter's
    greedy tokens over the 49,153-token vocabulary."""
    base = _base(tmp_path, tie=True, **TINY)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [NEW_TOKEN]})
    texts = [
        f"The{NEW_TOKEN} capital of Italy is Rome. The capital of Spain is Madrid. The capital of Germany is Berlin.",
        f"Numbers{NEW_TOKEN} one two three four five six seven eight nine ten eleven twelve thirteen fourteen.",
    ]
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, sequences))
    data = {
        "sequences": sequences,
        "prompts": [seq[:5] for seq in sequences],
        "input_ids": torch.tensor([seq + [tokenizer.eos_token_id] * (width - len(seq)) for seq in sequences]),
        "labels": torch.tensor([seq + [-100] * (width - len(seq)) for seq in sequences]),
        "mask": torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences]),
    }
    torch.manual_seed(0)
    model = get_peft_model(_resized(base, tokenizer), NeuroAdaConfig(top_k=8))
    references = train_until_stable(model, data, tokenizer.eos_token_id, lr=3e-2)
    expected = [tokens for tokens, _ in references]
    assert all(BASE_VOCAB in prompt for prompt in data["prompts"])  # every prompt reads the new embedding row
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merged = tmp_path / "merged"
    assert plugin_main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(merged), "-q"]) == 0

    transformers_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    assert [_greedy(transformers_merged, p, MAX_TOKENS, eos)[0] for p in data["prompts"]] == expected
    assert vllm_offline_generate(vllm_python, merged, data["prompts"], tmp_path) == expected
