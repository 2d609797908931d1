"""Derived models: a backbone's vectors passed through a head learnt from the collection's categories.

A head (backend.pipeline.train_projection trains one) maps a model's vectors to a smaller space where images of one category
lie closer together. It is stored in PostgreSQL, versioned, and defines a derived model named "<base>+proj" (e.g.
"efficientnet_lite0+proj") with vectors, prototypes and an index of its own, like any model. The store keeps it
complete: every base vector written is projected in the same transaction (store.insert_embeddings), and a new
version re-projects every stored vector at once (replace_vectors). A query goes through the backbone and the head
(ProjectedEmbedder). The head runs in numpy: a matrix product or two, far below the backbone's cost.
"""
import io
from dataclasses import dataclass, field

import numpy as np

SUFFIX = "+proj"


def derived_name(base: str) -> str:
    """The derived model of a base model."""
    return base + SUFFIX


def is_derived(name: str | None) -> bool:
    """Whether a model name names a derived model."""
    return bool(name) and name.endswith(SUFFIX)


def base_of(name: str) -> str:
    """The base model of a model name (itself for a base model)."""
    return name[:-len(SUFFIX)] if is_derived(name) else name


@dataclass(frozen=True)
class Head:
    """One version of a trained head: `kind` "linear" (W) or "mlp" (W1, b1, ReLU, W2, b2), as numpy arrays."""

    version: int
    model_name: str
    base_model: str
    kind: str
    weights: dict[str, np.ndarray]
    report: dict = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        return self.weights["W1" if self.kind == "mlp" else "W"].shape[1]

    @property
    def out_dim(self) -> int:
        return self.weights["W2" if self.kind == "mlp" else "W"].shape[0]

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Base vectors (n, in_dim) -> unit vectors (n, out_dim), float32; deterministic."""
        # In torch, not numpy: numpy's OpenBLAS threads would spin beside the model's and slow every query (a
        # measured 7 -> 12 ms p50, 63 ms p95, on 2 cores).
        import torch

        w = self._tensors()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
            if self.kind == "mlp":
                x = torch.relu(x @ w["W1"].T + w["b1"]) @ w["W2"].T + w["b2"]
            else:
                x = x @ w["W"].T
            return torch.nn.functional.normalize(x, dim=1).numpy()

    def _tensors(self) -> dict:
        tensors = self.__dict__.get("_torch")
        if tensors is None:
            import torch

            tensors = {k: torch.from_numpy(v) for k, v in self.weights.items()}
            object.__setattr__(self, "_torch", tensors)  # a cache on a frozen dataclass
        return tensors


def encode_weights(weights: dict[str, np.ndarray]) -> bytes:
    """Weights as .npz bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in weights.items()})
    return buffer.getvalue()


def decode_weights(data: bytes) -> dict[str, np.ndarray]:
    """encode_weights() undone; never unpickles."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class ProjectedEmbedder:
    """A derived model's embedder: the base embedder, then the head. Ingestion stores the base vectors (`source`),
    from which the store derives this model's; everything else (precision, device, ...) is the base's."""

    def __init__(self, base, head: Head):
        self.base, self.head = base, head
        self.name = head.model_name

    @property
    def dim(self) -> int:
        return self.head.out_dim

    @property
    def source(self):
        return self.base

    def load(self) -> "ProjectedEmbedder":
        """Load the base network; returns self."""
        self.base.load()
        return self

    def embed(self, images) -> np.ndarray:
        """Embed RGB images through the base model and the head; (n, dim) unit vectors."""
        head = self.head  # one version for the whole batch, even if a new one is swapped in meanwhile
        return head.apply(self.base.embed(images)) if len(images) else np.zeros((0, head.out_dim), np.float32)

    def embed_prepared(self, batch) -> np.ndarray:
        """embed() of what prepare() made."""
        return self.head.apply(self.base.embed_prepared(batch))

    def __getattr__(self, attribute):  # prepare, preprocessor, precision, runtime_in_use, device, batch_size ...
        return getattr(self.base, attribute)
