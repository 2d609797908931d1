"""The engine an embedder runs on (precision and runtime), measured once per machine, model and library versions
and stored in the data folder, so that every process and restart serves the same one.

Measured afresh at each start, the choice flipped from run to run on a busy machine (two workers could serve
different engines) and every start paid OpenVINO's conversion and compile again. A stored choice is reused while
its key matches: the model and its weights file, the device, the CPU (model name, flags, cores), the versions of
torch and OpenVINO, the settings asked for and RULES; `python -m backend calibrate` measures again. OpenVINO's
converted model and its compiled blob are kept beside it (`openvino/`)."""
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

# Raise when the measuring rules change (thresholds, calibration images) or what OpenVINO's converted files hold
# (2: uint8 pixels in, normalised in the graph): stored choices and files then expire.
RULES = 2
CHOICES_FILE = "choices.json"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def _cpu() -> dict:
    """The CPU's model name, a digest of its feature flags and its core count (Linux; empty fields elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = text.splitlines()
    model = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.partition(":")[2] for ln in lines if ln.startswith("flags")), "")
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return {"cpu": model, "cpu_flags": digest, "cores": os.cpu_count()}


def machine_key(embedder) -> dict:
    """Everything a measured choice depends on, for this embedder on this machine."""
    weights = embedder.weights_path
    if weights and weights.is_file():
        stat = weights.stat()
        weights_id = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        weights_id = "published"
    device = embedder.device.type
    if device == "cuda":
        import torch

        device = f"cuda:{torch.cuda.get_device_name(embedder.device)}"
    return {"rules": RULES, "model": embedder.name, "weights": weights_id, "device": device,
            "precision_setting": embedder.precision_setting, "runtime_setting": embedder.runtime,
            "torch": _package_version("torch"), "openvino": _package_version("openvino"),
            "batch_size": embedder.batch_size, **_cpu()}


def key_digest(key: dict) -> str:
    """A short name for a key: the stored choice's id, and the prefix of OpenVINO's files for it."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


class EngineChoices:
    """The stored choices in one folder (`<DATA_DIR>/engines`): a JSON file written whole, under a file lock."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.file = self.folder / CHOICES_FILE

    @property
    def openvino_dir(self) -> Path:
        """Where OpenVINO's converted models and its compiled-model cache are kept."""
        return self.folder / "openvino"

    @contextmanager
    def locked(self) -> Iterator["EngineChoices"]:
        """Held while a choice is looked up and, if missing, measured and stored: a second process starting at
        the same time waits for the first one's measurement and then reuses it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _all(self) -> dict:
        try:
            stored = json.loads(self.file.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again and written whole
            return {}
        return stored if isinstance(stored, dict) else {}

    def get(self, key: dict) -> dict | None:
        """The stored choice for this key, or None."""
        record = self._all().get(key_digest(key))
        return record if isinstance(record, dict) and record.get("key") == key else None

    def put(self, key: dict, precision: str, precision_reason: str, runtime: str, runtime_reason: str) -> None:
        """Store a measured choice (replacing one of the same key), atomically."""
        stored = self._all()
        stored[key_digest(key)] = {"key": key, "precision": precision, "precision_reason": precision_reason,
                                   "runtime": runtime, "runtime_reason": runtime_reason,
                                   "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._write(stored)

    def forget(self, model: str | None = None) -> int:
        """Drop the stored choices (of one model, or all) and OpenVINO's files; how many choices were dropped."""
        stored = self._all()
        dropped = [k for k, r in stored.items() if model is None or r.get("key", {}).get("model") == model]
        for digest in dropped:
            del stored[digest]
            for path in self.openvino_dir.glob(f"{digest}.*"):
                path.unlink()
        if model is None:
            shutil.rmtree(self.openvino_dir / "blobs", ignore_errors=True)  # named by OpenVINO, of every model
        if dropped:
            self._write(stored)
        return len(dropped)

    def _write(self, stored: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(".partial")  # written whole, then renamed: a reader never sees half
        partial.write_text(json.dumps(stored, indent=1, sort_keys=True))
        partial.replace(self.file)
