"""A method shipped by another installed package, through the ``neuroada_plugin.methods`` entry-point group.

The external package is built by hand in a temporary folder used as a site directory: the
contract's toy method (``tests/contract/toy_method/``) copied under another name (``extrank``) plus
a ``extrank_method-0.1.dist-info/`` with ``METADATA`` and ``entry_points.txt``, which
``importlib.metadata`` finds on ``sys.path`` as it finds a pip-installed package. Every check runs in
fresh processes with ``PYTHONPATH=<that folder>`` and without ``NEUROADA_PLUGIN_METHODS``, so the
entry point is the only way the method can be found: listed by ``neuroada-plugin methods``, trained
and saved, loaded by ``PeftModel.from_pretrained`` in a process that imports neither the plugin nor
the package (the start-up hook), merged by ``neuroada-plugin merge``, offered by the Axolotl plugin.
Broken and colliding entry points are checked in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuroada_plugin import registry
from neuroada_plugin.registry import ENTRY_POINT_GROUP, ExternalMethodWarning, UnknownMethodError, get_method

REPO = Path(__file__).resolve().parent.parent
TOY_DIR = REPO / "tests" / "contract" / "toy_method"
AXOLOTL_PYTHON = REPO / ".venv-axolotl" / "bin" / "python"
PACKAGE = "extrank_method"
METHOD = "extrank"
TOKENS = [[5, 17, 99, 1024, 7, 3, 250, 480], [1, 2, 3, 4, 5, 6, 7, 8]]

_INIT = f'''"""The toy method as another package ships it: registered when its entry point imports this module."""

from neuroada_plugin.registry import MethodSpec, register

SPEC = register(
    MethodSpec(
        name="{METHOD}",
        config="{PACKAGE}.config:ExtRankConfig",
        tuner="{PACKAGE}.model:ExtRankModel",
        checkpoint_rule="{PACKAGE}.checkpoint:extrank_checkpoint_rule",
        summary="Test-only method installed through an entry point.",
        needs_float_weights=True,
        reads_weights_when_created=False,
        exact_merge=True,
    )
)
'''


def _dist_info(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A hand-written installed distribution: all ``importlib.metadata`` needs to list its entry points."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """The external package: the toy's files renamed (``toyrank`` -> ``extrank``), and its dist-info."""
    site = tmp_path_factory.mktemp("external-site")
    package = site / PACKAGE
    package.mkdir()
    for name in ("config.py", "functional.py", "layer.py", "model.py", "checkpoint.py"):
        text = (TOY_DIR / name).read_text().replace("toyrank", METHOD).replace("ToyRank", "ExtRank")
        (package / name).write_text(text)
    (package / "__init__.py").write_text(_INIT)
    _dist_info(site, "extrank-method", {METHOD: PACKAGE})
    return site


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(registry.EXTRA_METHODS_ENV, None)  # the entry point must be the only way in
    env.pop("NEUROADA_PLUGIN_NO_AUTOLOAD", None)
    env["PYTHONPATH"] = str(site)  # nothing else: neither tests/ nor tests/contract/
    return env


