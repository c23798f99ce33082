"""Where to compute: one meaning of ``"auto"`` for the API, the command line and the app.

Every ``device`` option defaults to ``"auto"`` (``DEFAULT_DEVICE``): CUDA when torch sees a
GPU, else the CPU, so a CPU machine computes exactly what it did with ``"cpu"``.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(device: str = DEFAULT_DEVICE) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` (or ``cuda:N``) without a
    GPU is a ``DeviceError``; anything else is returned as given."""
    import torch  # here, so that `ecif --help` does not load torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but no CUDA device is available")
    return device
