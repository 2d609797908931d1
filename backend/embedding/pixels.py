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
    any other preprocessing's output as it gives it."""
    from torchvision.transforms import functional as F

    rgb = [img.convert("RGB") if img.mode != "RGB" else img for img in images]
    if not _preset(preprocess):
        return torch.stack([preprocess(img) for img in rgb])
    p = preprocess
    # Stacked and made channels-first by numpy, not torch: a torch copy this size runs on torch's OpenMP threads,
    # which then spin for a while, on a 2-core server a core's worth of CPU per query taken from everything else.
    pixels = np.stack([np.asarray(F.center_crop(F.resize(img, p.resize_size, interpolation=p.interpolation,
                                                         antialias=p.antialias), p.crop_size)) for img in rgb])
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


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