def _run(args: list[str], site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    process = subprocess.run(
        args, env=_env(site), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    return process


_TRAIN = f"""
import json, sys, torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from neuroada_plugin.registry import get_method

base_dir, adapter_dir, out = sys.argv[1:4]
spec = get_method("{METHOD}")
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                       spec.data_free_config(target_modules=["q_proj", "v_proj"]))
trainable = {{n: p for n, p in model.named_parameters() if p.requires_grad}}
init = {{n: p.detach().clone() for n, p in trainable.items()}}
optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
tokens = torch.tensor({TOKENS})
model.train()
for _ in range(3):
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    torch.save(model(tokens).logits, out)
model.save_pretrained(adapter_dir)
print("TRAINED" + json.dumps({{
    "tuner": type(model.base_model).__name__,
    "trainable": sorted(trainable),
    "moved": sorted(n for n, p in trainable.items() if not torch.equal(p.detach(), init[n])),
}}))
"""

_LOAD = f"""
import sys, torch
before = sorted({{"neuroada_plugin", "{PACKAGE}"}} & set(sys.modules))
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor({TOKENS})).logits, sys.argv[3])
print("BEFORE", before, "TUNER", type(model.base_model).__name__, "HOOKED", "{PACKAGE}" in sys.modules)
"""


@pytest.fixture(scope="module")
def trained(site_dir, tiny_llama_dir, tmp_path_factory) -> dict:
    """One training run of the external method in a fresh process: the adapter, its logits, what moved."""
    work = tmp_path_factory.mktemp("external-run")
    process = _run(
        [sys.executable, "-c", textwrap.dedent(_TRAIN), str(tiny_llama_dir), str(work / "adapter"),
         str(work / "train_logits.pt")],
        site_dir, work,
    )  # fmt: skip
    result = json.loads(process.stdout.split("TRAINED", 1)[1].strip().splitlines()[0])
    return {"work": work, **result}


def test_listed_by_neuroada_plugin_methods(site_dir, tmp_path):
    rows = json.loads(_run([sys.executable, "-m", "neuroada_plugin", "methods", "--json"], site_dir, tmp_path).stdout)
    names = [row["name"] for row in rows]
    assert names[: len(registry.BUILTIN_SPEC_MODULES)] == ["neuroada", "neat", "smoa", "neft"]  # built-ins first
    row = next(row for row in rows if row["name"] == METHOD)
    assert (
        row["peft_type"] == METHOD.upper() and row["checkpoint_rule"] == f"{PACKAGE}.checkpoint:extrank_checkpoint_rule"
    )
    assert "streaming-merge" in row["flags"]


def test_trains_and_saves(trained):
    assert trained["tuner"] == "ExtRankModel"
    assert trained["trainable"] and all(f".{METHOD}_" in name for name in trained["trainable"])
    assert trained["moved"] == trained["trainable"]  # every adapter tensor left its initial value
    config = json.loads((trained["work"] / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == METHOD.upper()


def test_loads_in_a_fresh_process_through_the_start_up_hook(site_dir, tiny_llama_dir, trained, tmp_path):
    work = trained["work"]
    out = _run(
        [sys.executable, "-c", textwrap.dedent(_LOAD), str(tiny_llama_dir), str(work / "adapter"),
         str(tmp_path / "loaded_logits.pt")],
        site_dir, tmp_path,
    ).stdout  # fmt: skip
    # Neither the plugin nor the package was imported by the script; the hook (on `import peft`) did both.
    assert "BEFORE [] TUNER ExtRankModel HOOKED True" in out, out
    assert torch.equal(torch.load(tmp_path / "loaded_logits.pt"), torch.load(work / "train_logits.pt"))


def test_merged_by_the_cli(site_dir, tiny_llama_dir, trained, tmp_path):
    adapter, merged = trained["work"] / "adapter", tmp_path / "merged"
    _run(
        [sys.executable, "-m", "neuroada_plugin", "merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter),
         "--output", str(merged), "-q"],
        site_dir, tmp_path,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = model(torch.tensor(TOKENS)).logits
    adapter_logits = torch.load(trained["work"] / "train_logits.pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base(torch.tensor(TOKENS)).logits, adapter_logits, atol=1e-4)  # it did change
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)


_AXOLOTL = f"""
import json
from neuroada_plugin.integrations.axolotl import MethodArgs, MethodsPlugin
print("OFFERED" + json.dumps({{
    "adapters": [c.name for c in MethodsPlugin().get_adapter_capabilities()],
    "keys": sorted(k for k in MethodArgs.model_fields if k.startswith("{METHOD}_")),
}}))
"""


def test_offered_by_the_axolotl_plugin(site_dir, tmp_path):
    if not AXOLOTL_PYTHON.is_file():
        pytest.fail(f"{AXOLOTL_PYTHON} missing: create it with `bash scripts/setup_axolotl.sh`.", pytrace=False)
    out = _run([str(AXOLOTL_PYTHON), "-c", _AXOLOTL], site_dir, tmp_path).stdout
    offered = json.loads(out.split("OFFERED", 1)[1].strip().splitlines()[0])
    assert METHOD in offered["adapters"] and "neuroada" in offered["adapters"], offered
    assert f"{METHOD}_scale" in offered["keys"] and f"{METHOD}_target_modules" in offered["keys"], offered


# ---------------------------------------------------------------------------------- in this process


_BAD_MODULES = {
    "_ep_empty": "VALUE = 3\n",
    "_ep_collide": (
        "from neuroada_plugin.registry import MethodSpec, register\n"
        "register(MethodSpec(name='neuroada', config='_ep_nowhere:Config', tuner='_ep_nowhere:Model'))\n"
    ),
    "_ep_specobj": (
        "from neuroada_plugin.registry import MethodSpec\n"
        "SPEC = MethodSpec(name='epspecobj', config='_ep_nowhere:Config', tuner='_ep_nowhere:Model')\n"
    ),
}


def _write_bad_site(site: Path) -> None:
    """Installed packages whose entry points are broken, collide with a built-in, or name a MethodSpec object."""
    for name, text in _BAD_MODULES.items():
        (site / f"{name}.py").write_text(text)
    _dist_info(site, "broken-import-pkg", {"brokenimport": "_ep_no_such_module"})
    _dist_info(site, "registers-nothing-pkg", {"registersnothing": "_ep_empty"})
    _dist_info(site, "not-a-spec-pkg", {"notaspec": "_ep_empty:VALUE"})
    _dist_info(site, "colliding-pkg", {"collide": "_ep_collide"})
    _dist_info(site, "spec-object-pkg", {"epspecobj": "_ep_specobj:SPEC"})


def test_broken_entry_points_do_not_break_import_peft(site_dir, tmp_path):
    bad = tmp_path / "bad-site"
    bad.mkdir()
    _write_bad_site(bad)
    env = _env(site_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(bad), str(site_dir)])
    code = textwrap.dedent(
        """
        import peft
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as T
        from neuroada_plugin.registry import UnknownMethodError, get_method
        print("OK", "EXTRANK" in T, "NEUROADA" in T)
        try:
            get_method("epspecobj")
        except UnknownMethodError as error:
            print("DROPPED", error)
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0 and "OK True True" in process.stdout, process.stderr[-3000:]
    assert "ExternalMethodWarning" in process.stderr and "entry point 'brokenimport'" in process.stderr
    # A spec that registers but whose classes cannot be imported is skipped by the PEFT registration alone.
    assert "could not register the method 'epspecobj' (entry point 'epspecobj'" in process.stderr, process.stderr
    # ...and dropped from the registry (the Axolotl plugin reads every method's fields), saying why when asked for.
    [dropped] = [line for line in process.stdout.splitlines() if line.startswith("DROPPED")]
    assert "entry point 'epspecobj'" in dropped and "No module named '_ep_nowhere'" in dropped, dropped


@pytest.fixture
def bad_site(tmp_path, monkeypatch) -> Path:
    """:func:`_write_bad_site` on this process's ``sys.path``; the registry is restored afterwards."""
    _write_bad_site(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_EXTERNAL_FAILURES", [])
    registry.methods()  # the built-ins (and anything else) are loaded before the entry points are read again
    saved = dict(registry._SPECS)
    yield tmp_path
    registry._SPECS.clear()
    registry._SPECS.update(saved)
    for name in _BAD_MODULES:
        sys.modules.pop(name, None)


def test_broken_entry_points_warn_and_get_method_names_them(bad_site):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry._load_entry_points()  # what _ensure_builtins does after the built-ins
    messages = [str(w.message) for w in caught if issubclass(w.category, ExternalMethodWarning)]
    expected = {
        "brokenimport": ("broken-import-pkg", "ModuleNotFoundError"),
        "registersnothing": ("registers-nothing-pkg", "registered no MethodSpec"),
        "notaspec": ("not-a-spec-pkg", "not a MethodSpec"),
    }
    for name, (dist, problem) in expected.items():
        [message] = [m for m in messages if f"entry point {name!r}" in m]
        assert f"package {dist!r}" in message and problem in message and "uninstall" in message, message
    with pytest.raises(UnknownMethodError) as error:
        get_method("brokenimport")
    text = str(error.value)
    assert "failed to load" in text and all(f"entry point {name!r}" in text for name in expected), text
    assert get_method("epspecobj").config == "_ep_nowhere:Config"  # a `module:SPEC` entry point is registered


def test_an_entry_point_cannot_replace_a_built_in(bad_site):
    builtin = get_method("neuroada")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry._load_entry_points()
    [message] = [str(w.message) for w in caught if "'neuroada'" in str(w.message)]
    assert "entry point 'collide'" in message and "'colliding-pkg'" in message and "built-in" in message
    assert get_method("neuroada") is builtin and builtin.config.startswith("neuroada_plugin.")
