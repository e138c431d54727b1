"""Hardware/software metadata recorded with every benchmark run."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_model", "environment", "git_commit", "node_info", "package_version"]

_PACKAGES = ("tokenreduce", "torch", "transformers", "timm", "numpy", "ray")


def cpu_model() -> str:
    """Human-readable CPU name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (``None`` if absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(
            ["git", "--no-optional-locks", *args],  # read-only: never touch the index
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` for the repo containing ``path``.

    Defaults to the repository this package lives in.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cuda_info() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return {
        "device": torch.cuda.get_device_name(idx),
        "count": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
        "memory_bytes": int(props.total_memory),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError, RuntimeError):  # psutil missing or unsupported platform
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None


@functools.lru_cache(maxsize=1)
def _static_node_info() -> dict[str, Any]:
    git = git_commit()
    cuda = _cuda_info()
    return {"host": platform.node(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "memory_bytes": _memory_bytes(), "gpu": cuda["device"] if cuda else None,
            "gpu_count": cuda["count"] if cuda else 0, "python": sys.version.split()[0],
            "git_commit": git["commit"], "git_dirty": git["dirty"],
            "versions": {name: package_version(name) for name in _PACKAGES}}


def node_info() -> dict[str, Any]:
    """What the rows of a sweep cell record about where they were computed (``origin``): host, Ray node id
    (``None`` outside Ray), CPU model and count, memory, GPU name and count, git commit and package versions
    (computed once per process), and the 1-minute load average now."""
    node_id = None
    if "ray" in sys.modules:  # inside a Ray worker (never imports Ray itself)
        ray = sys.modules["ray"]
        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {**_static_node_info(), "node_id": node_id, "pid": os.getpid(), "load_avg_1m": load}


def environment(repo: str | Path | None = None) -> dict[str, Any]:
    """Metadata for a benchmark run: hardware, thread settings, versions, git commit, UTC date.

    Everything is JSON-serialisable. ``repo``: path inside the git repository whose
    commit to record (default: the one containing tokenreduce). Note that CUDA is
    queried (and thus initialised) only if it is available.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    physical: int | None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except (ImportError, OSError, RuntimeError):
        physical = None
    git = git_commit(repo)
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": physical,
        "cpu_affinity": affinity,
        "load_avg": load,
        "memory_bytes": _memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "versions": {name: package_version(name) for name in _PACKAGES},
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "cuda": _cuda_info(),
    }
