"""harness/method_args.py: a registered method's config dataclass as example-script flags, and back."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from peft import PeftConfig
from transformers import HfArgumentParser

from harness.method_args import method_arguments, method_config, method_title, selected_method
from neuroada_plugin.registry import MethodSpec, get_method, register, unregister


@dataclasses.dataclass
class ToyConfig(PeftConfig):
    """A second method's config: one field of every kind the generator meets."""

    rank: int = dataclasses.field(default=4, metadata={"help": "Rank (100% of the budget)."})
    mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "Mode."})
    scale: float | None = dataclasses.field(default=None, metadata={"help": "Scale; None: automatic."})
    target_modules: list[str] | str | None = dataclasses.field(default=None, metadata={"help": "Targets."})
    table: dict[str, int] | None = dataclasses.field(default=None, metadata={"help": "Not expressible as a flag."})
    tags: list[str] = dataclasses.field(default_factory=lambda: ["x"], metadata={"help": "Tags."})
    frozen: bool = dataclasses.field(default=True, metadata={"help": "Frozen."})


@pytest.fixture
def toy():
    """Register ``toy`` (every field exposed) and ``toy_exposed`` (two fields) for one test."""
    config = f"{__name__}:ToyConfig"
    specs = [
        MethodSpec(name="toy", config=config, tuner=config),
        MethodSpec(name="toy_exposed", config=config, tuner=config, exposed_fields=("mode", "rank")),
    ]
    for spec in specs:
        register(spec)
    method_arguments.cache_clear()
    yield
    for spec in specs:
        unregister(spec.name)
    method_arguments.cache_clear()


def _flags(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def test_neuroada_flags_come_from_its_config():
    spec = get_method("neuroada")
    config_fields = _flags(spec.config_class())
    flags = _flags(method_arguments("neuroada"))
    # Today's hand-written flag names are all still there, now generated.
    assert {"neuroada_top_k", "neuroada_selection", "neuroada_target_modules", "neuroada_theta_dtype"} <= set(flags)
    assert flags["method"].default == "neuroada"
    assert "task_type" not in flags and "neuroada_task_type" not in flags  # PeftConfig's own fields stay out
    for name, flag in flags.items():
        if name == "method":
            continue
        source = config_fields[name.removeprefix(spec.yaml_prefix)]
        assert flag.default == source.default, name  # e.g. theta_dtype None passes through as None
        assert flag.metadata["help"] == source.metadata["help"].replace("%", "%%")
    assert method_title("neuroada") == "NeuroAda"
    assert method_title("neat") == "NEAT"  # the spec's title wins over the class name (NeatConfig)


def test_neuroada_flags_parse_into_its_config():
    parser = HfArgumentParser(method_arguments("neuroada"))
    (args,) = parser.parse_args_into_dataclasses(
        ["--neuroada_top_k", "3", "--neuroada_target_modules", "q_proj", "v_proj", "--no_neuroada_init_weights"]
    )
    config = method_config(args, task_type="CAUSAL_LM")
    assert type(config) is get_method("neuroada").config_class()
    assert (config.top_k, config.target_modules, config.init_weights, config.task_type) == (
        3,
        {"q_proj", "v_proj"},
        False,
        "CAUSAL_LM",
    )
    defaults = method_config(method_arguments("neuroada")())
    reference = get_method("neuroada").config_class()()
    assert defaults.to_dict() == reference.to_dict()


def test_a_registered_method_gets_flags_without_code(toy):
    flags = _flags(method_arguments("toy"))
    assert set(flags) == {"method", "toy_rank", "toy_mode", "toy_scale", "toy_target_modules", "toy_tags", "toy_frozen"}
    assert flags["toy_tags"].default_factory() == ["x"]  # a fresh list each time
    assert flags["toy_tags"].default_factory() is not flags["toy_tags"].default_factory()
    parser = HfArgumentParser(method_arguments("toy"))
    (args,) = parser.parse_args_into_dataclasses(
        ["--method", "toy", "--toy_rank", "8", "--toy_mode", "b", "--toy_scale", "0.5", "--toy_target_modules", "q"]
    )
    config = method_config(args)
    assert (config.rank, config.mode, config.scale, config.target_modules, config.tags) == (8, "b", 0.5, ["q"], ["x"])
    assert config.table is None and config.frozen is True
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--toy_mode", "c"])  # Literal -> choices
    assert "100%% of the budget" in flags["toy_rank"].metadata["help"]  # argparse-safe help
    parser.format_help()


def test_exposed_fields_limit_the_flags(toy):
    assert set(_flags(method_arguments("toy_exposed"))) == {"method", "toy_exposed_mode", "toy_exposed_rank"}
    args = method_arguments("toy_exposed")(toy_exposed_rank=2)
    assert method_config(args).rank == 2


def test_selected_method(toy, tmp_path):
    assert selected_method([]) == "neuroada"
    assert selected_method(["--max_steps", "3", "--method", "TOY"]) == "toy"
    config = tmp_path / "run.yaml"
    config.write_text("method: toy_exposed\nmax_steps: 3\n")
    assert selected_method(["--config", str(config)]) == "toy_exposed"
    with pytest.raises(SystemExit):
        selected_method(["--method", "nonesuch"])


def test_safe_flags_parse_into_the_callback_and_are_checked():
    from harness.safe_args import safe_arguments, safe_callbacks
    from neuroada_plugin import SAFECallback, SAFEConfig

    parser = HfArgumentParser(safe_arguments())
    flags = {f.name: f for f in dataclasses.fields(safe_arguments())}
    assert set(flags) == {"safe"} | {f"safe_{f.name}" for f in dataclasses.fields(SAFEConfig)}
    (off,) = parser.parse_args_into_dataclasses([])
    assert safe_callbacks(off) == []
    (on,) = parser.parse_args_into_dataclasses(
        ["--safe", "--safe_max_threshold", "0.6", "--safe_warmup_steps", "5", "--safe_granularity", "module"]
    )
    [callback] = safe_callbacks(on)
    assert isinstance(callback, SAFECallback)
    assert callback.config == SAFEConfig(max_threshold=0.6, warmup_steps=5, granularity="module")
    with pytest.raises(ValueError, match="max_threshold=2.0 must be between 0.0 and 1.0"):
        parser.parse_args_into_dataclasses(["--safe", "--safe_max_threshold", "2"])
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--safe_importance", "cosine"])  # Literal -> choices
