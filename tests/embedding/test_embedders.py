"""Each embedder: unit-norm float32 (n, d), deterministic; weights from files, packages or a clear error."""
import socket

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from backend.embedding.decode import decode
from backend.embedding.models import MODELS, create_embedder, model_dim
from backend.embedding.pixels import network_input, stack_inputs
from backend.embedding.vectors import l2_normalize
from backend.errors import ModelUnavailable
from tests.helpers import messy_image_bytes

pytestmark = pytest.mark.xdist_group("embedders")  # its module-scoped fixtures are built once

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def images():
    """Real messy inputs: a photo, tiny greyscale, RGBA, palette, a wide image."""
    from skimage import data

    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())] + \
        [decode(b).image for b in messy_image_bytes()]


@pytest.fixture(scope="module")
def resnet_weight_files(tmp_path_factory):
    """State-dict files for resnet50/18 written by the test (random init: no ImageNet weights offline)."""
    torch.manual_seed(0)
    files = {}
    for arch in ("resnet50", "resnet18"):
        path = tmp_path_factory.mktemp("weights") / f"{arch}.pth"
        model = getattr(torchvision.models, arch)(weights=None).eval()
        torch.save(model.state_dict(), path)
        files[arch] = (path, model)
    return files


def _embedder(name, files):
    return create_embedder(name, weights_path=files[name][0] if name in files else None, batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_embedder_returns_unit_norm_float32_deterministically(name, images, resnet_weight_files):
    embedder = _embedder(name, resnet_weight_files)
    first = embedder.embed(images)
    assert first.dtype == np.float32 and first.shape == (len(images), model_dim(name))
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.embed(images), first)
    assert np.isfinite(first).all()
    assert not np.allclose(first[0], first[1]), "different photos must get different vectors"


@pytest.mark.slow
def test_resnet50_loads_weights_from_a_local_file(images, resnet_weight_files):
    path, reference = resnet_weight_files["resnet50"]
    embedder = create_embedder("resnet50", weights_path=path, precision="fp32")  # compared with fp32 logits
    preprocess = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    with torch.inference_mode():
        expected_logits = reference(preprocess(images[0])[None]).numpy()
    np.testing.assert_allclose(embedder.logits(images[:1]), expected_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_efficientnet_lite0_packaged_weights_recognise_a_cat(images):
    embedder = create_embedder("efficientnet_lite0")
    assert int(embedder.logits(images[:1]).argmax()) in IMAGENET_CATS  # scikit-image's chelsea


def test_missing_resnet_weights_fail_fast_naming_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelUnavailable) as err:
        create_embedder("resnet50").load()
    message = str(err.value)
    assert "MODEL_WEIGHTS_PATH" in message and "efficientnet_lite0" in message and "network unreachable" in message


def test_bad_weights_file_and_unknown_model_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="cannot read weights"):
        create_embedder("resnet18", weights_path=bad).load()
    with pytest.raises(ModelUnavailable, match="does not exist"):
        create_embedder("resnet18", weights_path=tmp_path / "missing.pth").load()
    with pytest.raises(ModelUnavailable, match="unknown model 'vgg'"):
        create_embedder("vgg")


def test_l2_normalize_keeps_zero_rows_zero():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32


def test_a_preset_preprocessing_batched_gives_the_per_image_values():
    from torchvision.transforms._presets import ImageClassification

    preset = ImageClassification(crop_size=224, resize_size=256, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((28, 28), (500, 300))]
    images += [Image.new("L", (64, 40), 77), Image.new("RGBA", (90, 90), (10, 20, 30, 40)),
               Image.fromarray(rng.integers(0, 256, (256, 300, 3), dtype=np.uint8))]  # already at the resize size
    expected = torch.stack([preset(image.convert("RGB")) for image in images])
    pixels = stack_inputs(preset, images)
    assert pixels.dtype == torch.uint8  # a quarter of the bytes; the network's first step makes the floats
    # One resize of the crop's box instead of a resize and a crop: within one level of 255 of the two steps
    unnormalised = expected * torch.tensor(preset.std)[:, None, None] + torch.tensor(preset.mean)[:, None, None]
    assert (pixels.float() / 255 - unnormalised).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(network_input(preset, pixels)[-1], expected[-1])  # no resize: exactly the crop
    # A grayscale picture is resized as one band: exactly the values of its RGB form
    gray = Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8))
    assert torch.equal(stack_inputs(preset, [gray]), stack_inputs(preset, [gray.convert("RGB")]))
    # Any other preprocessing runs per image, as given
    assert torch.equal(stack_inputs(lambda image: torch.full((1,), float(image.width)), images),
                       torch.tensor([[28.0], [300.0], [64.0], [90.0], [300.0]]))

