"""Axolotl YAML keys generated from each registered method's config dataclass.

Axolotl silently drops YAML keys that no schema declares, so every key a method accepts
must be declared. Writing them by hand repeats every config field (type, default, help) and
drifts; here each ``<method>_<field>`` key is generated from the dataclass field: its type
(ints and bools strict, so ``"many"`` is not read as a number), ``None`` as the default (unset
means "the config class's default", which stays defined in one place), the field's
``metadata["help"]`` as the description, and ``metadata["ge"]``/``["le"]`` as bounds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, StrictBool, StrictInt, create_model

from ...registry import MethodSpec, methods

__all__ = ["MethodArgsBase", "build_args_model", "exposed_fields", "yaml_key"]

_STRICT = {int: StrictInt, bool: StrictBool}


def exposed_fields(spec: MethodSpec) -> list[dataclasses.Field]:
    """The config fields a method offers as YAML keys (:meth:`MethodSpec.config_fields`)."""
    return spec.config_fields()


def yaml_key(spec: MethodSpec, field_name: str) -> str:
    """``neuroada_top_k`` for NeuroAda's ``top_k``."""
    return f"{spec.yaml_prefix}{field_name}"


def _strict(annotation: Any) -> Any:
    """The annotation with ``int``/``bool``/``float`` made strict, recursively."""
    if annotation in _STRICT:
        return _STRICT[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None or origin is Literal or not args:
        return annotation
    converted = tuple(_strict(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return Union[converted]  # noqa: UP007 (built from a tuple)
    return origin[converted if len(converted) > 1 else converted[0]]


def _field_definition(config_cls: type, field: dataclasses.Field) -> tuple[Any, Any]:
    hints = typing.get_type_hints(config_cls)
    annotation = _strict(hints.get(field.name, Any))
    metadata = field.metadata or {}
    bounds = {key: metadata[key] for key in ("ge", "le") if key in metadata}
    return annotation | None, Field(default=None, description=metadata.get("help", ""), **bounds)


class MethodArgsBase(BaseModel):
    """Base of the generated args model; ``peft_methods`` lists the methods whose keys it declares."""

    peft_methods: ClassVar[tuple[MethodSpec, ...]] = ()


def build_args_model(
    specs: typing.Iterable[MethodSpec], base: type[BaseModel] = MethodArgsBase, module: str | None = None
) -> type:
    """A pydantic model ``MethodArgs`` declaring every YAML key of ``specs``.

    ``base`` supplies the validators; ``module`` is where the caller binds the result to the
    name ``MethodArgs`` (Axolotl imports the model by that dotted path).
    """
    specs = tuple(specs)
    definitions: dict[str, Any] = {}
    for spec in specs:
        config_cls = spec.config_class()
        for field in exposed_fields(spec):
            definitions[yaml_key(spec, field.name)] = _field_definition(config_cls, field)
    model = create_model("MethodArgs", __base__=base, __module__=module or base.__module__, **definitions)
    model.peft_methods = specs
    return model


def registered_specs() -> list[MethodSpec]:
    """Every method of the registry (built-ins and those added through the registry's extension points)."""
    return list(methods().values())
