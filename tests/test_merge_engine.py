"""The streaming merge engine, method-agnostic: driven by a toy method registered only here.

Checkpoints are written with ``safetensors`` directly (no Transformers): the engine must only
need torch. The toy rule (:mod:`toy_merge_method`) writes ``W + scale * delta``; references are
computed here independently. NeuroAda's own merge is tested in ``test_merge.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuroada_plugin import AdapterCheckpointError, MergeError
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.cli import merge_main
from neuroada_plugin.merge import (
    CheckpointFileError,
    InsufficientSpaceError,
    OutputExistsError,
    UnsupportedAdapterError,
    merge_adapter_checkpoint,
    writer,
)
from neuroada_plugin.merge.safetensors_io import read_header
from neuroada_plugin.registry import MethodSpec, register, unregister

import toy_merge_method

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PROJ = [f"model.layers.{i}.proj" for i in range(3)]


@pytest.fixture(autouse=True)
def toy_method():
    with toy_merge_method.registered() as spec:
        yield spec


def _base_tensors(dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(40, 16, generator=generator)}
    for module in PROJ:
        tensors[f"{module}.weight"] = torch.randn(24, 16, generator=generator)
        tensors[f"{module}.bias"] = torch.randn(24, generator=generator)
    tensors["model.norm.weight"] = torch.ones(16)
    tensors["lm_head.weight"] = torch.randn(40, 16, generator=generator)
    return {name: value.to(dtype) for name, value in tensors.items()}


def _save_base(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3, **config) -> Path:
    """A Hugging Face-style folder: config.json, generation_config.json, and 1 or ``shards`` safetensors files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", **config}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
    (folder / "tokenizer_config.json").write_text("{}")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _deltas(modules=PROJ[:2]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {f"base_model.model.{m}.toyscale_delta": torch.randn(24, 16, generator=generator) for m in modules}


def _save_adapter(folder: Path, tensors: dict[str, torch.Tensor], scale: float = 0.5, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "TOYSCALE", "scale": scale, **config}))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def toy(tmp_path) -> tuple[Path, Path]:
    return _save_base(tmp_path / "base", _base_tensors()), _save_adapter(tmp_path / "adapter", _deltas())


def _merge(base, adapter, out, **kwargs):
    return merge_adapter_checkpoint(base, adapter, out, progress=False, log=None, **kwargs)


def _all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _expected(base: Path, deltas: dict[str, torch.Tensor], scale: float = 0.5) -> dict[str, torch.Tensor]:
    tensors = _all(base)
    for key, delta in deltas.items():
        name = key.removeprefix("base_model.model.").removesuffix(".toyscale_delta") + ".weight"
        tensors[name] = (tensors[name].double() + scale * delta.double()).to(tensors[name].dtype)
    return tensors


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.neuroada-merge-*")), "staging folder left behind"


# ----------------------------------------------------------------------------- what a merge writes


def test_toy_method_merges_and_everything_else_is_copied_byte_for_byte(toy, tmp_path):
    base, adapter = toy
    report = _merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    _assert_equal(_all(out), _expected(base, _deltas()))
    assert report.method == "toyscale" and report.peft_type == "TOYSCALE" and report.patched_tensors == 2
    assert "toyscale" in report.summary()
    # Same shards, same headers, same index; untouched shards byte-identical; support files copied.
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    patched = {f"{m}.weight" for m in PROJ[:2]}
    for name in shards:
        original, merged = bytearray((base / name).read_bytes()), bytearray((out / name).read_bytes())
        assert len(original) == len(merged)
        for entry in read_header(base / name).tensors:
            if entry.name in patched:
                assert original[entry.begin : entry.end] != merged[entry.begin : entry.end], entry.name
                original[entry.begin : entry.end] = merged[entry.begin : entry.end] = b""
        assert original == merged, f"{name}: bytes outside the patched tensors differ"
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == "toyscale" and info["peft_type"] == "TOYSCALE" and info["dtype"] == "BF16"
    assert info["adapter"] == str(adapter.resolve()) and info["base"] == str(base.resolve()) and info["version"]


