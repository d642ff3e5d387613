"""The run record: one JSON file per run, written atomically, that says everything about the run.

Sections follow peft's method_comparison harness: what was asked (``config``), what happened
(``status``, ``error``, ``metrics``, ``params``, ``timing``, ``memory``) and where it ran
(``environment``: package versions, git SHA and dirtiness, hardware). ``schema_version`` lets later
versions read or refuse old records by name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from . import SCHEMA_VERSION, __version__

TRACKED_PACKAGES = ("torch", "transformers", "datasets", "peft", "bitsandbytes", "numpy", "snakemake", "gguf")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(cwd: str | Path | None = None) -> dict:
    """Commit and dirtiness of the checkout holding the code (not the results)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": dirty if sha else None}


def hardware() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
        info["cpu_model"] = model
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
    return info


def environment() -> dict:
    return {"versions": package_versions(), "git": git_state(), "hardware": hardware(),
            "lora_bench": __version__}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(data: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk mid-write leaves the previous file (or none) in place, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str, allow_nan=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def base_record(config: dict, labels: dict | None = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run": labels or {}, "config": config, "status": "running",
            "error": None, "started_at": now_iso()}


def read_record(path: str | Path) -> dict:
    """Read a run record; refuse one from another layout version by naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"run record {path} is unreadable or not JSON: {exc}") from exc
    version = record.get("schema_version") if isinstance(record, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(f"run record {path} has schema_version {version!r}; this lora-bench reads "
                         f"version {SCHEMA_VERSION}: re-run it")
    return record
