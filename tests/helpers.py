"""Test helpers: a deterministic stand-in embedder and generators for small real datasets on disk."""
import gzip
import io
import pickle
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from backend.embedding.models import Embedder

CLASSES = ["red", "green", "blue"]
ROOT = Path(__file__).resolve().parent.parent
# For tests that compare vectors embedded by different processes: EMBED_*=auto times the engines in each process,
# and on a loaded machine two processes may choose differently (bf16 and fp32 vectors differ by up to ~0.02).
PINNED_ENGINE = {"EMBED_PRECISION": "fp32", "EMBED_RUNTIME": "torch"}


class PixelEmbedder(Embedder):
    """A tiny deterministic embedder (4x4 average colours) for tests where the model is not under test."""

    name, dim = "test-pixels", 48

    def __init__(self, fail_after_batches: int | None = None, **kwargs):
        super().__init__(device="cpu", **{"precision": "fp32", "runtime": "torch", **kwargs})  # exact, whatever the CPU
        self.calls = 0
        self.fail_after_batches = fail_after_batches

    def _load(self):
        preprocess = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
        return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1)), nn.Identity(), preprocess

    def embed_prepared(self, batch):
        self.calls += 1
        if self.fail_after_batches is not None and self.calls > self.fail_after_batches:
            raise KeyboardInterrupt("simulated interruption")
        return super().embed_prepared(batch)


def class_images(n_per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, size, size, 3) whose dominant channel is the class, each one distinct, and labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(CLASSES)):
        for _ in range(n_per_class):
            img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            img[..., label] = rng.integers(150, 256, (size, size), dtype=np.uint8)
            images.append(img)
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: Path, n_per_class: int) -> None:
    """A Fashion-MNIST-shaped IDX dataset (28x28 grey, 10 labels) in directory, for both splits."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", n_per_class), ("t10k", max(1, n_per_class // 2))):
        labels = np.repeat(np.arange(10, dtype=np.uint8), count)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, :, :] //= 2
        images[np.arange(len(labels)), labels, :] = 255  # a bright row per class
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def write_cifar10_batches(directory: Path, n_per_batch: int) -> Path:
    """CIFAR-10's original python-pickle layout (cifar-10-batches-py/) with small random batches."""
    root = directory / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, n_per_batch)]
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    return root


def write_folder_dataset(root: Path, n_per_class: int, seed: int = 0) -> None:
    """One subfolder per class, images saved in a mix of formats."""
    images, labels = class_images(n_per_class, seed=seed)
    formats = ["png", "jpg", "webp", "bmp", "gif"]
    for k, (img, label) in enumerate(zip(images, labels)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img{k:03d}.{formats[k % len(formats)]}")


def png_bytes(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    """Encode a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def seed_torch() -> None:
    """Make randomly initialised test models reproducible."""
    torch.manual_seed(0)


def messy_image_bytes() -> list[bytes]:
    """A handful of awkward real encodings: tiny greyscale, RGBA, palette GIF, CMYK JPEG, a wide PNG."""
    return [
        png_bytes(Image.new("L", (28, 28), 77)),
        png_bytes(Image.new("RGBA", (64, 48), (255, 0, 0, 128))),
        png_bytes(Image.new("RGB", (50, 50), (0, 90, 200)).convert("P"), "GIF"),
        png_bytes(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
        png_bytes(Image.new("RGB", (900, 200), (20, 180, 20))),
    ]


def schema_head() -> str:
    """The newest Alembic revision: what a migrated database is at."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(ROOT / "migrations")).get_current_head()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 180, alive=lambda: True) -> bool:
    """Poll a TCP connect to host:port until one succeeds (True), `timeout` seconds pass or `alive()` turns False."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def wait_healthy(base: str, timeout: float = 180, alive=lambda: True) -> bool:
    """Poll base/health until it answers 200 (True), `timeout` seconds pass or `alive()` turns False (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


@contextmanager
def running_server(env: dict, log_path: Path, *args: str, timeout: float = 180):
    """`python -m backend serve` (with `args`) on a free port until the block ends; yields (base URL, process).
    Fails the test with the end of the server's log if it does not become healthy."""
    import subprocess
    import sys

    import pytest

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_healthy(base, timeout, alive=lambda: proc.poll() is None):
                pytest.fail(f"server did not become ready: {Path(log_path).read_text()[-3000:]}")
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)


def folder_opener(sessions, tmp_path: Path, n_per_class: int = 3, embedder: Embedder | None = None):
    """An `open_search` for create_app: an ImageSearch over a fresh red/green/blue folder collection."""
    from backend.service.image_search import ImageSearch

    write_folder_dataset(tmp_path / "f", n_per_class=n_per_class)

    def open_search(other: Embedder | None = None):
        search = ImageSearch(sessions, other or embedder or PixelEmbedder(), snapshot_dir=tmp_path / "snap")
        search.build_database("folder", tmp_path / "f", progress=False)
        return search
    return open_search
