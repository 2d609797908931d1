"""`train-projection`: learn a head from the collection's categories and publish it as a derived model.

The head (backend.embedding.projection) is trained on the stored vectors of a base model with a normalised-softmax loss (each
category has a learnt proxy; cosine logits times a fixed scale), which lifted held-out precision@10 most among what
was measured (README, Evaluation). A stratified slice of the stored vectors is held out: training stops when their
precision@10, searched against the rest, has not improved for PATIENCE epochs, and the best epoch's weights are kept.
Publishing stores the head as a new version and re-projects every stored vector of the base model in one
transaction; serving processes of the derived model pick it up through live sync.
"""
import copy
import logging
import time

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session, sessionmaker
from torch import nn
from tqdm import tqdm

from backend.embedding import projection
from backend.errors import ImsrcError
from backend.search.confidence import QUANTILE
from backend.storage import heads as head_store
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.members import copy_members, fetch_members
from backend.storage.notify import announce
from backend.storage.tables import Embedding, EmbeddingModel, ProjectionHead, Prototype

log = logging.getLogger(__name__)

KINDS = ("mlp", "linear")
HIDDEN = 512  # the MLP's hidden width
SCALE = 16.0  # the normalised softmax's temperature: cosine logits times this
LEARNING_RATE = 1e-3
BATCH = 256
PATIENCE = 5  # epochs without a better held-out precision@10 before training stops
HOLDOUT_QUERIES = 2000  # held-out vectors searched each epoch, at most
GALLERY = 20_000  # training vectors they are searched against, at most
PROJECT_CHUNK = 20_000  # vectors re-projected per statement when publishing


def _module(kind: str, in_dim: int, dim: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dim))
    return nn.Linear(in_dim, dim, bias=False)


def _weights(kind: str, module: nn.Module) -> dict[str, np.ndarray]:
    """A trained module's parameters under the names backend.embedding.projection.Head reads."""
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    if kind == "mlp":
        return {"W1": state["0.weight"], "b1": state["0.bias"], "W2": state["2.weight"], "b2": state["2.bias"]}
    return {"W": state["weight"]}


def precision_at_k(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
                   k: int = 10) -> float:
    """Mean fraction of each query's k nearest gallery vectors (inner product) that share its label."""
    top = np.argpartition(-(queries @ gallery.T), k, axis=1)[:, :k]
    return float((gallery_labels[top] == query_labels[:, None]).mean())


def split_holdout(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the held-out rows: `share` of each label's rows (none of a label with fewer than 3)."""
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) >= 3:
            held[rng.choice(rows, max(1, round(share * len(rows))), replace=False)] = True
    return held


