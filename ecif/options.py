"""Options objects: one dataclass per stage, each default and help text in one field.

A stage's options (``FitArgs``, ``SolverArgs``, ``AuditArgs``, ``TraceArgs``, ...) are
dataclass fields made by ``option``: the default, and ``metadata["help"]``, the sentence the
command line shows (its flags are built from the fields: ``ecif/cli/options.py``). A stage
that hands an option on to another takes that stage's field with ``borrow`` instead of
declaring it again, so the default lives in one place. ``renamed`` keeps an old keyword or
attribute working for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    choices: tuple | None = None,
) -> Any:
    """A dataclass field with its help text (and the values it takes, when a fixed set)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The dataclass field ``name`` of ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name`` (a fresh one for a factory)."""
    f = field_of(cls, name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def help_of(cls: type, name: str) -> str:
    """The help text of ``cls``'s field ``name``."""
    return field_of(cls, name).metadata.get("help", "")


def borrow(cls: type, name: str, *, help: str | None = None) -> Any:
    """``cls``'s field ``name`` for another options class: the same default and values (and
    help, unless this stage says more); ``metadata["source"]`` names where it lives."""
    f = field_of(cls, name)
    meta = dict(f.metadata)
    meta["source"] = (cls, name)
    if help is not None:
        meta["help"] = help
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)


def source_of(cls: type, name: str) -> tuple[type, str]:
    """Where the default of ``cls.name`` lives: (class, field), following ``borrow``."""
    f = field_of(cls, name)
    while "source" in f.metadata:
        cls, name = f.metadata["source"]
        f = field_of(cls, name)
    return cls, name


def with_options(cls: type[T], args: T | None, options: dict[str, Any], where: str) -> T:
    """``args`` (or ``cls``'s defaults) with ``options`` (field names of ``cls``) set: how a
    function takes its stage's options object and/or its fields as keywords."""
    names = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(options) - set(names))
    if bad:
        raise TypeError(f"{where}() got unexpected keyword(s) {bad}; its options: {names}")
    return dataclasses.replace(args, **options) if args is not None else cls(**options)


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """The one deprecation message for a renamed keyword, attribute or flag."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def rename_keywords(
    kw: dict[str, Any],
    renames: dict[str, str],
    where: str,
    owner: type | None = None,
    stacklevel: int = 3,
) -> dict[str, Any]:
    """``kw`` with old keyword names moved to their new ones, each with a
    ``DeprecationWarning`` pointing ``stacklevel`` frames up (3: the caller of the function
    that calls this); ``old="args.new"`` moves it into ``owner``'s options field ``args``."""
    moved: dict[str, dict[str, Any]] = {}
    for old, new in renames.items():
        if old not in kw:
            continue
        holder, _, attr = new.rpartition(".")
        if holder:  # moved into an options object: ``old="args.new"``
            kind = type(default_of(owner, holder)).__name__
            warn_renamed(f"{where}({old}=...)", f"{holder}={kind}({attr}=...)", stacklevel + 1)
            moved.setdefault(holder, {})[attr] = kw.pop(old)
            continue
        if new in kw:
            raise TypeError(f"{where}: give {new}= only ({old}= is its old name)")
        warn_renamed(f"{where}({old}=...)", f"{new}=", stacklevel + 1)
        kw[new] = kw.pop(old)
    for holder, values in moved.items():
        base = kw.get(holder)
        kw[holder] = dataclasses.replace(
            base if base is not None else default_of(owner, holder), **values
        )
    return kw


def renamed(**renames: str) -> Callable[[T], T]:
    """Keep old keyword names working for one release, with a ``DeprecationWarning``: on a
    function (``old="new"``), or on a dataclass (its constructor, and the old name as an
    attribute that reads and writes the new one), where ``old="args.new"`` says the option
    moved into the options object in field ``args``."""

    def wrap(obj):
        is_class = isinstance(obj, type)
        target = obj.__init__ if is_class else obj
        where = obj.__qualname__  # a class or a method; a function with its module
        if not is_class and "." not in where:
            where = f"{obj.__module__}.{where}"

        @functools.wraps(target)
        def call(*args, **kw):
            owner = obj if is_class else None
            return target(*args, **rename_keywords(kw, renames, where, owner))

        if not is_class:
            return call
        obj.__init__ = call
        for old, new in renames.items():
            setattr(obj, old, _alias(f"{where}.{old}", new))
        return obj

    return wrap


def _alias(old: str, new: str) -> property:
    holder, _, attr = new.rpartition(".")

    def owner(self):
        return getattr(self, holder) if holder else self

    def get(self):
        warn_renamed(old, new)
        return getattr(owner(self), attr)

    def put(self, value):
        warn_renamed(old, new)
        setattr(owner(self), attr, value)

    return property(get, put, doc=f"Deprecated: {new}.")
