"""Which engine runs an embedder's network on a CPU (EMBED_RUNTIME): PyTorch, or OpenVINO where it is installed
and, measured on this machine, clearly faster with vectors faithful to fp32.

OpenVINO compiles the backbone for the CPU it finds (in the precision chosen for PyTorch: bf16 where the CPU
has it natively and it was faithful, else fp32; fused kernels either way); `python bench/embed.py` measured it at 3.0x PyTorch's best configuration for
efficientnet_lite0 and 1.2x for resnet50 on an AMD EPYC with avx512_bf16. As with the precision, the choice is
measured when a model loads, never assumed: the log says what was measured.
"""
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from backend.embedding.pixels import network_input, normalisation
from backend.embedding.precision import FAITHFUL_MEAN, FAITHFUL_MIN, MIN_SPEEDUP, calibration_images

log = logging.getLogger(__name__)


class OpenVinoBackbone:
    """An embedder's backbone compiled by OpenVINO for this CPU: a preprocessed batch in, features out, like the
    torch module; any batch size; one call at a time."""

    def __init__(self, backbone: torch.nn.Module, example: torch.Tensor, precision: str, preprocess,
                 cache: Path | None = None):
        """`example`: a prepared batch (backend.embedding.pixels); when it is uint8 pixels, the graph takes them and
        normalises them itself, as `preprocess` says. `cache`: the path prefix of this model's converted files; its
        folder also holds OpenVINO's compiled blobs. With it, a later start reads both instead of converting and
        compiling again."""
        import openvino

        core = openvino.Core()
        # fp32 asked for (or chosen) stays fp32; else OpenVINO's own choice: bf16 where the CPU has it natively.
        config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "fp32" else {}
        convert = lambda: self._convert(openvino, backbone, example, preprocess)  # noqa: E731
        if cache is None:
            self.compiled = core.compile_model(convert(), "CPU", config)
        else:
            converted = cache.with_suffix(".xml")
            if not converted.is_file() or not converted.with_suffix(".bin").is_file():
                cache.parent.mkdir(parents=True, exist_ok=True)
                # fp32 as converted: OpenVINO's default fp16 compression would change the vectors
                openvino.save_model(convert(), converted, compress_to_fp16=False)
            core.set_property({"CACHE_DIR": str(cache.parent / "blobs")})
            self.compiled = core.compile_model(str(converted), "CPU", config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._lock = threading.Lock()  # one infer request: the query batcher and an upload may call at once

    @staticmethod
    def _convert(openvino, backbone: torch.nn.Module, example: torch.Tensor, preprocess):
        from openvino.preprocess import PrePostProcessor

        model = openvino.convert_model(backbone, example_input=network_input(preprocess, example[:1]).contiguous())
        model.reshape([-1, *example.shape[1:]])  # any batch size
        if (scaling := normalisation(preprocess, example)) is not None:
            # uint8 pixels in: the conversion and normalisation run in the compiled graph, fused with its first layer
            steps = PrePostProcessor(model)
            steps.input().tensor().set_element_type(openvino.Type.u8)
            steps.input().model().set_layout(openvino.Layout("NCHW"))
            steps.input().preprocess().convert_element_type(openvino.Type.f32).mean(scaling[0]).scale(scaling[1])
            model = steps.build()
        return model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            features = self.compiled(np.ascontiguousarray(batch.numpy()))[0]
        return torch.from_numpy(np.array(features, dtype=np.float32))


def choose(embedder, setting: str, cache: Path | None = None) -> tuple[OpenVinoBackbone | None, str]:
    """(the OpenVINO backbone to run instead of PyTorch, or None for PyTorch; why) for a loaded embedder;
    `cache` as OpenVinoBackbone takes it."""
    if setting == "torch":
        return None, "PyTorch, set by EMBED_RUNTIME"
    if embedder.device.type != "cpu":
        return None, f"PyTorch: OpenVINO is used on CPUs only, this model runs on {embedder.device.type}"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return None, "PyTorch: OpenVINO is not installed"
    batch = embedder.prepare(calibration_images())
    try:
        runner = OpenVinoBackbone(embedder._loaded[0], batch, embedder.precision, embedder._loaded[2], cache)
    except Exception as exc:  # a network OpenVINO cannot convert: PyTorch runs it as before
        log.warning("OpenVINO cannot compile %s (%s); using PyTorch", embedder.name, str(exc).splitlines()[0][:200])
        return None, "PyTorch: OpenVINO could not compile the model"
    if setting == "openvino":
        return runner, f"OpenVINO ({runner.precision}), set by EMBED_RUNTIME"
    return _measure(embedder, runner, batch)


def _measure(embedder, runner: OpenVinoBackbone, batch: torch.Tensor) -> tuple[OpenVinoBackbone | None, str]:
    from backend.embedding.vectors import l2_normalize

    def timed(forward) -> tuple[float, np.ndarray]:
        forward(batch[:2])  # the first pass sets up kernels
        started = time.perf_counter()
        features = forward(batch)
        return time.perf_counter() - started, l2_normalize(features.float().numpy())

    torch_seconds, _ = timed(embedder._forward)
    openvino_seconds, vectors = timed(runner)
    reference = l2_normalize(embedder._forward(batch, "fp32").float().numpy())
    cosine = (vectors * reference).sum(1)
    speedup = torch_seconds / openvino_seconds
    measured = (f"OpenVINO ({runner.precision}) {speedup:.2f}x PyTorch ({embedder.precision})'s speed, cosine to "
                f"fp32 mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    if cosine.mean() < FAITHFUL_MEAN or cosine.min() < FAITHFUL_MIN:
        return None, f"PyTorch: {measured}: OpenVINO's vectors not faithful enough"
    if speedup < MIN_SPEEDUP:
        return None, f"PyTorch: {measured}: OpenVINO not faster enough"
    return runner, measured