def test_single_file_base_and_float32(tmp_path):
    base = _save_base(tmp_path / "base", _base_tensors(torch.float32), shards=1)
    adapter = _save_adapter(tmp_path / "adapter", _deltas(PROJ), scale=-2.0)
    _merge(base, adapter, tmp_path / "out")
    _assert_equal(_all(tmp_path / "out"), _expected(base, _deltas(PROJ), scale=-2.0))


def test_adapter_key_variants_give_identical_output(toy, tmp_path):
    """No ``base_model.model.`` prefix, an adapter-name suffix, and the legacy .bin file all merge the same."""
    base, adapter = toy
    _merge(base, adapter, tmp_path / "canonical")
    canonical = _all(tmp_path / "canonical")
    deltas = _deltas()
    variants = {
        "noprefix": {k.removeprefix("base_model.model."): v for k, v in deltas.items()},
        "named": {f"{k}.default": v for k, v in deltas.items()},
    }
    for name, state in variants.items():
        _save_adapter(tmp_path / name, state)
    (tmp_path / "legacy_bin").mkdir()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "legacy_bin")
    torch.save(deltas, tmp_path / "legacy_bin" / "adapter_model.bin")
    for name in [*variants, "legacy_bin"]:
        _merge(base, tmp_path / name, tmp_path / f"out-{name}")
        _assert_equal(_all(tmp_path / f"out-{name}"), canonical)


def test_modules_to_save_and_tied_output_embedding(tmp_path):
    """Full copies (modules_to_save) and a patch of a tied lm_head landing on the stored embedding."""
    tensors = _base_tensors()
    del tensors["lm_head.weight"]
    base = _save_base(tmp_path / "base", tensors, tie_word_embeddings=True)
    norm = torch.full((16,), 3.0)
    head = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    adapter = _save_adapter(
        tmp_path / "adapter",
        {"base_model.model.lm_head.toyscale_delta": head, "base_model.model.model.norm.weight": norm},
        scale=1.0,
        modules_to_save=["norm"],
    )
    _merge(base, adapter, tmp_path / "out")
    got, want = _all(tmp_path / "out"), _all(base)
    want["model.norm.weight"] = norm.to(torch.bfloat16)
    embed = want["model.embed_tokens.weight"]
    want["model.embed_tokens.weight"] = (embed.double() + head.double()).to(torch.bfloat16)
    _assert_equal(got, want)


# ----------------------------------------------------------------------------- the adapter file


def _expect(base, adapter_dir, error, match, out):
    with pytest.raises(error, match=match):
        _merge(base, adapter_dir, out)
    _no_leftovers(out)


