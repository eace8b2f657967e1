"""A method's PEFT config as command-line flags, generated from its config dataclass.

The examples take the method as a flag (``--method neuroada``) resolved through the registry
(:func:`neuroada_plugin.registry.get_method`). Its config flags are not written by hand: every
exposed field of the config dataclass becomes ``--<method>_<field>`` (``--neuroada_top_k``) with
the field's type, default and ``metadata["help"]``, and :func:`method_config` turns the parsed
flags back into the config. A new method, or a new field of a method, needs no change here::

    method = selected_method()  # --method in argv (or in the --config YAML), default neuroada
    parser = TrlParser((ScriptArguments, method_arguments(method), SFTConfig))
    script_args, method_args, training_args = parser.parse_args_and_config()
    peft_config = method_config(method_args, task_type="CAUSAL_LM")

The exposed fields are ``spec.exposed_fields``, or, when the spec leaves it empty, every field
the config declares beyond :class:`peft.PeftConfig`'s own (``target_modules``,
``modules_to_save`` and the method's settings). A field whose type a command line cannot
express (a dict) is left at its default; of a union the first expressible member is used
(``list[str] | str | None`` becomes ``--<method>_target_modules q_proj v_proj``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from enum import Enum
from typing import Any, Literal, Optional, Union

from neuroada_plugin.registry import MethodSpec, get_method, methods

__all__ = ["DEFAULT_METHOD", "method_arguments", "method_config", "method_title", "selected_method"]

DEFAULT_METHOD = "neuroada"
_SCALARS = (bool, int, float, str)


def method_title(method: str | MethodSpec) -> str:
    """The method's display name (:attr:`MethodSpec.display_name`: its ``title``, else its config class without
    ``Config``, e.g. ``NeuroAda``)."""
    spec = get_method(method) if isinstance(method, str) else method
    return spec.display_name


def _cli_type(hint: Any) -> Any:
    """The type a flag can carry for a field annotated ``hint`` (``None``: not expressible)."""
    if hint in _SCALARS:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal or (isinstance(hint, type) and issubclass(hint, Enum)):
        return hint
    if origin is list:
        return hint if len(args) == 1 and args[0] in (int, float, str) else None
    if origin is Union or origin is types.UnionType:
        members = [arg for arg in args if arg is not type(None)]
        for member in members:
            flag_type = _cli_type(member)
            if flag_type is not None:
                return Optional[flag_type] if len(members) < len(args) else flag_type  # noqa: UP045
    return None


def _flags(spec: MethodSpec) -> list[tuple[dataclasses.Field, Any]]:
    """(config field, flag type) of every exposed field a command line can express."""
    hints = typing.get_type_hints(spec.config_class())
    flags = [(f, _cli_type(hints.get(f.name, str))) for f in spec.config_fields()]
    return [(f, flag_type) for f, flag_type in flags if flag_type is not None]


def _flag_field(config_field: dataclasses.Field) -> Any:
    """A ``dataclasses.field`` with the config field's default and help."""
    metadata = {"help": config_field.metadata.get("help", "").replace("%", "%%")}  # argparse formats help with %
    if config_field.default is not dataclasses.MISSING:
        return dataclasses.field(default=config_field.default, metadata=metadata)
    if config_field.default_factory is not dataclasses.MISSING:
        factory = config_field.default_factory
        return dataclasses.field(default_factory=lambda: list(factory()), metadata=metadata)
    return dataclasses.field(metadata=metadata)  # required flag


@functools.cache
def method_arguments(method: str = DEFAULT_METHOD) -> type:
    """A dataclass of ``method`` (``--method``) and one ``--<method>_<field>`` flag per exposed config field.

    ``TrlParser`` / ``HfArgumentParser`` parse it like any arguments dataclass; defaults, types
    and help come from the config dataclass, so a changed default (e.g. ``None``) passes through.
    """
    spec = get_method(method)
    required: list[tuple[str, Any, Any]] = []
    optional: list[tuple[str, Any, Any]] = []
    for config_field, flag_type in _flags(spec):
        flag = (spec.yaml_prefix + config_field.name, flag_type, _flag_field(config_field))
        no_default = config_field.default is dataclasses.MISSING and config_field.default_factory is dataclasses.MISSING
        (required if no_default else optional).append(flag)
    method_flag = dataclasses.field(
        default=spec.name,
        metadata={
            "help": f"Fine-tuning method, one of the registry's ({', '.join(methods())}); "
            "`--method NAME --help` lists that method's own flags.",
            "choices": list(methods()),
        },
    )
    cls = dataclasses.make_dataclass(
        f"{method_title(spec)}Arguments", [*required, ("method", str, method_flag), *optional]
    )
    cls.__module__ = __name__
    cls.__doc__ = f"The {spec.name} adapter: flags generated from {spec.config_class().__name__}."
    return cls


def method_config(args: Any, **overrides: Any) -> Any:
    """The config of ``args.method`` built from its ``--<method>_<field>`` values (``overrides`` win)."""
    spec = get_method(args.method)
    values = {f.name: getattr(args, spec.yaml_prefix + f.name) for f, _ in _flags(spec)}
    return spec.config_class()(**{**values, **overrides})


def selected_method(argv: list[str] | None = None, default: str = DEFAULT_METHOD) -> str:
    """The method named by ``--method`` in ``argv`` (or ``method:`` in the ``--config`` YAML), else ``default``.

    Read before the full parser is built, because the method decides which flags exist.
    An unknown name exits with the list of registered methods.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--method")
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(argv)
    method = known.method
    if method is None and known.config:
        import yaml

        with open(known.config, encoding="utf-8") as handle:
            method = (yaml.safe_load(handle) or {}).get("method")
    method = str(method or default)
    try:
        return get_method(method).name
    except KeyError as error:
        parser.error(str(error))
        raise  # unreachable: error() exits
