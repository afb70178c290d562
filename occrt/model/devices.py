"""Which runtime a device name selects: "cpu" is the numpy + numba runtime; "cuda" / "cuda:N" is the torch path
(occrt/model/decoder_torch.py) on that GPU; "torch-cpu" is the same torch path on the CPU (how the tests cover the
CUDA code where there is no GPU). torch is imported only to check a torch device."""
from __future__ import annotations

import re

from occrt.errors import OccError

DEVICES = ("cpu", "cuda", "cuda:N", "torch-cpu")


def torch_device(device: str) -> str | None:
    """None for the numpy runtime, else the torch device to run on; a one-line OccError when it cannot be used."""
    if device == "cpu":
        return None
    if device == "torch-cpu":
        _import_torch(device)
        return "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?", device):
        raise OccError(f"device {device!r} is not supported (supported: {', '.join(DEVICES)})")
    torch = _import_torch(device)
    if not torch.cuda.is_available():
        raise OccError(f"device {device!r} was asked for, but CUDA is not available "
                       f"(torch {torch.__version__}{'' if torch.version.cuda else ', a build without CUDA'})")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise OccError(f"device {device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _import_torch(device: str):
    try:
        import torch
    except ImportError:
        raise OccError(f"device {device!r} needs torch, which is not installed (the cpu device does not)") from None
    return torch