def test_one_adapter_per_file_and_no_unexplained_tensors(toy, tmp_path):
    base, _ = toy
    out = tmp_path / "out"
    deltas = _deltas()
    key = next(iter(deltas))
    two = _save_adapter(
        tmp_path / "two", {**{f"{k}.default": v for k, v in deltas.items()}, f"{key}.other": deltas[key].clone()}
    )
    _expect(base, two, AdapterCheckpointError, "several adapters", out)
    mixed = _save_adapter(tmp_path / "mixed", {f"{key}.default": deltas[key], **dict(list(deltas.items())[1:])})
    _expect(base, mixed, AdapterCheckpointError, "several adapters", out)
    stray = _save_adapter(tmp_path / "stray", {**deltas, "base_model.model.model.norm.extra": torch.ones(3)})
    _expect(base, stray, AdapterCheckpointError, "do not correspond to anything the toyscale merge rule", out)
    empty = _save_adapter(tmp_path / "empty", {"base_model.model.model.norm.extra": torch.ones(3)})
    _expect(base, empty, AdapterCheckpointError, r"says TOYSCALE, but the file has no '\*\.toyscale_\*' tensors", out)
    unknown_module = _save_adapter(
        tmp_path / "deeper", {"base_model.model.model.layers.9.proj.toyscale_delta": deltas[key]}
    )
    _expect(base, unknown_module, AdapterCheckpointError, r"model\.layers\.9\.proj\.weight.*does not contain", out)
    wrong_shape = _save_adapter(tmp_path / "shape", {key: torch.ones(24, 17)})
    _expect(base, wrong_shape, AdapterCheckpointError, r"\[24, 17\].*\[24, 16\]", out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapter_values_are_refused_before_writing(toy, tmp_path, bad):
    base, _ = toy
    deltas = _deltas()
    key = next(iter(deltas))
    deltas[key][3, 1] = bad
    broken = _save_adapter(tmp_path / "broken", deltas)
    _expect(base, broken, MergeError, rf"{key}.*1 non-finite value", tmp_path / "out")


def test_truncated_and_unreadable_adapter_files(toy, tmp_path):
    base, adapter = toy
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    _expect(base, truncated, CheckpointFileError, "truncated", tmp_path / "out")
    no_config = tmp_path / "no-config"
    shutil.copytree(adapter, no_config)
    (no_config / "adapter_config.json").unlink()
    _expect(base, no_config, CheckpointFileError, "no adapter_config.json", tmp_path / "out")


def test_unknown_methods_are_refused_with_the_known_ones(toy, tmp_path):
    base, adapter = toy
    for peft_type, hint in (("LORA", "merge_and_unload"), ("SOMETHING", "")):
        other = tmp_path / peft_type
        shutil.copytree(adapter, other)
        (other / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
        with pytest.raises(UnsupportedAdapterError, match="known methods: .*neuroada \\(NEUROADA\\).*toyscale") as info:
            _merge(base, other, tmp_path / "out")
        assert hint in str(info.value)
    register(MethodSpec(name="norule", config="x:Config", tuner="x:Model"))
    try:
        other = tmp_path / "norule"
        shutil.copytree(adapter, other)
        (other / "adapter_config.json").write_text(json.dumps({"peft_type": "NORULE"}))
        with pytest.raises(UnsupportedAdapterError, match="norule .*has no streaming merge rule"):
            _merge(base, other, tmp_path / "out")
    finally:
        unregister("norule")
    _no_leftovers(tmp_path / "out")


# ----------------------------------------------------------------------------- the base checkpoint


def test_missing_truncated_and_corrupted_shards(toy, tmp_path):
    base, adapter = toy
    shards = sorted(base.glob("model-*.safetensors"))

    missing = shutil.copytree(base, tmp_path / "missing")
    (missing / shards[1].name).unlink()
    _expect(missing, adapter, CheckpointFileError, f"{shards[1].name}.*missing", tmp_path / "out")

    truncated = shutil.copytree(base, tmp_path / "truncated")
    with open(truncated / shards[-1].name, "r+b") as handle:
        handle.truncate(shards[-1].stat().st_size - 100)
    _expect(truncated, adapter, CheckpointFileError, "truncated", tmp_path / "out")

    corrupted = shutil.copytree(base, tmp_path / "corrupted")
    data = bytearray((corrupted / shards[0].name).read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    (corrupted / shards[0].name).write_bytes(bytes(data))
    _expect(corrupted, adapter, CheckpointFileError, "corrupted", tmp_path / "out")

    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    shutil.copy(base / "config.json", bin_base)
    torch.save(_all(base), bin_base / "pytorch_model.bin")
    _expect(bin_base, adapter, CheckpointFileError, "safetensors", tmp_path / "out")

    _expect("some-org/some-model", adapter, CheckpointFileError, "hub", tmp_path / "out")  # HF_HUB_OFFLINE=1


# ----------------------------------------------------------------------------- the output


def _cli(*args: str, capsys, main=merge_main) -> tuple[int, str]:
    code = main([*args, "--no-progress"])
    return code, " ".join(capsys.readouterr().err.split())  # the CLI wraps long messages


def test_existing_output_needs_force(toy, tmp_path, capsys):
    base, adapter = toy
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli("--base", str(base), "--adapter", str(adapter), "--output", str(out), capsys=capsys)
    assert code == 3 and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(OutputExistsError):
        _merge(base, adapter, out)
    code, _ = _cli("--base", str(base), "--adapter", str(adapter), "--output", str(out), "--force", capsys=capsys)
    assert code == 0 and not (out / "keep.txt").exists()
    _assert_equal(_all(out), _expected(base, _deltas()))
    assert not list(tmp_path.glob(".out.neuroada-merge-*"))
    code, err = _cli("--base", str(base), "--adapter", str(adapter), "--output", str(base), "--force", capsys=capsys)
    assert code == 2 and "base model folder" in err and (base / "config.json").is_file()


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_disk_full_mid_write_leaves_nothing(toy, tmp_path, monkeypatch, kernel_copy):
    """The disk fills in the second shard, in a kernel copy of untouched bytes or a Python write."""
    base, adapter = toy
    written = {"bytes": 0}
    real_write, real_copy = writer._write_chunk, writer._kernel_copy
    second_shard = sorted(base.glob("model-*.safetensors"))[0].stat().st_size + 100

    def count(n: int) -> None:
        written["bytes"] += n
        if written["bytes"] > second_shard:
            raise OSError(errno.ENOSPC, "No space left on device")

    def filling_disk(handle, data):
        count(len(memoryview(data).cast("B")))
        real_write(handle, data)

    def filling_disk_in_kernel(source_fd, target_fd, offset, n):
        copied = real_copy(source_fd, target_fd, offset, n) if kernel_copy else 0
        count(copied)
        return copied

    monkeypatch.setattr(writer, "_write_chunk", filling_disk)
    monkeypatch.setattr(writer, "_kernel_copy", filling_disk_in_kernel)
    with pytest.raises(InsufficientSpaceError, match="Disk full"):
        _merge(base, adapter, tmp_path / "out")
    assert written["bytes"] > second_shard
    _no_leftovers(tmp_path / "out")


def test_kernel_copy_and_read_write_paths_write_the_same_bytes(toy, tmp_path, monkeypatch):
    base, adapter = toy
    _merge(base, adapter, tmp_path / "kernel")
    monkeypatch.setattr(writer, "_kernel_copy", lambda *args: 0)
    _merge(base, adapter, tmp_path / "python")
    for shard in sorted(p.name for p in base.glob("*.safetensors")):
        assert (tmp_path / "kernel" / shard).read_bytes() == (tmp_path / "python" / shard).read_bytes(), shard


def test_not_enough_free_space_is_refused_before_writing(toy, tmp_path, monkeypatch):
    base, adapter = toy
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(InsufficientSpaceError, match="Nothing was written"):
        _merge(base, adapter, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_a_rule_may_not_change_shape_or_dtype(toy, tmp_path, monkeypatch):
    base, adapter = toy
    rule = toy_merge_method.toyscale_rule

    def widening(module, base_tensors):
        return [
            type(patch)(target=patch.target, apply=lambda w, a=patch.apply: a(w).float(), check=patch.check)
            for patch in rule(module, base_tensors)
        ]

    monkeypatch.setattr(toy_merge_method, "toyscale_rule", widening)
    with pytest.raises(RuntimeError, match="patches must keep shape and dtype"):
        _merge(base, adapter, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


_KILL_AFTER_FIRST_CHUNKS = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import toy_merge_method
from neuroada_plugin.merge import writer
from neuroada_plugin.cli import merge_main
from neuroada_plugin.registry import register
register(toy_merge_method.SPEC)
calls = 0
real = writer._write_chunk
def dying(handle, data):
    global calls
    calls += 1
    real(handle, data)
    if calls == 3:
        handle.flush()
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
writer._write_chunk = dying
sys.exit(merge_main(sys.argv[3:]))
"""

_RERUN = """
import sys
sys.path.insert(0, sys.argv[1])
import toy_merge_method
from neuroada_plugin.cli import merge_main
from neuroada_plugin.registry import register
register(toy_merge_method.SPEC)
sys.exit(merge_main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_killed_mid_write_leaves_no_output(toy, tmp_path, signame):
    base, adapter = toy
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_FIRST_CHUNKS, signame, str(TESTS), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not out.exists()
    stale = list(tmp_path.glob(".out.neuroada-merge-tmp.*"))
    if signame == "SIGKILL":
        assert result.returncode == -signal.SIGKILL
        assert len(stale) == 1 and any(stale[0].iterdir()), "expected the killed run's staging folder"
        # The next run removes the dead run's staging folder and succeeds.
        rerun = subprocess.run(
            [sys.executable, "-c", _RERUN, str(TESTS), *args], capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr
        assert "interrupted merge" in rerun.stderr
        _assert_equal(_all(out), _expected(base, _deltas()))
        assert not list(tmp_path.glob(".out.neuroada-merge-*"))
    else:
        assert result.returncode == 128 + signal.SIGTERM, result.stderr
        assert stale == []


# ----------------------------------------------------------------------------- the CLI


def test_alias_and_subcommand_are_the_same_command(toy, tmp_path, capsys):
    base, adapter = toy
    common = ["--base", str(base), "--adapter", str(adapter)]
    assert plugin_main(["merge", *common, "--output", str(tmp_path / "a"), "--no-progress"]) == 0
    via_plugin = capsys.readouterr()
    assert merge_main([*common, "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    via_alias = capsys.readouterr()
    assert "merged toyscale adapter (TOYSCALE)" in via_plugin.out and "merged toyscale adapter" in via_alias.out
    assert "[merge] toyscale adapter" in via_alias.err
    for shard in sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    # Same exit codes and messages on errors, named after the command used.
    for main, prog in (
        (merge_main, "neuroada-merge"),
        (lambda argv: plugin_main(["merge", *argv]), "neuroada-plugin merge"),
    ):
        code, err = _cli(*common, "--output", str(tmp_path / "a"), capsys=capsys, main=main)
        assert code == 3 and err.startswith(f"{prog}: error: Output folder") and "--force" in err


def test_help_names_the_methods_it_merges(capsys):
    for main, argv in ((merge_main, ["--help"]), (plugin_main, ["merge", "--help"])):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        shown = capsys.readouterr().out
        assert "neuroada (peft_type NEUROADA)" in shown and "toyscale (peft_type TOYSCALE)" in shown
        for flag in (
            "--base",
            "--adapter",
            "--output",
            "--force",
            "--verify",
            "--tokenizer",
            "--no-progress",
            "exit codes",
        ):
            assert flag in shown


def test_methods_lists_every_registered_method(capsys):
    assert plugin_main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["method", "peft_type", "flags"]
    toy_line = next(line for line in lines if line.startswith("toyscale"))
    assert "TOYSCALE" in toy_line and "streaming-merge" in toy_line and "exact-merge" not in toy_line
    assert any(line.startswith("neuroada ") and "exact-merge" in line for line in lines)
    assert plugin_main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["toyscale"]["peft_type"] == "TOYSCALE" and rows["toyscale"]["checkpoint_rule"] == SPEC_RULE
    assert "exact-merge" in rows["neuroada"]["flags"]


SPEC_RULE = "toy_merge_method:toyscale_rule"


def _toy_command(subparsers) -> None:
    parser = subparsers.add_parser("toy-hello", help="A method-declared subcommand.")
    parser.add_argument("--name", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)


def test_methods_can_declare_subcommands(capsys):
    register(MethodSpec(name="toycli", config="x:C", tuner="x:M", cli_commands=("test_merge_engine:_toy_command",)))
    try:
        assert plugin_main(["toy-hello", "--name", "merge"]) == 7
        assert capsys.readouterr().out.strip() == "hello merge"
    finally:
        unregister("toycli")


def test_cli_and_merge_engine_import_neither_peft_nor_transformers():
    code = (
        "import sys, time; started = time.perf_counter()\n"
        "import neuroada_plugin, neuroada_plugin.cli, neuroada_plugin.merge, neuroada_plugin.registry\n"
        "import neuroada_plugin.merge.streaming, neuroada_plugin.neuroada.checkpoint\n"
        "heavy = [m for m in ('peft', 'transformers', 'trl', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(neuroada_plugin.registry.methods()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "neuroada" in result.stdout
    helped = subprocess.run(
        [sys.executable, "-c", "import sys; from neuroada_plugin.cli import merge_main\n"
         "try:\n merge_main(['--help'])\nexcept SystemExit: pass\n"
         "assert 'torch' not in sys.modules and 'peft' not in sys.modules"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
