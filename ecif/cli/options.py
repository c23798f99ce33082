"""Flags built from the options dataclasses' fields (``ecif/options.py``).

A flag takes its default, help text and choices from the field it sets, so the command line
cannot drift from the Python API; the flag adds only how the command line spells it (the
flag's name, an argparse ``type`` that parses it, a ``metavar``). ``tests/test_cli_options.py``
checks every verb's flags against the fields and function parameters they map to.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING
from typing import Any

from ecif.options import field_of

FIELD = "ecif_field"  # attribute of an argparse action built here: (options class, field name)


def add_field(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    name: str,
    *flags: str,
    default: Any = MISSING,
    note: str = "",
    old: tuple[str, ...] = (),
    **kw: Any,
) -> argparse.Action:
    """``--name`` (or ``flags``) for ``cls``'s field ``name``: its default (or ``default``,
    the same value as the command line spells it, which ``type`` parses back), its help
    (plus ``note``), its choices; a bool that defaults to False is a switch. ``old``: former
    spellings, still accepted (hidden, with a warning on stderr). ``dest`` defaults to the
    field's name."""
    f = field_of(cls, name)
    flags = flags or (f"--{name.replace('_', '-')}",)
    value = f.default if default is MISSING else default
    kw.setdefault("help", f.metadata["help"] + note)
    if f.default is False and "action" not in kw:
        kw["action"] = "store_true"
    elif "choices" in f.metadata and "type" not in kw:
        kw.setdefault("choices", f.metadata["choices"])
    if flags[0].startswith("-"):
        kw.setdefault("dest", name)
    action = p.add_argument(*flags, default=value, **kw)
    setattr(action, FIELD, (cls, name))
    for spelling in old:
        p.add_argument(
            spelling,
            dest=action.dest,
            action=OldSpelling,
            new=flags[0],
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **{k: v for k, v in kw.items() if k in ("type", "choices")},
        )
    return action


class OldSpelling(argparse.Action):
    """A flag's former name: sets the same option and says (on stderr) what it is now."""

    def __init__(self, option_strings, dest, new: str = "", **kw: Any):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"warning: {option_string} is the old name of {self.new}, which it will stop "
            "meaning in the next release",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)
