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
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from lora_bench import SCHEMA_VERSION, __version__
from lora_bench.atomic import ensure_writable, replace_atomically
from lora_bench.faults import fault_point

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


def cpu_identity(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU's marketing name and its exact identity (vendor, family, model, stepping), from the first processor
    of ``/proc/cpuinfo``. The name alone (a virtual machine's "AMD EPYC") says nothing about the generation;
    family and model do (AMD family 25 model 1 is Zen 3). Empty where the file is absent (macOS, Windows)."""
    fields = {}
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if not line.strip():
                    break  # the first processor's block is enough: they are alike
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    info = {"cpu_model": fields.get("model name")}
    if "cpu family" in fields or "model" in fields:
        info["cpu_id"] = (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
                          f"model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}")
    return info


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
    # Which SIMD kernels torch dispatches to (AVX2, AVX512, ...): the same code, seed and threads may round
    # differently under another capability or CPU, so a CPU run repeats bit for bit only where both match.
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info.update(cpu_identity())
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

    A crash, a kill or a full disk mid-write leaves the previous file (or none) in place, never half a
    file; the temporary file of a killed writer is removed by the next write of the same path.
    """
    path = Path(path)
    ensure_writable(path.parent)
    text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n"

    def write_in_two_halves(tmp: str) -> None:
        # The fault point between the halves lets tests kill a writer with half a record on disk.
        with open(tmp, "w", encoding="utf-8") as handle:
            half = len(text) // 2
            handle.write(text[:half])
            handle.flush()
            fault_point("record_write", str(path))
            handle.write(text[half:])

    replace_atomically(path, write_in_two_halves)
    fault_point("record_written", str(path))


def determinism_state(device: str) -> dict:
    """Whether this run's numbers are expected to repeat bit for bit, and the torch flags that decide it.

    Read after training (the flags are process-wide). On CPU, ``train`` enforces deterministic
    algorithms and the same config, seed and thread count give identical metrics. CUDA runs keep the
    fast kernels, some of which (atomic-add reductions, e.g. in the embedding backward) are not
    bitwise deterministic: such a record says so, and its seed-to-seed spread includes that noise.
    """
    import torch

    cuda = str(device).startswith("cuda")
    enforced = torch.are_deterministic_algorithms_enabled()
    state = {
        "device_type": "cuda" if cuda else str(device).split(":")[0].split(" ")[0],
        "deterministic_algorithms": enforced,
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch_threads": torch.get_num_threads(),
        "bitwise_reproducible": bool(enforced and not cuda),
    }
    if cuda:
        state["note"] = ("CUDA kernels were not forced to be deterministic: repeating this run with the same "
                         "seed can differ in the last bits, and the spread across seeds includes that noise")
    return state


def failure_kind(exc: BaseException) -> str:
    """A short, stable name for why a run failed (a column of the runs table), from the exception."""
    import torch

    from lora_bench.config import ConfigError
    from lora_bench.run.data import DataError

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory"
    kinds = [("non_finite_loss", "NonFiniteLoss"), ("config", ConfigError), ("data", DataError),
             ("io", OSError)]
    for kind, cls in kinds:
        if (type(exc).__name__ == cls) if isinstance(cls, str) else isinstance(exc, cls):
            return kind
    return "error"


def label_record(trained: dict, labels: dict, trained_path: str | Path) -> dict:
    """A run's record from the record of its training: the same numbers, the run's own labels.

    Several runs (families or variants with the same resolved config) share one training; ``trained_from``
    names the file they share, so a reader sees which runs are one and the same computation.
    """
    return {**trained, "run": {**(trained.get("run") or {}), **labels}, "trained_from": Path(trained_path).name}


def labelled_from(record_path: str | Path) -> str | None:
    """The ``trained_from`` of a labelled run record: the training it was made from; None when there is no
    record yet or it cannot be read (the workflow then remakes it anyway).

    The workflow compares it with the training the current config gives: Snakemake notices a changed input
    only through its ``.snakemake`` metadata, so a copied results folder, lost metadata or
    ``--rerun-triggers mtime`` would otherwise keep a run record of a config that was since edited.
    """
    try:
        with open(record_path, encoding="utf-8") as handle:
            return json.load(handle).get("trained_from")
    except (OSError, ValueError, AttributeError):
        return None


def base_record(config: dict, labels: dict | None = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run": labels or {}, "config": config, "status": "running",
            "error": None, "started_at": now_iso()}


class RecordError(ValueError):
    """A run record that cannot be used: unreadable, not a record, or of another layout version."""


# Record layout versions this lora-bench reads; older ones are refused by name (re-run them).
READABLE_RECORD_VERSIONS = frozenset({SCHEMA_VERSION})
RECORD_STATUSES = ("ok", "failed")


def check_version(version, readable: frozenset, what: str) -> None:
    """Raise ``RecordError`` naming ``what`` and its layout version unless this lora-bench reads it."""
    if version in readable:
        return
    if version is None:
        raise RecordError(f"{what} has no schema_version (not written by lora-bench, or by one from before "
                          f"versioning); this lora-bench reads version {SCHEMA_VERSION}: re-run it")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise RecordError(f"{what} has schema_version {version}, written by a newer lora-bench; this one reads "
                          f"version {SCHEMA_VERSION}: update lora-bench or re-run it")
    raise RecordError(f"{what} has schema_version {version!r}, written by an older lora-bench; this one reads "
                      f"version {SCHEMA_VERSION}: re-run it (delete it and run snakemake again)")


def read_record(path: str | Path) -> dict:
    """Read a run record; refuse one from another layout version by naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"run record {path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise RecordError(f"run record {path} is not a JSON object but {type(record).__name__}")
    check_version(record.get("schema_version"), READABLE_RECORD_VERSIONS, f"run record {path}")
    if record.get("status") not in RECORD_STATUSES:
        raise RecordError(f"run record {path} has status {record.get('status')!r}, not one of {RECORD_STATUSES}")
    return record
