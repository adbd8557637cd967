"""Where a measurement or a training run came from: the machine, the versions, the commit.

Every JSON file the project writes (the training records beside the weights, the
benchmark results under ``notebooks/results/``) records :func:`machine`, and the
benchmarks also :func:`versions`, so a number in the book can always be traced to the
hardware, the library versions and the exact source it was measured with (chapter 8
prints them with :func:`describe`).

This module imports only the standard library and ``torch``; :mod:`typsamp.train` and
:mod:`typsamp.bench` import it, and it imports neither.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["ROOT", "machine", "versions", "git_commit", "git_dirty", "load_average", "cpu_name", "describe",
           "read_safetensors"]

#: The repository root when typsamp runs from a checkout (``lib/typsamp/..``).
ROOT = Path(__file__).resolve().parents[2]

#: The packages whose versions :func:`versions` reports by default (those installed).
PACKAGES = ("torch", "numpy", "transformers", "safetensors", "typsamp")


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(root: Path = ROOT) -> str:
    """The commit checked out at ``root`` (40 hex digits), or ``"unknown"`` outside a git checkout."""
    return _git("rev-parse", "HEAD", root=root) or "unknown"


#: Where measurements are written (relative to the repository root). Changes there are
#: the outputs of a run, not the code it measured: ``make bench`` writes one file after
#: another, and the later benchmarks must not count the earlier ones' results as dirt.
RESULTS = "notebooks/results"


def git_dirty(root: Path = ROOT) -> bool | None:
    """True when tracked files at ``root`` differ from the commit (the measurement ran on
    uncommitted code), False when they do not, None outside a git checkout.
    Untracked files do not count, nor do the results under :data:`RESULTS`."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  f":(exclude){RESULTS}", root=root)
    return None if status is None else bool(status)


def load_average() -> float | None:
    """The 1-minute load average, rounded to 0.01 (None where the OS has none): other work
    on the machine when a timing starts skews it."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (read from their metadata, nothing is imported),
    plus Python's; a package that is not installed is left out."""
    if isinstance(packages, str):
        raise TypeError("`packages` must be a sequence of package names, not one string")
    out = {"python": platform.python_version()}
    for name in packages:
        if not isinstance(name, str):
            raise TypeError(f"`packages` must hold package names, got {type(name).__name__}")
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "torch" in out:
        out["torch"] = torch.__version__          # the build actually imported (e.g. 2.13.0+cpu)
    return out


def machine(device: str | torch.device = "cpu") -> dict:
    """Describe where a measurement runs: CPU, cores, torch threads, GPU, versions, commit.

    Keys: ``platform``, ``processor``, ``cpu_count``, ``torch_threads``, ``python``,
    ``torch``, ``device``, ``date`` (UTC, ISO 8601), ``load_average_1min`` (when the run
    starts), ``commit``, ``dirty`` (see :func:`git_dirty`); on a CUDA device also ``gpu``
    and ``cuda`` (the CUDA version torch was built with).
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"`device` must be a string or torch.device, got {type(device).__name__}")
    device = str(device)
    info = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": load_average(),
        "commit": git_commit(),
        "dirty": git_dirty(),
    }
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {device!r} but CUDA is not available on this machine")
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def describe(result: dict, name: str | None = None) -> str:
    """A few readable lines on where ``result`` (a JSON record with ``machine`` and,
    optionally, ``versions`` and ``command``) was measured: the command, the machine,
    the versions and the commit, flagged when the tree was dirty (chapter 8)."""
    if not isinstance(result, dict) or not isinstance(result.get("machine"), dict):
        raise ValueError("`result` must be a dict with a 'machine' entry (as machine() returns)")
    m = result["machine"]
    found = result.get("versions") or {"torch": m.get("torch", "unknown")}
    found = {k: v for k, v in found.items() if k != "python"}
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    lines = []
    command = result.get("command")
    if name is not None:
        lines.append(f"{name}: {command}" if command else name)
    elif command:
        lines.append(command)
    lines.append(f"  machine: {m.get('processor')}, {m.get('cpu_count')} cores, {m.get('torch_threads')} torch "
                 f"thread(s), device {m.get('device')}{gpu}; load average {m.get('load_average_1min')} at the "
                 f"start; {m.get('date')}")
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in found.items()) + f", python {m.get('python')}")
    commit = str(m.get("commit", "unknown"))
    lines.append(f"  commit {commit[:12]}{' with uncommitted changes (dirty)' if m.get('dirty') else ''}")
    return "\n".join(lines)


def read_safetensors(path, fmt: str, *, missing: str, what: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file the project wrote with the format tag
    ``fmt`` in its metadata (weights, data and generations files beside their records).

    A missing file raises ``FileNotFoundError(missing)`` (the message says which command
    makes it); a file with another tag raises ``ValueError`` naming the file as not ``what``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != fmt:
            raise ValueError(f"{path} is not {what} (format {metadata.get('format')!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, metadata
