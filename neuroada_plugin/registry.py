"""The method registry: one :class:`MethodSpec` per fine-tuning method this package ships.

Everything shared (PEFT registration, the streaming merge, the CLI, the Axolotl plugin, the
examples and the test contract) learns about methods from here and from nowhere else, so a
new method is its own folder plus one registration line.

This module is import-light on purpose (no torch, PEFT or Transformers): the merge CLI and
``neuroada-plugin methods`` read the registry without paying for those imports. A spec
therefore names its classes and its merge rule by import path; they are imported on first use.

Methods come from three places, loaded the first time the registry is read, in this order: the
built-ins (:data:`BUILTIN_SPEC_MODULES`), the entry points of every installed distribution in the
group :data:`ENTRY_POINT_GROUP` (how another package ships a method), and the modules named in
:data:`EXTRA_METHODS_ENV` (for development, without installing anything).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "BUILTIN_SPEC_MODULES",
    "ENTRY_POINT_GROUP",
    "EXTRA_METHODS_ENV",
    "ExternalMethodWarning",
    "MethodSpec",
    "UnknownMethodError",
    "discard_broken",
    "get_method",
    "load_object",
    "method_for_peft_type",
    "method_origin",
    "methods",
    "register",
    "unregister",
]


class UnknownMethodError(KeyError):
    """A method name or PEFT type that no registered spec carries (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class ExternalMethodWarning(UserWarning):
    """A method from outside this package was skipped: its entry point is broken or collides, or its classes fail.

    A warning, not an error: the registry is read when ``peft`` is imported (start-up hook), so one
    broken third-party package must not break PEFT or the other methods.
    """


def load_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` (or ``"package.module.attribute"``)."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class MethodSpec:
    """Everything shared machinery needs to know about one method.

    Attributes:
        name: Lower-case identifier. The Axolotl adapter name (``adapter: <name>``), the PEFT
            type (``NAME``), the PEFT parameter prefix and the Axolotl YAML key prefix
            (``<name>_``) all derive from it.
        config: Import path of the method's ``PeftConfig`` subclass (``"pkg.module:Class"``).
        tuner: Import path of its ``BaseTuner`` subclass.
        checkpoint_rule: Import path of its streaming-merge rule (see
            :mod:`neuroada_plugin.merge.rules`); ``None`` when the method cannot be merged by
            streaming. The rule's module must not import PEFT or Transformers.
        summary: One line for ``--help`` and ``neuroada-plugin methods``.
        title: Display name in messages and reports (``"NEAT"``); default: the config class's
            name without ``Config``.
        needs_float_weights: Creating the adapter needs an exact floating-point weight (it
            reads or merges into individual entries), so quantized bases are refused (except the
            kinds listed in ``quantized_layers``).
        reads_weights_when_created: Adapter creation reads the base weights (selection, a
            weight-dependent init): it must gather them when they are sharded (ZeRO-3) and
            cannot run on meta/empty weights.
        reads_weights_in_forward: Every forward reads the full frozen weight (NEAT's ``act(A @ W0)``),
            not only the base layer's own matmul. DeepSpeed ZeRO-3 hands a layer only its partition
            outside the base layer's forward, so without ``supports_sharding`` ZeRO-3 is refused.
            FSDP keeps a whole wrapped unit's weights gathered through its forward and backward,
            so FSDP stays accepted.
        supports_sharding: Creation and merging work on sharded models: ZeRO-3 partitioned weights are
            gathered one layer at a time, and a model whose weights are meta on ranks other than 0
            (FSDP ``cpu_ram_efficient_loading``) takes rank 0's adapter state from the broadcast
            (adapter state is parameters and persistent buffers only). Without it, a method that
            ``reads_weights_when_created`` is refused under ZeRO-3 and RAM-efficient loading.
        exact_merge: ``merge``/``unmerge`` are exact (bit-for-bit restore), so merging for
            serving or weight sync loses nothing.
        quantized_layers: Quantized base-layer kinds the method adapts even though it
            ``needs_float_weights`` (it reads a dequantized copy one layer at a time):
            ``"bnb_4bit"`` (bitsandbytes ``Linear4bit``, ``load_in_4bit``) and/or ``"bnb_8bit"``
            (``Linear8bitLt``, ``load_in_8bit``). Other quantization stays refused.
        exposed_fields: Config fields offered as Axolotl YAML keys (``<name>_<field>``) and
            example-script flags. Empty: every field the config declares beyond PEFT's own.
        cli_commands: Optional subcommands: import paths of callables
            ``register(subparsers) -> None`` added to ``neuroada-plugin``.
        exports_lora: The method has a command that writes an exactly equal standard LoRA adapter (NEAT:
            ``neuroada-plugin neat-to-lora``), for vLLM's multi-LoRA serving without merging.
        untested: Capabilities (keys of :data:`neuroada_plugin.capabilities.CAPABILITIES`) that the flags
            allow but no test of this repository exercises yet; the capability table prints them as
            "untested" rather than "yes" (``tests/test_capability_table.py`` keeps both lists true).
        data_free_settings: Config overrides that make the method usable without the user's data, for
            generic callers that only have a model (the method contract, benchmark rows, examples' defaults):
            empty when the default config needs nothing more. NeFT's default reads a selection file made
            from data; its data-free ablation is ``selection="magnitude"`` with a budget.
    """

    name: str
    config: str
    tuner: str
    checkpoint_rule: str | None = None
    summary: str = ""
    title: str = ""
    needs_float_weights: bool = True
    reads_weights_when_created: bool = True
    reads_weights_in_forward: bool = False
    exact_merge: bool = True
    quantized_layers: tuple[str, ...] = ()
    supports_sharding: bool = False
    exposed_fields: tuple[str, ...] = ()
    cli_commands: tuple[str, ...] = field(default_factory=tuple)
    data_free_settings: tuple[tuple[str, Any], ...] = ()
    exports_lora: bool = False
    untested: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"MethodSpec.name must be a lower-case identifier, got {self.name!r}.")

    @property
    def peft_type(self) -> str:
        """The PEFT type string stored in ``adapter_config.json`` (``"NEUROADA"``)."""
        return self.name.upper()

    @property
    def display_name(self) -> str:
        """How messages and reports name the method: ``title``, else the config class's name without ``Config``."""
        if self.title:
            return self.title
        class_name = self.config.rpartition(":")[2] if ":" in self.config else self.config.rpartition(".")[2]
        return class_name.removesuffix("Config") or self.name

    @property
    def prefix(self) -> str:
        """The PEFT parameter prefix (``"neuroada_"``); never part of a base-model parameter name."""
        return f"{self.name}_"

    @property
    def yaml_prefix(self) -> str:
        """Prefix of this method's Axolotl YAML keys (``neuroada_top_k``)."""
        return f"{self.name}_"

    def config_class(self) -> type:
        """The ``PeftConfig`` subclass (imports PEFT)."""
        return load_object(self.config)

    def data_free_config(self, **settings: Any) -> Any:
        """A config that needs no user data: ``settings``, then :attr:`data_free_settings` where not given."""
        return self.config_class()(**{**dict(self.data_free_settings), **settings})

    def tuner_class(self) -> type:
        """The ``BaseTuner`` subclass (imports PEFT)."""
        return load_object(self.tuner)

    def config_fields(self) -> list[dataclasses.Field]:
        """The config fields offered as Axolotl YAML keys and example flags (imports PEFT).

        ``exposed_fields`` when set; otherwise every field the config class declares beyond PEFT's
        own ``PeftConfig`` fields (task type, inference mode, ... belong to the trainer).
        """
        from peft import PeftConfig

        config_cls = self.config_class()
        # Fields the plugin records (metadata "recorded") are no user options.
        declared = {f.name: f for f in dataclasses.fields(config_cls) if f.init and not f.metadata.get("recorded")}
        if self.exposed_fields:
            unknown = [name for name in self.exposed_fields if name not in declared]
            if unknown:
                raise TypeError(
                    f"MethodSpec {self.name!r} exposes {unknown}, which are not fields of {config_cls.__name__}."
                )
            return [declared[name] for name in self.exposed_fields]
        inherited = {f.name for f in dataclasses.fields(PeftConfig)}
        return [f for name, f in declared.items() if name not in inherited]

    def merge_rule(self) -> Callable[..., Any] | None:
        """The streaming-merge rule, or ``None`` when the method has none."""
        return load_object(self.checkpoint_rule) if self.checkpoint_rule else None


# One line per built-in method: its folder, whose ``__init__`` calls ``register(MethodSpec(...))``
# and imports nothing heavy. Kept as import paths so that reading the registry costs nothing
# until a method is asked for.
BUILTIN_SPEC_MODULES: tuple[str, ...] = (
    "neuroada_plugin.neuroada",
    "neuroada_plugin.neat",
    "neuroada_plugin.smoa",
    "neuroada_plugin.neft",
)

# Methods installed by other packages: each distribution declares, in its ``pyproject.toml``,
#     [project.entry-points."neuroada_plugin.methods"]
#     mymethod = "mypkg.mymethod"          # a module that calls register(MethodSpec(...)) on import
#     # or "mypkg.mymethod:SPEC"           # an object that is a MethodSpec (registered here)
# Discovered through the installed metadata, so every process that reads the registry (training
# scripts, the start-up hook, Axolotl, the merge CLI, `neuroada-plugin methods`) finds them with
# nothing to configure.
ENTRY_POINT_GROUP = "neuroada_plugin.methods"

# Methods living outside this package, for development: a comma-separated list of modules that
# register a spec on import. Read in every process that consults the registry, like the entry points.
EXTRA_METHODS_ENV = "NEUROADA_PLUGIN_METHODS"

_SPECS: dict[str, MethodSpec] = {}
_BUILTINS_LOADED = False
# One line per entry point that could not be loaded (or method of one whose classes failed when
# registering with PEFT), kept so that asking for its method later (get_method,
# method_for_peft_type) says why it is missing rather than only "unknown".
_EXTERNAL_FAILURES: list[str] = []
# Where each method that did not come from BUILTIN_SPEC_MODULES came from, for messages about it.
_ORIGINS: dict[str, str] = {}
_BUILTIN_NAMES: frozenset[str] = frozenset()


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (or replace the spec of the same name: re-imports and reloads are harmless)."""
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _SPECS.pop(name, None)


def _describe(entry_point: EntryPoint) -> str:
    """``'name = value' (package dist)``: what a user needs to find the package that declared it."""
    dist = getattr(entry_point, "dist", None)
    dist_name = getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else None)
    where = f" of the package {dist_name!r}" if dist_name else ""
    return f"entry point {entry_point.name!r} = {entry_point.value!r}{where} (group {ENTRY_POINT_GROUP!r})"


def _entry_point_failed(entry_point: EntryPoint, problem: str) -> None:
    dist = getattr(entry_point, "dist", None)
    dist_name = getattr(dist, "name", None) or "the package that declares it"
    description = f"{_describe(entry_point)}: {problem}"
    _EXTERNAL_FAILURES.append(description)
    warnings.warn(
        f"neuroada_plugin skipped the method {description}. Its method is unavailable; the others work. "
        f"Reinstall {dist_name} (or a version that matches this neuroada_plugin), or uninstall it.",
        ExternalMethodWarning,
        stacklevel=4,
    )


def _load_entry_point(entry_point: EntryPoint, taken: dict[str, str]) -> None:
    """Load one entry point; whatever goes wrong becomes a warning, never an exception.

    A built-in's name is never replaced (a package must not silently change what ``adapter: neuroada``
    means). ``taken``: method names already claimed by an earlier entry point, with its description
    (the first in name order keeps the name).
    """
    before = dict(_SPECS)
    try:
        loaded = entry_point.load()
    except Exception as error:  # an import error, or anything its module raises while registering
        _SPECS.clear()
        _SPECS.update(before)
        _entry_point_failed(entry_point, f"loading it raised {type(error).__name__}: {error}")
        return
    if isinstance(loaded, MethodSpec):
        candidates = [loaded]
    else:
        candidates = [spec for name, spec in _SPECS.items() if before.get(name) is not spec]
        if not candidates and hasattr(loaded, "__dict__"):
            # Its module had been imported before (and registered then): its specs are its attributes.
            candidates = [v for v in vars(loaded).values() if isinstance(v, MethodSpec) and _SPECS.get(v.name) is v]
    _SPECS.clear()
    _SPECS.update(before)  # registered below, one by one, once checked
    if not candidates:
        _entry_point_failed(
            entry_point,
            f"it loaded {loaded!r:.100}, which is not a MethodSpec, and registered no MethodSpec "
            "(its module must call neuroada_plugin.registry.register(MethodSpec(...)), or the entry point "
            "must name a MethodSpec object as 'module:attribute')",
        )
        return
    for spec in candidates:
        if spec.name in _BUILTIN_NAMES:
            warnings.warn(
                f"neuroada_plugin ignored the method {spec.name!r} of the {_describe(entry_point)}: a built-in "
                f"method has that name and keeps it. Rename the method in that package, or uninstall it.",
                ExternalMethodWarning,
                stacklevel=3,
            )
        elif spec.name in taken and _SPECS.get(spec.name) is not spec:
            warnings.warn(
                f"neuroada_plugin ignored the method {spec.name!r} of the {_describe(entry_point)}: the "
                f"{taken[spec.name]} registered that name first. Uninstall one of the two packages.",
                ExternalMethodWarning,
                stacklevel=3,
            )
        else:
            register(spec)
            taken[spec.name] = _ORIGINS[spec.name] = _describe(entry_point)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points  # here, not at import: scanning the installed metadata costs

    taken: dict[str, str] = {}
    try:
        found = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as error:  # unreadable metadata somewhere on sys.path must not break the built-ins
        warnings.warn(
            f"neuroada_plugin could not list the {ENTRY_POINT_GROUP!r} entry points ({type(error).__name__}: "
            f"{error}); methods of other packages are unavailable.",
            ExternalMethodWarning,
            stacklevel=3,
        )
        return
    for entry_point in sorted(found, key=lambda ep: (ep.name, ep.value)):
        _load_entry_point(entry_point, taken)


def _ensure_builtins() -> None:
    """Load every method once: built-ins, then installed entry points (by name), then ``$NEUROADA_PLUGIN_METHODS``.

    Built-ins first so that no other package can take their names; the environment variable last
    so that a developer's module can still replace anything while working on it.
    """
    global _BUILTINS_LOADED, _BUILTIN_NAMES
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in BUILTIN_SPEC_MODULES:
            importlib.import_module(module)
        _BUILTIN_NAMES = frozenset(_SPECS)
        _load_entry_points()
        extra = [m.strip() for m in os.environ.get(EXTRA_METHODS_ENV, "").split(",") if m.strip()]
        for module in extra:
            before = dict(_SPECS)
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(
                    f"{EXTRA_METHODS_ENV} names {module!r}, which cannot be imported ({error}). Put its folder on "
                    f"PYTHONPATH or remove it from {EXTRA_METHODS_ENV}."
                ) from error
            for name, spec in _SPECS.items():
                if before.get(name) is not spec:
                    _ORIGINS[name] = f"module {module!r} named in {EXTRA_METHODS_ENV}"


def discard_broken(name: str, reason: str) -> None:
    """Drop method ``name`` from the registry because its classes failed (``reason``), remembering why.

    Called by the PEFT registration for a method from outside this package whose config or tuner
    cannot be imported: removed, it no longer breaks what reads every method (the Axolotl plugin's
    keys and validation), and asking for it later names the failure.
    """
    _EXTERNAL_FAILURES.append(f"{method_origin(name)}: {reason}")
    unregister(name)


def method_origin(name: str) -> str | None:
    """Where method ``name`` came from, for messages: ``None`` for a built-in; else its entry point
    (and package) or its ``NEUROADA_PLUGIN_METHODS`` module, or ``"registered at run time"``."""
    _ensure_builtins()
    if name in _BUILTIN_NAMES:
        return None
    return _ORIGINS.get(name, "registered at run time")


def _failures_note() -> str:
    if not _EXTERNAL_FAILURES:
        return ""
    return " These methods from outside this package failed to load (see the warnings): " + "; ".join(
        _EXTERNAL_FAILURES
    )


def methods() -> dict[str, MethodSpec]:
    """Every registered method, by name (built-ins first, in registration order)."""
    _ensure_builtins()
    return dict(_SPECS)


def get_method(name: str) -> MethodSpec:
    """The spec called ``name`` (case-insensitive); :class:`UnknownMethodError` lists the known ones."""
    specs = methods()
    spec = specs.get(name.lower())
    if spec is None:
        raise UnknownMethodError(
            f"Unknown method {name!r}; known methods: {', '.join(sorted(specs)) or 'none'}.{_failures_note()}"
        )
    return spec


def method_for_peft_type(peft_type: str) -> MethodSpec:
    """The spec whose PEFT type is ``peft_type`` (as written in ``adapter_config.json``)."""
    wanted = str(peft_type).upper()
    for spec in methods().values():
        if spec.peft_type == wanted:
            return spec
    known = ", ".join(sorted(s.peft_type for s in _SPECS.values())) or "none"
    raise UnknownMethodError(
        f"No method of this package has PEFT type {peft_type!r}; known: {known}.{_failures_note()}"
    )
