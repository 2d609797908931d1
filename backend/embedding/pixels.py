"""A batch of images as a network's input: the pixels, resized and cropped, and their float form.

For torchvision's ImageClassification presets (every model imsrc ships) a prepared batch is uint8 pixels
(n, 3, H, W); the conversion to float and the normalisation are the network's first step (network_input under
PyTorch, OpenVINO's compiled graph otherwise). They were a third of ingestion's preprocessing when done per image in
float, and uint8 is a quarter of the bytes to queue, to send to a Ray actor or to copy to a GPU.
"""
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image


def _preset(preprocess) -> bool:
    from torchvision.transforms._presets import ImageClassification  # loaded with the model's weights already

    return type(preprocess) is ImageClassification


def stack_inputs(preprocess: Callable[[Image.Image], torch.Tensor], images: Sequence[Image.Image]) -> torch.Tensor:
    """Images preprocessed and stacked into one batch (n, 3, H, W): a preset's resized and cropped pixels (uint8),
    any other preprocessing's output as it gives it. Grayscale (L) images are resized as one band and become three
    equal channels only here."""
    if not _preset(preprocess):
        return torch.stack([preprocess(img.convert("RGB") if img.mode != "RGB" else img) for img in images])
    height, width = _crop_size(preprocess)
    # Filled in place by numpy, not stacked by torch: a torch copy this size runs on torch's OpenMP threads,
    # which then spin for a while, on a 2-core server a core's worth of CPU per query taken from everything else.
    batch = np.empty((len(images), 3, height, width), np.uint8)
    for k, img in enumerate(images):
        pixels = np.asarray(resized_crop(preprocess, img if img.mode in ("RGB", "L") else img.convert("RGB")))
        batch[k] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # one band is broadcast to three
    return torch.from_numpy(batch)


def resized_crop(preset, img: Image.Image) -> Image.Image:
    """The preset's resize then centre crop, as one PIL resize of the crop's source box: only the crop's pixels are
    computed (half the time on photos), each within one level of the two steps' value."""
    from torchvision.transforms import functional as F

    w, h = img.size
    crop_h, crop_w = _crop_size(preset)
    # torchvision's own rule for the resized size (the short side to resize_size, the long one truncated)
    new_h, new_w = F._compute_resized_output_size((h, w), list(preset.resize_size), None)
    if crop_h > new_h or crop_w > new_w:  # the preset would pad: its own two steps
        return F.center_crop(F.resize(img, preset.resize_size, interpolation=preset.interpolation,
                                      antialias=preset.antialias), preset.crop_size)
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))  # as F.center_crop
    if (new_h, new_w) == (h, w):  # F.resize leaves it as it is
        return img.crop((left, top, left + crop_w, top + crop_h))
    sx, sy = w / new_w, h / new_h
    return img.resize((crop_w, crop_h), F.pil_modes_mapping[preset.interpolation],
                      box=(left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy))


def _crop_size(preset) -> tuple[int, int]:
    """(height, width) of a preset's crop: torchvision keeps one size for a square."""
    size = list(preset.crop_size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def network_input(preprocess, batch: torch.Tensor) -> torch.Tensor:
    """The float batch the network takes, from stack_inputs' batch: uint8 pixels converted and normalised as the
    preset does per image (the same operations, so the same values)."""
    from torchvision.transforms import functional as F

    if batch.dtype != torch.uint8:
        return batch
    return F.normalize(F.convert_image_dtype(batch, torch.float), mean=preprocess.mean, std=preprocess.std)


def normalisation(preprocess, batch: torch.Tensor) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel on 0-255 pixels, which turn stack_inputs' uint8 batch into network_input's; None
    when the batch is already the network's input."""
    if batch.dtype != torch.uint8:
        return None
    return [255 * m for m in preprocess.mean], [255 * s for s in preprocess.std]
