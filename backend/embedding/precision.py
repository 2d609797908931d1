"""Choosing an embedder's numeric precision for this machine (EMBED_PRECISION=auto): bf16 autocast where the
hardware has native bf16 and it is measurably faster with vectors faithful to fp32, else fp32. Measured, not
assumed: CPUs differ between machines, and on one without native bf16 the emulation is many times slower."""
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FAITHFUL_MEAN, FAITHFUL_MIN = 0.99, 0.97  # cosine of bf16 vectors to fp32 ones, over the calibration images
MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much to be worth its rounding
CALIBRATION_IMAGES = 8
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def calibration_images(n: int = CALIBRATION_IMAGES, size: int = 256) -> list[Image.Image]:
    """Deterministic images with structure at every scale (gradients, shapes, texture), like photos have."""
    rng = np.random.default_rng(0)
    images = []
    for k in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(x * (k + 2) * 3) , np.cos(y * (k + 1) * 4), x * y], -1) * 0.5 + 0.5
        noise = rng.normal(0, 0.08, (size, size, 3))
        img = Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, 120, 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
        images.append(img)
    return images


def choose(embedder) -> tuple[str, str]:
    """(precision, why) for a loaded embedder on its device: 'bf16' or 'fp32'."""
    import torch

    if embedder.device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return _measure(embedder, "CUDA device with bf16")
        return "fp32", "this GPU has no bf16"
    flags = cpu_flags()
    if flags is not None and not flags & set(NATIVE_BF16_FLAGS):
        return "fp32", "this CPU has no native bf16 (avx512_bf16 or amx_bf16): bf16 would be emulated, and slower"
    return _measure(embedder, "CPU with native bf16" if flags else "CPU flags unknown")


def _measure(embedder, hardware: str) -> tuple[str, str]:
    from backend.embedding.vectors import l2_normalize

    images = calibration_images()
    seconds, vectors = {}, {}
    for precision in ("fp32", "bf16"):
        embedder._features(images[:2], precision)  # the first pass of each precision sets up kernels
        started = time.perf_counter()
        vectors[precision] = l2_normalize(embedder._features(images, precision).float().cpu().numpy())
        seconds[precision] = time.perf_counter() - started
    cosine = (vectors["fp32"] * vectors["bf16"]).sum(1)
    speedup = seconds["fp32"] / seconds["bf16"]
    measured = f"{hardware}; bf16 {speedup:.2f}x fp32's speed, cosine to fp32 mean {cosine.mean():.4f}, " \
               f"min {cosine.min():.4f}"
    if cosine.mean() < FAITHFUL_MEAN or cosine.min() < FAITHFUL_MIN:
        return "fp32", f"{measured}: bf16 vectors not faithful enough"
    if speedup < MIN_SPEEDUP:
        return "fp32", f"{measured}: bf16 not faster enough"
    return "bf16", measured
