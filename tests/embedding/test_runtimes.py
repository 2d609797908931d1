"""EMBED_RUNTIME: OpenVINO only where it is installed, measured faster and faithful to fp32; PyTorch otherwise."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from backend.embedding import runtimes
from backend.embedding.models import create_embedder
from backend.embedding.precision import calibration_images
from backend.embedding.vectors import l2_normalize
from tests.helpers import ROOT, PixelEmbedder

pytestmark = pytest.mark.xdist_group("runtimes")  # its module-scoped fixtures are built once


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in ("chelsea", "astronaut", "coffee", "rocket")]


def _torch_fp32(embedder, images):
    batch = embedder.prepare(images)
    return l2_normalize(embedder._forward(batch, "fp32").float().numpy())


@pytest.mark.slow
def test_auto_measures_and_keeps_the_vectors_faithful(photos):
    embedder = create_embedder("efficientnet_lite0", device="cpu", runtime="auto").load()
    reason = embedder.runtime_reason
    assert "x PyTorch" in reason and "cosine to fp32" in reason, reason  # measured, and says what it measured
    vectors = embedder.embed(photos)
    cosine = (vectors * _torch_fp32(embedder, photos)).sum(1)
    assert cosine.min() >= 0.97 and cosine.mean() >= 0.99
    assert (embedder._compiled is not None) == reason.startswith("OpenVINO")


@pytest.mark.slow
def test_openvino_in_fp32_gives_pytorchs_fp32_features():
    embedder = create_embedder("efficientnet_lite0", device="cpu", precision="fp32", runtime="openvino").load()
    assert embedder._compiled is not None and embedder._compiled.precision == "f32"
    batch = embedder.prepare(calibration_images(4))
    np.testing.assert_allclose(embedder._forward(batch).numpy(), embedder._forward(batch, "fp32").numpy(),
                               rtol=1e-3, atol=1e-3)
    assert embedder.embed_prepared(batch[:3]).shape == (3, embedder.dim)  # another batch size than compiled with


def test_torch_when_asked_or_openvino_missing(monkeypatch):
    assert PixelEmbedder(runtime="torch").load()._compiled is None
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    embedder = PixelEmbedder(runtime="auto").load()
    assert embedder._compiled is None and embedder.runtime_reason == "PyTorch: OpenVINO is not installed"


@pytest.mark.parametrize("limit, why", [("FAITHFUL_MEAN", "not faithful enough"), ("MIN_SPEEDUP", "not faster")])
def test_openvino_is_refused_when_unfaithful_or_not_faster(monkeypatch, limit, why):
    monkeypatch.setattr(runtimes, limit, 1e9)  # no runtime can pass this bar
    embedder = PixelEmbedder(runtime="auto").load()
    assert embedder._compiled is None and why in embedder.runtime_reason
    assert torch.equal(embedder._forward(embedder.prepare(calibration_images(2))),
                       embedder._forward(embedder.prepare(calibration_images(2)), "fp32"))


@pytest.mark.parametrize("preset, expected", [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                              ({"OMP_WAIT_POLICY": "active"}, "unset")])
def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise(preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | preset
    done = subprocess.run([sys.executable, "-c", "import backend, os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == expected, done.stderr
