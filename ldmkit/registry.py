"""The conditioner registry: collects specs from plugins, validates them, builds configs and models.

Every plugin's ``ldmkit_conditioners`` hook is called on its own so that each spec is attributed to
its provider. A plugin whose hook raises, or returns something that is not a valid
:class:`~ldmkit.types.ConditionerSpec`, is marked failed (see :mod:`ldmkit.plugins`).

Two plugins providing one conditioner name (or declaring one condition field) is a *conflict*: both
plugins are marked ``conflict`` with the error, the clashing name is withheld, and only a config that
uses it is refused (:class:`ConditionerConflictError`, naming both providers and the environment
variable that resolves it). Everything else — their other conditioners, every other plugin, models
that do not use the name — keeps working.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import Field

from ldmkit.plugins import PluginManager, get_plugin_manager
from ldmkit.types import (
    NAME_PATTERN,
    RESERVED_FIELDS,
    ConditionerConfig,
    ConditionerContext,
    ConditionerSpec,
    ConditionField,
    Route,
    normalize_name,
)

__all__ = ["Registry", "ConditionerConflictError", "UnknownConditionerError", "get_registry", "SpecError"]


class SpecError(ValueError):
    """A plugin returned a spec that violates the hook spec."""


class ConditionerConflictError(RuntimeError):
    """Two plugins provide a conditioner (or declare a condition field) with the same name, and a config uses it."""


class UnknownConditionerError(KeyError):
    """A config names a conditioner no installed plugin provides."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def validate_spec(spec: Any) -> ConditionerSpec:
    """Check one spec returned by a plugin; raise :class:`SpecError` saying what is wrong."""
    if not isinstance(spec, ConditionerSpec):
        raise SpecError(f"ldmkit_conditioners must return ConditionerSpec objects, got {type(spec).__name__}")
    if not NAME_PATTERN.match(spec.name):
        raise SpecError(
            f"conditioner name {spec.name!r} is invalid: after normalization names must match {NAME_PATTERN.pattern}"
        )
    if not (isinstance(spec.config_cls, type) and issubclass(spec.config_cls, ConditionerConfig)):
        raise SpecError(f"conditioner {spec.name!r}: config_cls must subclass ldmkit.ConditionerConfig")
    annotation = spec.config_cls.model_fields["type"].annotation
    if typing.get_origin(annotation) is not Literal or list(typing.get_args(annotation)) != [spec.name]:
        raise SpecError(
            f"conditioner {spec.name!r}: {spec.config_cls.__name__}.type must be declared "
            f"`type: Literal[{spec.name!r}] = {spec.name!r}`, found {annotation!r}"
        )
    for f in spec.fields:
        if not isinstance(f, ConditionField):
            raise SpecError(f"conditioner {spec.name!r}: fields must be ConditionField objects, got {type(f).__name__}")
        if not NAME_PATTERN.match(f.name):
            raise SpecError(f"conditioner {spec.name!r}: field name {f.name!r} is invalid: names must match {NAME_PATTERN.pattern}")
        if f.name in RESERVED_FIELDS:
            raise SpecError(
                f"conditioner {spec.name!r}: field {f.name!r} is built in (reserved: {', '.join(RESERVED_FIELDS)}); "
                "read it with `key:` instead of declaring it"
            )
        if f.derive is not None and not callable(f.derive):
            raise SpecError(f"conditioner {spec.name!r}: field {f.name!r}: derive must be callable (sample) -> value")
        try:
            f.adapter  # noqa: B018 - builds the pydantic validator now, so a bad value_type fails here
        except Exception as exc:
            raise SpecError(f"conditioner {spec.name!r}: field {f.name!r}: value_type is not a type pydantic can validate: {exc}") from None
    if spec.config_cls.model_config.get("extra") != "forbid":
        raise SpecError(f"conditioner {spec.name!r}: {spec.config_cls.__name__} must keep extra='forbid'")
    if not callable(spec.build):
        raise SpecError(f"conditioner {spec.name!r}: build must be callable (config, context) -> Conditioner")
    route = getattr(spec.build, "route", None)
    if isinstance(spec.build, type) and isinstance(route, Route) and route not in spec.routes:
        raise SpecError(
            f"conditioner {spec.name!r}: the spec declares route {spec.route_label} but "
            f"{spec.build.__name__}.route is {route.value}"
        )
    return spec


