"""SAFE (selective adapter freezing) as command-line flags: ``--safe`` and one ``--safe_<field>`` per setting.

The flags are generated from :class:`neuroada_plugin.SAFEConfig` the way a method's flags come
from its config (:mod:`harness.method_args`): same types, defaults and help, so a new SAFE setting
needs no change here. :func:`safe_callbacks` turns the parsed flags into the trainer's callbacks.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from harness.method_args import _cli_type, _flag_field

__all__ = ["PREFIX", "safe_arguments", "safe_callbacks"]

PREFIX = "safe_"


def _config_class() -> type:
    from neuroada_plugin import SAFEConfig

    return SAFEConfig


@functools.cache
def safe_arguments() -> type:
    """A dataclass with ``--safe`` (off by default) and ``--safe_<field>`` for every SAFEConfig field."""
    config_cls = _config_class()
    hints = typing.get_type_hints(config_cls)
    fields: list[tuple[str, Any, Any]] = [
        (
            "safe",
            bool,
            dataclasses.field(
                default=False,
                metadata={"help": "Freeze the least important adapters during training (SAFE; docs/safe.md)."},
            ),
        )
    ]
    for config_field in dataclasses.fields(config_cls):
        flag_type = _cli_type(hints[config_field.name])
        if flag_type is not None:
            fields.append((PREFIX + config_field.name, flag_type, _flag_field(config_field)))
    cls = dataclasses.make_dataclass("SafeArguments", fields, namespace={"__post_init__": _check})
    cls.__module__ = __name__
    cls.__doc__ = "SAFE's flags, generated from SAFEConfig."
    return cls


def _settings(args: Any) -> dict[str, Any]:
    return {f.name: getattr(args, PREFIX + f.name) for f in dataclasses.fields(_config_class())}


def _check(args: Any) -> None:
    """Bad SAFE settings fail when the flags are read, with SAFEConfig's message (field and allowed values)."""
    _config_class()(**_settings(args))


def safe_callbacks(args: Any) -> list:
    """``[SAFECallback(...)]`` built from the parsed flags when ``--safe`` is given, else ``[]``.

    The settings were checked when the flags were read.
    """
    if not args.safe:
        return []
    from neuroada_plugin import SAFECallback

    return [SAFECallback(**_settings(args))]
