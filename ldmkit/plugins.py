"""Finding and loading plugins: the pluggy manager, entry points, and a record per plugin.

Nothing is loaded at import time. :func:`get_plugin_manager` builds the manager on first use: it reads
the ``ldmkit`` entry-point group and loads each entry point on its own, so that a plugin which fails
to import, or whose hook violates the spec, is recorded as ``failed`` with its error while the others
keep working. A plugin that implements no ldmkit hook, or an unknown (e.g. misspelled) ``ldmkit_*`` hook,
is failed too, rather than listed ``active`` with nothing in it. Environment variables:

- ``LDMKIT_DISABLE_PLUGINS=a,b``: do not load these plugins (by entry-point or distribution name);
  they are listed as ``blocked``;
- ``LDMKIT_STRICT_PLUGINS=1``: a failing plugin raises :class:`PluginError` instead of being recorded.

Tests use :func:`reset` to rebuild the manager, and may pass plugin objects to
:func:`get_plugin_manager` via ``extra`` to register modules that are not installed.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import pluggy

from ldmkit import hookspecs
from ldmkit.types import normalize_name

__all__ = [
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_DISTRIBUTIONS",
    "PluginError",
    "PluginRecord",
    "PluginManager",
    "get_plugin_manager",
    "reset",
    "strict_mode",
    "disabled_names",
]

ENTRY_POINT_GROUP = "ldmkit"

#: The distributions that live under ``plugins/`` in this repository. Schemas are generated from
#: these only, so that what a user happens to have installed never changes the committed schemas.
#: ``tests/test_plugins.py`` checks that this matches ``plugins/*/pyproject.toml``: add a new built-in
#: plugin here or it is silently left out of the schemas.
FIRST_PARTY_DISTRIBUTIONS = (
    "ldmkit-class",
    "ldmkit-inpaint",
    "ldmkit-layout",
    "ldmkit-lowres",
    "ldmkit-plugin-template",
    "ldmkit-semantic",
    "ldmkit-text",
)

#: ``conflict``: loaded, but another plugin provides one of its conditioner or field names; that name
#: is withheld (a config using it is refused) while its other conditioners work.
Status = Literal["active", "blocked", "failed", "conflict"]


class PluginError(RuntimeError):
    """A plugin could not be loaded or violates the hook spec (raised in strict mode)."""


@dataclass
class PluginRecord:
    """What ``ldmkit plugins`` lists for one plugin."""

    name: str
    version: str | None
    status: Status
    distribution: str | None = None
    conditioners: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    error: str | None = None
    plugin: Any = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "distribution": self.distribution,
            "conditioners": list(self.conditioners),
            "fields": list(self.fields),
            "error": self.error,
        }


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``ldmkit: warning: ...`` on stderr, once per process and message (misconfigured env vars)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"ldmkit: warning: {message}", file=sys.stderr)


def strict_mode() -> bool:
    """True when ``LDMKIT_STRICT_PLUGINS`` is set to a true value (a value that is neither true nor false
    is warned about and treated as false)."""
    value = os.environ.get("LDMKIT_STRICT_PLUGINS", "").strip().lower()
    if value not in _TRUE | _FALSE:
        warn_once(f"LDMKIT_STRICT_PLUGINS={value!r} is not a boolean (use 1/true/yes/on or 0/false/no/off); "
                  "strict mode is off")
    return value in _TRUE


def disabled_names() -> set[str]:
    """Normalized plugin names listed in ``LDMKIT_DISABLE_PLUGINS`` (comma separated)."""
    raw = os.environ.get("LDMKIT_DISABLE_PLUGINS", "")
    return {normalize_name(part) for part in raw.split(",") if part.strip()}


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers a :class:`PluginRecord` for every plugin it saw."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}

    def add_plugin(self, plugin: Any, name: str, *, version: str | None = None, distribution: str | None = None) -> PluginRecord:
        """Register one plugin object, recording failure (or raising in strict mode)."""
        name = normalize_name(name)
        if name in disabled_names() or (distribution and normalize_name(distribution) in disabled_names()):
            record = PluginRecord(name, version, "blocked", distribution)
            self.records[name] = record
            return record
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # pluggy validation errors, duplicate registration, ...
            record = self._fail(name, version, distribution, exc)
        else:
            problem = self._hook_problem(plugin)
            if problem is None:
                record = PluginRecord(name, version, "active", distribution, plugin=plugin)
            else:
                self.unregister(plugin)
                record = self._fail(name, version, distribution, PluginError(problem))
        self.records[name] = record
        return record

    def _hook_problem(self, plugin: Any) -> str | None:
        """Why a just-registered plugin violates the hook spec, or None when it is fine.

        pluggy accepts hook implementations whose names match no hook spec (it reports them only in
        ``check_pending``) and plugins with no implementation at all; either would otherwise be listed
        ``active`` while providing nothing, so a misspelled hook would go unnoticed.
        """
        unknown, known = [], []
        for caller in self.get_hookcallers(plugin) or []:
            if caller.has_spec():
                known.append(caller.name)
            elif any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(caller.name)
        hooks = sorted(name for name, caller in vars(self.hook).items() if caller.has_spec())
        expected = ", ".join(f"{h}(...)" for h in hooks)
        if unknown:
            guesses = sorted({g for u in unknown for g in difflib.get_close_matches(u, hooks, n=1)})
            guess = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
            return (f"implements unknown ldmkit hook {', '.join(sorted(unknown))}{guess}; "
                    f"expected {expected}")
        if not known:
            hint = ""
            unmarked = sorted(
                attr for attr in dir(plugin)
                if attr.startswith(f"{hookspecs.PROJECT_NAME}_") and inspect.isroutine(getattr(plugin, attr, None))
            )
            if unmarked:
                hint = f" ({', '.join(unmarked)} is defined but not decorated with @ldmkit.hookimpl)"
            return f"implements no ldmkit hook; expected {expected}{hint}"
        return None

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP, only_distributions: Iterable[str] | None = None) -> None:
        """Load each entry point of ``group`` on its own; failures are recorded, not fatal."""
        only = {normalize_name(d) for d in only_distributions} if only_distributions is not None else None
        strict_mode()  # warns now about a value that is not a boolean
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if only is not None and (dist is None or normalize_name(dist) not in only):
                continue
            name = normalize_name(ep.name)
            if name in self.records:
                self.records[name] = self._fail(
                    name, version, dist,
                    PluginError(f"two installed plugins use the entry-point name {name!r} "
                                f"({self.records[name].distribution} and {dist})"),
                )
                continue
            if name in disabled_names() or (dist and normalize_name(dist) in disabled_names()):
                self.records[name] = PluginRecord(name, version, "blocked", dist)
                continue
            try:
                plugin = ep.load()
            except BaseException as exc:  # a plugin's import may even call sys.exit
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.records[name] = self._fail(name, version, dist, exc)
                continue
            self.add_plugin(plugin, name, version=version, distribution=dist)
        if only is None:
            known = set(self.records) | {normalize_name(r.distribution) for r in self.records.values() if r.distribution}
            for name in sorted(disabled_names() - known):
                warn_once(f"LDMKIT_DISABLE_PLUGINS names {name!r}, which is no installed plugin "
                          f"(installed: {', '.join(sorted(self.records)) or 'none'})")

    def mark_failed(self, name: str, exc: BaseException) -> None:
        """Record that an active plugin violated the hook spec and unregister it."""
        record = self.records[name]
        if record.plugin is not None and self.is_registered(record.plugin):
            self.unregister(record.plugin)
        self.records[name] = self._fail(name, record.version, record.distribution, exc)

    def mark_conflict(self, name: str, message: str) -> None:
        """Record that a plugin shares a conditioner or field name with another (it stays registered)."""
        record = self.records.get(name)
        if record is None:
            return
        if strict_mode():
            raise PluginError(f"plugin {name!r} ({record.distribution or 'not installed'}): {message}")
        record.status = "conflict"
        record.error = message if not record.error else f"{record.error}; {message}"

    def _fail(self, name: str, version: str | None, dist: str | None, exc: BaseException) -> PluginRecord:
        if strict_mode():
            raise PluginError(f"plugin {name!r} ({dist or 'not installed'}) failed: {_describe(exc)}") from exc
        return PluginRecord(name, version, "failed", dist, error=_describe(exc))


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


_MANAGER: PluginManager | None = None


def get_plugin_manager(*, extra: Iterable[tuple[str, Any]] = (), first_party_only: bool = False) -> PluginManager:
    """The process-wide plugin manager, built (and entry points loaded) on first call.

    ``extra`` registers additional ``(name, plugin)`` pairs (tests); ``first_party_only`` builds a
    separate manager with only this repository's plugins (for schema generation) and does not cache it.
    """
    global _MANAGER
    if first_party_only:
        pm = PluginManager()
        pm.load_entry_points(only_distributions=FIRST_PARTY_DISTRIBUTIONS)
        return pm
    if _MANAGER is None:
        pm = PluginManager()
        pm.load_entry_points()
        _MANAGER = pm
    for name, plugin in extra:
        _MANAGER.add_plugin(plugin, name)
    return _MANAGER


def reset() -> None:
    """Forget the plugin manager (and the registry built from it); the next use rebuilds both."""
    global _MANAGER
    _MANAGER = None
    from ldmkit import registry

    registry._reset_cache()
