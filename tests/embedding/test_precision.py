"""EMBED_PRECISION=auto: bf16 only where the hardware has it natively, it is faster, and its vectors stay faithful."""
import numpy as np
import pytest
import torch

from backend.embedding import precision
from backend.embedding.models import create_embedder
from tests.helpers import PixelEmbedder


def test_a_cpu_without_native_bf16_stays_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision, "_measure", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    embedder = PixelEmbedder(precision="auto").load()
    assert embedder.precision == "fp32" and "no native bf16" in embedder.precision_reason


class Unfaithful(PixelEmbedder):
    """bf16 here returns vectors unrelated to fp32's, as a broken kernel would."""

    def _features(self, images, precision=None):
        out = super()._features(images, precision)
        if (precision or self.precision) == "bf16":
            return torch.from_numpy(np.random.default_rng(0).normal(size=tuple(out.shape)).astype(np.float32))
        return out


def test_unfaithful_bf16_is_refused_whatever_its_speed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    embedder = Unfaithful(precision="auto").load()
    assert embedder.precision == "fp32" and "not faithful" in embedder.precision_reason


@pytest.mark.slow
def test_on_a_cpu_with_native_bf16_the_choice_is_measured_and_explained(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    embedder = create_embedder("efficientnet_lite0", device="cpu", precision="auto").load()
    assert embedder.precision in ("fp32", "bf16")
    assert "cosine to fp32 mean" in embedder.precision_reason and "x fp32's speed" in embedder.precision_reason
    if embedder.precision == "bf16":  # then it was faithful on the calibration images
        mean = float(embedder.precision_reason.split("mean ")[1].split(",")[0])
        assert mean >= precision.FAITHFUL_MEAN


def test_an_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(precision, "choose", lambda e: (_ for _ in ()).throw(AssertionError("chose")))
    assert PixelEmbedder(precision="bf16").load().precision == "bf16"


def test_calibration_images_are_deterministic_and_varied():
    a, b = precision.calibration_images(), precision.calibration_images()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert len({np.asarray(x).tobytes() for x in a}) == len(a)