# One function: the training loop, early stopping and the held-out measure share the module, its proxies and the
# best weights so far; the closures inside keep that state in one place.
def _train_epoch(module: nn.Module, proxies: nn.Parameter, optimiser, x: torch.Tensor, t: torch.Tensor) -> float:
    """One pass over the vectors in shuffled batches (normalised-softmax loss against the class proxies); the
    mean loss."""
    module.train()
    order, total = torch.randperm(len(x)), 0.0
    for start in range(0, len(x), BATCH):
        rows = order[start:start + BATCH]
        z = nn.functional.normalize(module(x[rows]), dim=1)
        logits = SCALE * z @ nn.functional.normalize(proxies, dim=1).T
        loss = nn.functional.cross_entropy(logits, t[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total += loss.item() * len(rows)
    return total / len(x)


def train_head(vectors: np.ndarray, labels: np.ndarray, dim: int = 256, kind: str = "mlp", epochs: int = 30,
               holdout: float = 0.1, seed: int = 0, progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Train a head on unit vectors (n, d) with integer labels; returns (weights for projection.Head, report)."""
    if kind not in KINDS:
        raise ImsrcError(f"unknown head kind {kind!r}; choose one of {', '.join(KINDS)}")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ImsrcError("training a projection needs images of at least two categories")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    held = split_holdout(y, holdout, rng)
    train_x, train_y = vectors[~held], y[~held]
    queries = rng.choice(np.flatnonzero(held), min(HOLDOUT_QUERIES, int(held.sum())), replace=False)
    gallery = rng.choice(len(train_x), min(GALLERY, len(train_x)), replace=False)
    k = min(10, len(gallery) - 1)

    module = _module(kind, vectors.shape[1], dim)
    proxies = nn.Parameter(torch.randn(len(classes), dim) * 0.01)
    optimiser = torch.optim.Adam([*module.parameters(), proxies], lr=LEARNING_RATE)
    x, t = torch.from_numpy(np.ascontiguousarray(train_x, np.float32)), torch.from_numpy(train_y.astype(np.int64))

    def held_out_precision(project) -> float | None:
        if not len(queries):
            return None
        return round(precision_at_k(project(vectors[queries]), y[queries], project(train_x[gallery]),
                                    train_y[gallery], k), 4)

    def through(weights):
        return lambda v: projection.Head(0, "", "", kind, weights).apply(v)

    raw = held_out_precision(lambda v: v)
    best, best_epoch, best_state, losses = -1.0, 0, None, []
    with tqdm(range(1, epochs + 1), desc="training projection", unit="epoch", disable=not progress) as bar:
        for epoch in bar:
            losses.append(round(_train_epoch(module, proxies, optimiser, x, t), 4))
            score = held_out_precision(through(_weights(kind, module)))
            bar.set_postfix(loss=losses[-1], p10=score)
            if score is None or score > best:
                best, best_epoch, best_state = (score if score is not None else best), epoch, copy.deepcopy(
                    module.state_dict())
            elif epoch - best_epoch >= PATIENCE:
                break
    module.load_state_dict(best_state)
    weights = _weights(kind, module)
    project = through(weights)  # the weights kept: the best epoch's
    report = {"kind": kind, "dim": dim, "hidden": HIDDEN if kind == "mlp" else None, "loss": "normalised softmax",
              "scale": SCALE, "learning_rate": LEARNING_RATE, "batch_size": BATCH, "seed": seed,
              "epochs_run": len(losses), "best_epoch": best_epoch, "losses": losses,
              "train_vectors": int(len(train_x)), "held_out_vectors": int(held.sum()), "categories": int(len(classes)),
              f"held_out_precision@{k}": {"raw": raw, "projected": held_out_precision(project)},
              # backend.service.query_confidence.BaseSpace: judged on base vectors, as the head maps unlike images onto categories
              "base_no_match_threshold": no_match_threshold(vectors[held], y[held], train_x, train_y),
              "seconds": round(time.perf_counter() - started, 1)}
    return weights, report


def no_match_threshold(held_out: np.ndarray, held_labels: np.ndarray, trained: np.ndarray,
                       trained_labels: np.ndarray) -> float | None:
    """backend.search.confidence's threshold for a derived model, from base vectors the head was not trained on: the
    QUANTILE of their best similarity to the categories' prototypes (the normalised means of the trained-on ones)."""
    if not len(held_out):
        return None
    sums = np.zeros((int(trained_labels.max()) + 1, trained.shape[1]), np.float64)
    np.add.at(sums, trained_labels, trained)
    prototypes = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return round(float(np.quantile((held_out @ prototypes.T).max(axis=1), QUANTILE)), 4)


def read_training_set(session: Session, base_model: str, max_vectors: int, seed: int = 0):
    """(vectors, category ids) of up to max_vectors of the base model's categorised images, drawn at random."""
    dim = session.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == base_model))
    if dim is None:
        raise ImsrcError(f"there are no {base_model} vectors to train a projection on")
    total = image_store.counts(session)["embeddings"].get(base_model, 0)
    keep = min(1.0, max_vectors / total) if total else 1.0
    rng, kept = np.random.default_rng(seed), []

    def sample(ids, categories, vectors):
        chosen = rng.random(len(ids)) < keep
        kept.append((categories[chosen], vectors[chosen]))

    copy_members(session, base_model, dim, sample, ordered=True)
    if not kept or not sum(len(c) for c, _ in kept):
        raise ImsrcError(f"no {base_model} vectors are in a category: a projection is learnt from categories")
    return np.concatenate([v for _, v in kept]), np.concatenate([c for c, _ in kept])


def publish(session: Session, base_model: str, kind: str, weights: dict[str, np.ndarray], report: dict,
            progress: bool = True) -> projection.Head:
    """Store the head as a new version and replace the derived model's vectors and prototypes by projections of
    every stored base vector, in the session's transaction; announced to serving processes on commit."""
    name = projection.derived_name(base_model)
    head_store.lock_base(session, base_model, exclusive=True)  # no base vector is written meanwhile
    prototype_store.lock_prototypes(session, name)  # before deleting them: a rebuild elsewhere takes it first too
    version = session.scalar(sa.insert(ProjectionHead).values(
        model_name=name, base_model=base_model, kind=kind, in_dim=weights["W1" if kind == "mlp" else "W"].shape[1],
        out_dim=report["dim"], weights=projection.encode_weights(weights), report=report)
        .returning(ProjectionHead.version))
    head = head_store.current_head(session, name)
    session.execute(sa.delete(Prototype).where(Prototype.model_name == name))
    session.execute(sa.delete(Embedding).where(Embedding.model_name == name))
    session.execute(sa.update(EmbeddingModel).where(EmbeddingModel.name == name).values(dim=head.out_dim))
    base_dim = session.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == base_model))
    ids = session.scalars(sa.select(Embedding.image_id).where(Embedding.model_name == base_model)
                          .order_by(Embedding.image_id)).all()
    with tqdm(total=len(ids), desc=f"projecting into {name}", unit="vec", disable=not progress) as bar:
        for start in range(0, len(ids), PROJECT_CHUNK):
            chunk, _, vectors = fetch_members(session, base_model, base_dim, ids[start:start + PROJECT_CHUNK],
                                              uncategorised=True)
            image_store.insert_embeddings(session, name, chunk.tolist(), head.apply(vectors), derive=False)
            bar.update(len(chunk))
    prototype_store.rebuild_prototypes(session, name)
    announce(session, name, what="resync")
    log.info("head version %d of %s: %d vectors projected", version, name, len(ids))
    return head


def train_projection(sessions: sessionmaker, base_model: str, dim: int = 256, kind: str = "mlp", epochs: int = 30,
                     max_vectors: int = 100_000, progress: bool = True) -> projection.Head:
    """Train a head on the base model's stored vectors and categories and publish it (see the module docstring)."""
    with sessions() as s:
        vectors, categories = read_training_set(s, base_model, max_vectors)
    weights, report = train_head(vectors, categories, dim=dim, kind=kind, epochs=epochs, progress=progress)
    with sessions() as s, s.begin():
        return publish(s, base_model, kind, weights, report, progress=progress)
