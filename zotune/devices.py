"""Where a run computes: device names, the default dtype of a device, and model placement.

`--device auto` picks CUDA, then MPS, then the CPU. `--dtype auto` is bfloat16 on a CUDA GPU
that supports it (Ampere and later) and float32 everywhere else (the CPU, MPS, older GPUs).
A model larger than one device is placed by accelerate (`--device-map auto`, `--max-memory`);
every weight must then live on a device: weights offloaded to the CPU or disk behind hooks are
refused, because a perturbation written in place into an offloaded copy would be lost.
"""

from __future__ import annotations

import re

import torch

DEVICES = "auto, cpu, cuda, cuda:N, mps"
QUANTIZE = ("none", "8bit", "4bit")


class DeviceError(ValueError):
    """A device, dtype or placement cannot be used here; the message says what to fix."""


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` means on this machine; a one-line DeviceError if it is not here."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}): use --device cpu or auto"
            )
        index = int(match.group(1) or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: Apple's MPS backend is not available here")
        return torch.device("mps")
    raise DeviceError(f"unknown --device '{name}': use one of {DEVICES}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_dtype(device: torch.device) -> str:
    """bfloat16 on a CUDA GPU that computes in it natively, float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`dtype`, with "auto" made the device's default."""
    return default_dtype(device) if dtype == "auto" else dtype


def parse_max_memory(text: str | dict | None) -> dict[int | str, str] | None:
    """--max-memory "0=20GiB,1=20GiB,cpu=60GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    (accelerate's form: GPU indices as ints)."""
    if text is None or isinstance(text, dict):
        return text
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "mps", "disk")):
            raise DeviceError(
                f"--max-memory: cannot read '{part}': write DEVICE=SIZE pairs, "
                "e.g. 0=20GiB,1=20GiB,cpu=60GiB"
            )
        out[int(key) if key.isdigit() else key] = size
    return out or None


def placement(model: torch.nn.Module) -> str:
    """Where a model's weights are, in words: 'cuda:0', or 'cuda:0 (12 tensors), cuda:1 (...)'."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        counts[str(p.device)] = counts.get(str(p.device), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{d} ({n} tensors)" for d, n in counts.items())


def check_placed(model: torch.nn.Module, name: str) -> None:
    """Refuse a model some of whose weights accelerate offloaded (left on the meta device,
    the real values on the CPU or disk, copied in at each forward pass)."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise DeviceError(
            f"model '{name}' does not fit on the devices given: {len(offloaded)} tensors "
            f"(e.g. {offloaded[0]}) were offloaded to the CPU or disk, which zeroth-order "
            "training cannot perturb in place: raise --max-memory, add devices, or use "
            "--quantize 8bit/4bit with a PEFT scheme"
        )


def describe_placement(cfg: object) -> str:
    """The line a run prints at its start: where it computes, in which dtype (a TrainConfig,
    validated: its dtype is no longer "auto")."""
    device_map = getattr(cfg, "device_map", None)
    if device_map is not None:
        gpus = torch.cuda.device_count()
        where = f"device map {device_map} over {gpus} CUDA GPU(s)" if gpus else "device map on cpu"
    else:
        where = f"device {resolve_device(getattr(cfg, 'device', 'auto'))}"
    quantize = getattr(cfg, "quantize", "none")
    base = f", base quantized to {quantize} (bitsandbytes)" if quantize != "none" else ""
    return f"{where}, dtype {getattr(cfg, 'dtype', 'float32')}{base}"
