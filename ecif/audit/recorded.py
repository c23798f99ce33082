"""The engine's warnings raised during an audit, kept as text beside its results.

A non-converged fit or an approximate solve warns once in a terminal and is then lost; an
audit records it so audit.json, the shards' metadata, the CLI summary and the app's
overview all say it (``warnings``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ecif.audit.validation_noise import NoisyValidationWarning
from ecif.engine.warning_types import NOT_CONVERGED, ConvergenceWarning, UnreliableInfluenceWarning

RECORDED = (ConvergenceWarning, UnreliableInfluenceWarning, NoisyValidationWarning)


@contextmanager
def recording_warnings(
    prefix: str = "", categories: tuple[type[Warning], ...] = RECORDED
) -> Iterator[list[str]]:
    """Collect the warnings of ``categories`` (the engine's) raised in the block into the
    yielded list, once per text and with ``prefix``, and warn them again on leaving (so
    callers' filters still see them, an "error" filter included). Other warnings pass as they
    would have; if the block raises, every warning caught is shown as it was."""
    found: list[str] = []
    error: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        for category in categories:
            warnings.simplefilter("always", category)
        try:
            yield found
        except BaseException as err:  # shown once the recording has stopped, then raised
            error = err
    if error is not None:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        raise error
    again = []
    for w in caught:
        if not issubclass(w.category, categories):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        elif (text := prefix + str(w.message)) not in found:
            found.append(text)
            again.append((text, w.category))
    for text, category in again:
        warnings.warn(text, category, stacklevel=3)


def merged(*lists: list[str] | None) -> list[str]:
    """The notes of ``lists`` in order, each once."""
    out: list[str] = []
    for notes in lists:
        for note in notes or []:
            if note not in out:
                out.append(note)
    return out


def not_converged(fit: dict) -> str:
    """The note for a head whose recorded fit stopped short of its tolerance."""
    g, tol = fit.get("grad_max"), fit.get("tol")
    how = f" (largest gradient {g:.2e}, tolerance {tol:.0e})" if g is not None and tol else ""
    return (
        f"the head's fit {NOT_CONVERGED}{how}: scores may be off; see 'fit' in audit.json "
        "(more iterations, a larger --lam or float64 help)"
    )


def audit_notes(info: dict[str, Any]) -> list[str]:
    """What an audit (audit.json, or a table's metadata) warns of: its recorded warnings,
    and a note per head whose fit did not converge where none of them says so (audits
    written before the engine's warnings were recorded)."""
    notes = [str(w) for w in info.get("warnings") or []]
    if not any(NOT_CONVERGED in n for n in notes):
        fits = [f for f in info.get("fit") or [] if isinstance(f, dict)]
        notes += [not_converged(f) for f in fits if f.get("converged") is False][:1]
    return notes