class Registry:
    """The installed conditioners, by name, with their providers."""

    def __init__(self, pm: PluginManager):
        self.pm = pm
        self.specs: dict[str, ConditionerSpec] = {}
        self.providers: dict[str, str] = {}
        self.fields: dict[str, ConditionField] = {}
        self.field_providers: dict[str, str] = {}
        #: withheld names: ``{name: [plugin, ...]}`` for conditioners and for fields
        self.conflicts: dict[str, list[str]] = {}
        self.field_conflicts: dict[str, list[str]] = {}
        #: every declaration, clashing ones included: ``{field: {plugin: ConditionField}}``
        self.declared_fields: dict[str, dict[str, ConditionField]] = {}
        found: dict[str, list[tuple[str, ConditionerSpec]]] = {}
        declared: dict[str, list[tuple[str, ConditionField]]] = {}
        for impl in pm.hook.ldmkit_conditioners.get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                result = impl.function()
                if result is None or isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
                    raise SpecError(
                        f"ldmkit_conditioners must return an iterable of ConditionerSpec, got {type(result).__name__}"
                    )
                specs = [validate_spec(s) for s in result]
                names = [s.name for s in specs]
                dupes = sorted({n for n in names if names.count(n) > 1})
                if dupes:
                    raise SpecError(f"the plugin provides {', '.join(dupes)} more than once")
                own_fields = _plugin_fields(specs)
            except Exception as exc:
                pm.mark_failed(plugin_name, exc)
                continue
            record = pm.records.get(plugin_name)
            if record is not None:
                record.conditioners = [s.name for s in specs]
                record.fields = sorted(own_fields)
            for spec in specs:
                found.setdefault(spec.name, []).append((plugin_name, spec))
            for f in own_fields.values():
                declared.setdefault(f.name, []).append((plugin_name, f))
                self.declared_fields.setdefault(f.name, {})[plugin_name] = f
        for name in sorted(found):
            provs = found[name]
            if len(provs) > 1:
                self.conflicts[name] = [p for p, _ in provs]
            else:
                self.providers[name], self.specs[name] = provs[0]
        for name in sorted(declared):
            provs = declared[name]
            if len(provs) > 1:
                self.field_conflicts[name] = [p for p, _ in provs]
            else:
                self.field_providers[name], self.fields[name] = provs[0]
        for what, table in (("conditioner", self.conflicts), ("condition field", self.field_conflicts)):
            for name, plugins in table.items():
                for plugin in plugins:
                    others = " and ".join(_who(pm, p) for p in plugins if p != plugin)
                    pm.mark_conflict(plugin, f"{what} {name!r} is also provided by {others}; "
                                             f"{_resolution(pm, plugins)}")

    # -- lookup ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.specs)

    def get(self, name: str) -> ConditionerSpec:
        key = normalize_name(name) if isinstance(name, str) else name
        if key in self.conflicts:
            raise ConditionerConflictError(self.conflict_message(key))
        if key not in self.specs:
            raise UnknownConditionerError(self.unknown_message(name))
        return self.specs[key]

    def conflict_message(self, name: str) -> str:
        """Why the conditioner ``name`` is withheld, and how to resolve it."""
        return self._clash("conditioner", name, self.conflicts.get(name, []))

    def field_conflict_message(self, name: str) -> str:
        """Why the condition field ``name`` is withheld, and how to resolve it."""
        return self._clash("condition field", name, self.field_conflicts.get(name, []))

    def _clash(self, what: str, name: str, plugins: list[str]) -> str:
        who = " and ".join(_who(self.pm, p) for p in plugins)
        return f"{what} {name!r} is provided by more than one plugin: {who}; {_resolution(self.pm, plugins)}"

    def unknown_message(self, name: Any) -> str:
        installed = ", ".join(self.names()) or "(none)"
        failed = [r.name for r in self.pm.records.values() if r.status == "failed"]
        blocked = [r.name for r in self.pm.records.values() if r.status == "blocked"]
        msg = f"no conditioner {name!r}; installed: {installed}"
        if failed:
            msg += f" (failed plugins: {', '.join(failed)}; see `ldmkit plugins`)"
        if blocked:
            msg += f" (blocked plugins: {', '.join(blocked)})"
        return msg

    # -- configs ---------------------------------------------------------------------------------
    def config_union(self) -> Any:
        """The discriminated union (on ``type``) of every registered conditioner config."""
        classes = [self.specs[n].config_cls for n in self.names()]
        if not classes:
            return ConditionerConfig
        if len(classes) == 1:
            return classes[0]
        return Annotated[Union[tuple(classes)], Field(discriminator="type")]

    def parse_config(self, data: Any) -> ConditionerConfig:
        """Validate one conditioner config (a dict or an instance) against its plugin's config class."""
        if isinstance(data, ConditionerConfig):
            spec = self.get(data.type)
            if isinstance(data, spec.config_cls):
                return data
            data = data.model_dump()
        if not isinstance(data, dict):
            raise ValueError(f"a conditioner config must be a mapping, got {type(data).__name__}")
        if "type" not in data:
            raise ValueError(f"a conditioner config needs 'type'; installed: {', '.join(self.names()) or '(none)'}")
        spec = self.get(data["type"])
        return spec.config_cls.model_validate({**data, "type": spec.name})

    # -- building --------------------------------------------------------------------------------
    def build(self, config: ConditionerConfig | dict, context: ConditionerContext | None = None):
        """Build the conditioner a config describes; checks it declares what its spec says."""
        config = self.parse_config(config)
        spec = self.get(config.type)
        conditioner = spec.build(config, context or ConditionerContext())
        route = getattr(conditioner, "route", None)
        if not isinstance(route, Route) or route not in spec.routes:
            raise SpecError(
                f"conditioner {spec.name!r} (plugin {self.providers[spec.name]!r}) built an object with route "
                f"{route!r}, but its spec declares {spec.route_label}"
            )
        return conditioner


def _plugin_fields(specs: list[ConditionerSpec]) -> dict[str, ConditionField]:
    """The fields one plugin declares (several of its specs may declare the same field, identically)."""
    fields: dict[str, ConditionField] = {}
    for spec in specs:
        for f in spec.fields:
            if f.name in fields and fields[f.name] != f:
                raise SpecError(f"the plugin declares field {f.name!r} twice, differently")
            fields.setdefault(f.name, f)
    return fields


def _who(pm: PluginManager, plugin: str) -> str:
    record = pm.records.get(plugin)
    return f"plugin {plugin!r} ({record.distribution or 'not installed'})" if record else f"plugin {plugin!r}"


def _resolution(pm: PluginManager, plugins: list[str]) -> str:
    options = " or ".join(f"LDMKIT_DISABLE_PLUGINS={p}" for p in plugins)
    return f"uninstall one, or choose with {options}"


_REGISTRY: Registry | None = None


def get_registry(*, refresh: bool = False) -> Registry:
    """The registry of the process-wide plugin manager (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = Registry(get_plugin_manager())
    return _REGISTRY


def _reset_cache() -> None:
    global _REGISTRY
    _REGISTRY = None
