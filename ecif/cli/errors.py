"""What the command line reports as a one-line ``error: ...`` (exit 2) instead of a traceback.

User errors are the project's own error types (a folder that is not an embedding or audit
folder, an unreadable input, a model that cannot be loaded, bad embeddings, a bad option
found once the data is known) and operating-system errors on the user's files. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

# module -> class names; a class is only checked when its module is already imported (an
# exception cannot be of a type whose module never loaded), so `ecif --help` stays light.
_USER_ERRORS = {
    "ecif.device": ("DeviceError",),
    "ecif.data.layout": ("FolderError",),
    "ecif.data.readers": ("InputError",),
    "ecif.data.models": ("ModelLoadError",),
    "ecif.data.features": ("FeatureCacheError",),
    "ecif.data.embedding_set": ("EmbeddingSetError",),
    "ecif.data.index": ("FaissIndexError",),
    "ecif.audit.folder": ("AuditFolderError",),
    "ecif.audit.checks": ("AuditInputError",),
    "ecif.audit.export": ("ExportError",),
}


class UsageError(ValueError):
    """An option that does not fit the data or another option (found before any work)."""


def is_user_error(e: BaseException) -> bool:
    """True for the errors the command line reports in one line (see the module docstring)."""
    if isinstance(e, (UsageError, OSError)):
        return True
    for mod, names in _USER_ERRORS.items():
        m = sys.modules.get(mod)
        if m is not None and isinstance(e, tuple(getattr(m, n) for n in names)):
            return True
    return False


def describe(e: BaseException) -> str:
    """One line: ``path: No such file or directory`` rather than ``[Errno 2] ...``."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        text = f"{where}: {e.strerror}" if where else e.strerror
    elif isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    else:
        text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``ecif score: error: ... (see ecif score --help)``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` once, and only where there is a default worth naming: not for
    required options, flags, None defaults, or help that already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.required:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text  # (identity: a default of 0 is worth naming)
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


class _StderrHandler(logging.Handler):
    """``warning: ...`` on whatever sys.stderr is at the time (tests swap it)."""

    _ecif = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """Library warnings on stderr as ``warning: ...`` lines (one handler per process)."""
    root = logging.getLogger()
    if not any(getattr(h, "_ecif", False) for h in root.handlers):
        root.addHandler(_StderrHandler(level=logging.WARNING))
