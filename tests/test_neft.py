"""NeFT against independent references: a dense masked float64 formula, merges that touch only the selected neurons,
and the selection command against cosine similarities computed here from its reference run.

Generic behaviour (PEFT registration, fresh-process loading, merge == forward, disable, several adapters, streaming
merge == in-memory merge, Axolotl keys, wrong-base detection) runs over NeFT in the method contract and
tests/test_base_fingerprint.py, with its data-free settings (``MethodSpec.data_free_settings``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from neuroada_plugin import NeftConfig
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.errors import AdapterCheckpointError
from neuroada_plugin.neft.selection_file import SelectionFileError

from tiny_models import tiny_llama

F64 = torch.float64
TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3, 250, 480], [1, 2, 3, 4, 5, 6, 7, 8]])


def neft_layers(model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "neft_delta")}


def selected(layer, adapter: str = "default") -> tuple[torch.Tensor, str]:
    return (layer.neft_rows[adapter], "rows") if adapter in layer.neft_rows else (layer.neft_cols[adapter], "cols")


def test_forward_and_gradients_equal_the_dense_masked_formula():
    model = get_peft_model(
        tiny_llama(seed=0).to(F64), NeftConfig(selection="random", num_neurons=150, init_weights=False, seed=3)
    )
    layers = neft_layers(model)
    assert {name.rsplit(".", 1)[1] for name in layers} == {"up_proj", "down_proj"}
    logits = model(TOKENS).logits
    loss = logits.square().mean()
    grads = torch.autograd.grad(loss, [layer.neft_delta["default"] for layer in layers.values()])

    # Reference: the plain model with W + M * D as a dense trainable weight (M: 0/1 mask of the selected neurons).
    reference = tiny_llama(seed=0).to(F64)
    dense = {}
    for name, layer in layers.items():
        index, axis = selected(layer)
        update = torch.zeros(layer.out_features, layer.in_features, dtype=F64)
        if axis == "rows":
            update[index] = layer.neft_delta["default"].detach()
        else:
            update[:, index] = layer.neft_delta["default"].detach()
        dense[name] = update.requires_grad_(True)
        module = reference.get_submodule(name)
        weight = module.weight.detach()
        module.forward = lambda x, w=weight, u=dense[name]: F.linear(x, w + u)
    ref_logits = reference(TOKENS).logits
    ref_grads = torch.autograd.grad(ref_logits.square().mean(), list(dense.values()))

    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    for (name, layer), got, want in zip(layers.items(), grads, ref_grads, strict=True):
        index, axis = selected(layer)
        torch.testing.assert_close(got, want[index] if axis == "rows" else want[:, index], rtol=1e-10, atol=1e-14)
        mask = torch.zeros_like(want, dtype=torch.bool)
        if axis == "rows":
            mask[index] = True
        else:
            mask[:, index] = True
        assert bool((want[~mask] != 0).any()), name  # the masked-out entries do get gradients in the dense form


def test_training_then_merging_changes_exactly_the_selected_neurons():
    base = tiny_llama(seed=0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, NeftConfig(selection="magnitude", neuron_share=0.002))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = {name: selected(layer) for name, layer in neft_layers(model).items()}
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        module = name.rsplit(".", 1)[0]
        changed = param.detach() != before[name]
        if module not in layers or not name.endswith("weight"):
            assert not changed.any(), name
            continue
        index, axis = layers[module]
        expected = torch.zeros_like(changed)
        if axis == "rows":
            expected[index] = True
        else:
            expected[:, index] = True
        assert torch.equal(changed, expected), name  # every entry of every selected neuron moved, nothing else


def test_magnitude_takes_the_largest_neurons_over_all_layers_and_random_is_seeded():
    budget = 60
    model = get_peft_model(tiny_llama(seed=0), NeftConfig(selection="magnitude", num_neurons=budget))
    base = tiny_llama(seed=0)
    norms = []  # (norm, layer, index) of every candidate neuron, computed here
    for name, module in base.named_modules():
        if name.endswith(("up_proj", "down_proj")):
            weight = module.weight.detach().double()
            per_neuron = weight.norm(dim=1) if name.endswith("up_proj") else weight.norm(dim=0)
            norms += [(float(v), name, i) for i, v in enumerate(per_neuron)]
    expected = {(name, i) for _, name, i in sorted(norms, key=lambda t: -t[0])[:budget]}
    got = {(name, int(i)) for name, layer in neft_layers(model).items() for i in selected(layer)[0]}
    assert got == expected

    def random_choice(seed: int) -> set:
        chosen = get_peft_model(tiny_llama(seed=0), NeftConfig(selection="random", num_neurons=budget, seed=seed))
        return {(name, int(i)) for name, layer in neft_layers(chosen).items() for i in selected(layer)[0]}

    assert random_choice(1) == random_choice(1) != random_choice(2)
    assert len(random_choice(1)) == budget


@pytest.fixture(scope="module")
def selection(tmp_path_factory, tiny_llama_dir) -> dict:
    """``neft-select`` on the tiny model: 4 reference steps, budget 0.2% of all parameters; the reference kept."""
    root = tmp_path_factory.mktemp("neft-select")
    rows = [
        {"messages": [{"role": "user", "content": f"Add {i} and {i + 3}."}, {"role": "assistant", "content": f"{2 * i + 3}"}]}
        for i in range(24)
    ]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["neft-select", "--model", str(tiny_llama_dir), "--data", str(root / "train.jsonl"), "--output",
            str(root / "neurons.json"), "--steps", "4", "--batch-size", "4", "--max-length", "64", "--learning-rate",
            "1e-3", "--share", "0.002", "--keep-reference", str(root / "reference"), "--no-progress", "-q"]  # fmt: skip
    assert plugin_main(args) == 0
    return {"root": root, "file": root / "neurons.json", "args": args}


def test_selection_picks_the_lowest_cosine_similarities_under_one_global_budget(selection, tiny_llama_dir):
    payload = json.loads(selection["file"].read_text())
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = AutoModelForCausalLM.from_pretrained(selection["root"] / "reference")
    scored = []  # (cosine, layer, index, neuron size) of every candidate, computed here
    for name, module in original.named_modules():
        if not name.endswith(("up_proj", "down_proj")):
            continue
        w0, w1 = module.weight.detach().double(), trained.get_submodule(name).weight.detach().double()
        dim = 1 if name.endswith("up_proj") else 0  # up_proj rows, down_proj columns
        cosine = F.cosine_similarity(w0, w1, dim=dim)
        scored += [(float(c), name, i, w0.shape[dim]) for i, c in enumerate(cosine)]
    total = sum(p.numel() for p in original.parameters())
    budget = int(0.002 * total)
    expected, used = set(), 0
    for _, name, i, size in sorted(scored, key=lambda t: t[0]):
        if used + size > budget:
            break
        expected.add((name, i))
        used += size
    got = {(name, i) for name, entry in payload["modules"].items() for i in entry["neurons"]}
    assert got == expected and len(got) > 10
    assert payload["budget"]["parameters"] == used <= budget and payload["budget"]["total_parameters"] == total
    assert {entry["axis"] for name, entry in payload["modules"].items() if name.endswith("down_proj")} == {"cols"}
    run = payload["reference_run"]
    assert run["steps"] == 4 and run["trained"] == "all" and run["seconds"] > 0 and run["peak_memory_bytes"] > 0


def test_an_adapter_from_the_file_loads_without_it(selection, tiny_llama_dir, tmp_path):
    config = NeftConfig(selection_file=str(selection["file"]), init_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    payload = json.loads(selection["file"].read_text())
    for name, layer in neft_layers(model).items():
        assert selected(layer)[0].tolist() == payload["modules"][name]["neurons"]
    with torch.no_grad():
        expected = model(TOKENS).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    saved["selection_file"] = str(tmp_path / "gone.json")  # as on another machine: the file is not there
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter", is_trainable=trainable
        )
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS).logits, expected)


def test_a_selection_file_of_another_model_is_refused_naming_the_layer(selection):
    other = tiny_llama(seed=5)
    with pytest.raises(SelectionFileError, match=r"layer model\.layers\.0\.mlp\.up_proj's weight differs"):
        get_peft_model(other, NeftConfig(selection_file=str(selection["file"])))
    with pytest.raises(ValueError, match=r"neurons\.json does not exist\. Make it with `neuroada-plugin neft-select"):
        NeftConfig(selection_file="/no/such/neurons.json")  # refused when the config is made, before any model
    with pytest.raises(SelectionFileError, match=r"no entry for \['model\.layers\.0\.self_attn\.q_proj'"):
        get_peft_model(tiny_llama(seed=0), NeftConfig(selection_file=str(selection["file"]),
                                                      target_modules=["q_proj", "up_proj", "down_proj"]))  # fmt: skip


def test_the_command_refuses_bad_budgets_and_keeps_an_existing_output(selection, capsys):
    args = list(selection["args"])
    assert plugin_main(args) == 3  # the output exists: nothing replaced without --force
    assert "exists; pass --force" in capsys.readouterr().err
    share = args.index("--share")
    for value, message in (("0.9", "at most the candidate pool"), ("1e-9", "at least one neuron")):
        bad = args[: share + 1] + [value] + args[share + 2 :] + ["--force"]
        bad[bad.index("--output") + 1] = str(selection["root"] / "bad.json")
        assert plugin_main(bad) == 2
        assert message in capsys.readouterr().err
        assert not (selection["root"] / "bad.json").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(selection="best"), r"selection must be one of"),
        (dict(selection="magnitude"), r"needs its global budget as exactly one of num_neurons or neuron_share"),
        (dict(selection="random", num_neurons=3, neuron_share=0.1), r"exactly one of"),
        (dict(selection="random", num_neurons=0), r"num_neurons must be >= 1"),
        (dict(selection="magnitude", neuron_share=1.5), r"neuron_share must be a number in \(0, 1\)"),
        (dict(num_neurons=5), r"budget of a file selection is chosen by neft-select"),
        (dict(selection="magnitude", num_neurons=5, selection_file="x.json"), r"selection='magnitude', which does not"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeftConfig(**kwargs)


def test_budget_larger_than_the_pool_and_missing_file_say_what_to_do():
    with pytest.raises(ValueError, match=r"num_neurons=100000 is outside 1\.\.512, the candidate pool \(4 layers\)"):
        get_peft_model(tiny_llama(seed=0), NeftConfig(selection="magnitude", num_neurons=100_000))
    with pytest.raises(ValueError, match=r"needs selection_file.*neuroada-plugin neft-select.*selection='magnitude'"):
        get_peft_model(tiny_llama(seed=0), NeftConfig())


def test_a_config_with_saved_shapes_but_no_loaded_neurons_refuses_to_run(tmp_path):
    model = get_peft_model(tiny_llama(seed=0), NeftConfig(selection="magnitude", num_neurons=20))
    config = model.peft_config["default"]
    assert sum(count for _, count in config.neurons_per_module.values()) == 20
    again = get_peft_model(tiny_llama(seed=0), NeftConfig(**{**config.to_dict(), "peft_type": None, "task_type": None}))
    with pytest.raises(AdapterCheckpointError, match=r"created from a saved config .* no neuron indices were loaded"):
        again(TOKENS)


def test_a_float64_merge_is_exact():
    model = get_peft_model(
        tiny_llama(seed=0).to(F64), NeftConfig(selection="random", num_neurons=50, init_weights=False)
    )
    expected = {}
    for name, layer in neft_layers(model).items():
        index, axis = selected(layer)
        weight = layer.get_base_layer().weight.detach().clone()
        if axis == "rows":
            weight[index] += layer.neft_delta["default"].detach()
        else:
            weight[:, index] += layer.neft_delta["default"].detach()
        expected[name] = weight
    model.merge_adapter()
    for name, layer in neft_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, expected[name]), name


def test_a_damaged_adapter_file_is_refused_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(tiny_llama(seed=0), NeftConfig(selection="magnitude", num_neurons=20)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.neft_rows"))
    tensors[key] = tensors[key] + 10_000
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckpointError, match=r"NeFT layer model\.layers\.1\.mlp\.up_proj: .*distinct row indices"):
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)


def test_other_linear_layers_can_be_candidates():
    """Other linear layers are candidates when targeted; column_modules decides their axis."""
    config = NeftConfig(selection="random", num_neurons=200, target_modules=["q_proj", "up_proj", "down_proj"],
                        column_modules=["down_proj", "q_proj"])  # fmt: skip
    model = get_peft_model(tiny_llama(seed=0), config)
    axes = {name.rsplit(".", 1)[1]: axis for name, (axis, _) in config.neurons_per_module.items()}
    assert axes == {"q_proj": "cols", "up_proj": "rows", "down_proj": "cols"}
    assert {name.rsplit(".", 1)[1] for name in neft_layers(model)} == {"q_proj", "up_proj", "down_proj"}
