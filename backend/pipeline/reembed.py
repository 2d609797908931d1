"""Changing a collection's model without downtime.

`reembed` computes another model's vectors (and with them its prototypes) for every image of a collection that lacks
one, in committed batches, while searches go on with the current model: serving processes ignore vectors of a model
they do not search with. A run that is stopped or killed resumes where it stopped (what was stored is skipped).
`switch_model` then makes the new model the collection's, in one transaction that every serving process is told of
(backend.storage.notify, 'model'): each opens the collection again with the new model and index and swaps it in whole, so
a search runs on the old pair or the new one, never a mix. The old model's vectors stay until `drop_model`, so
switching back is as quick as opening its index (from its snapshot).
"""
from dataclasses import dataclass
from functools import partial

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from backend.embedding.models import Embedder
from backend.errors import Conflict, NotFound
from backend.pipeline.datasets import Item
from backend.pipeline.ingest import IngestReport, ingest
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.collections import recorded_model, set_model
from backend.storage.notify import announce
from backend.storage.tables import Embedding, EmbeddingModel, Image, Prototype


class ModelNotReady(Conflict):
    """A switch to a model whose vectors are not all there yet."""


@dataclass(frozen=True)
class Coverage:
    """How far a model's vectors cover a collection."""

    model: str
    images: int
    embedded: int

    @property
    def complete(self) -> bool:
        """Every image has a vector of the model."""
        return self.embedded >= self.images

    def describe(self) -> str:
        """E.g. 'efficientnet_lite2: 600 of 1,000 images (60%)'."""
        share = 100 * self.embedded / self.images if self.images else 100
        return f"{self.model}: {self.embedded:,} of {self.images:,} images ({share:.0f}%)"


def coverage(session: Session, model_name: str) -> Coverage:
    """How many of the session's collection's images have a vector of `model_name`."""
    images = session.scalar(sa.select(sa.func.count()).select_from(Image))
    embedded = session.scalar(sa.select(sa.func.count()).select_from(Embedding)
                              .where(Embedding.model_name == model_name))
    return Coverage(model_name, images or 0, embedded or 0)


def _stored_bytes(sessions: sessionmaker, image_id: int) -> bytes:
    with sessions() as s:
        data = s.scalar(sa.select(Image.data).where(Image.id == image_id))
    if data is None:
        raise FileNotFoundError(f"image {image_id} was deleted meanwhile")
    return data


def reembed(sessions: sessionmaker, embedder: Embedder, batch_size: int = 16, progress: bool = True) -> IngestReport:
    """Compute `embedder`'s vectors for the collection's images that lack one (see the module docstring); searches
    keep the current model. Returns what ingestion did (`embedded_existing` counts the new vectors)."""
    source = embedder.source.name
    with sessions() as s:
        lacking = s.execute(sa.select(Image.id, Image.original_name, Image.label, Image.source_dataset,
                                      Image.source_split)
                            .where(~sa.exists().where(Embedding.image_id == Image.id, Embedding.model_name == source))
                            .order_by(Image.id)).all()
    # The stored images, read one at a time as ingestion gets to them: it finds each already stored (by its
    # digest) and adds the vector alone, keeping its category and metadata.
    items = [Item(category=None, label=row.label, original_name=row.original_name or f"image {row.id}",
                  source=row.source_dataset or "stored", split=row.source_split, read=partial(_stored_bytes, sessions,
                                                                                              row.id))
             for row in lacking]
    return ingest(sessions, items, embedder, batch_size=batch_size, progress=progress)


def switch_model(session: Session, model_name: str, force: bool = False) -> str | None:
    """Make `model_name` the collection's model (every serving process follows on commit); refused (ModelNotReady)
    until its vectors cover every image, unless `force`. Returns the model it replaces, if one was recorded."""
    if session.get(EmbeddingModel, model_name) is None:
        raise NotFound(f"the collection has no {model_name} vectors: run `python -m backend reembed --model "
                       f"{model_name}` first")
    covered = coverage(session, model_name)
    if not covered.complete and not force:
        raise ModelNotReady(f"re-embedding is not finished ({covered.describe()}): run `python -m backend reembed "
                            f"--model {model_name}` until it is, or force the switch")
    previous = recorded_model(session)
    set_model(session, model_name)
    image_store.ensure_model(session, model_name, session.get(EmbeddingModel, model_name).dim, chosen=True)
    announce(session, model_name, what="model")
    return previous


def drop_model(session: Session, model_name: str, serving=None) -> int:
    """Delete a model's vectors and prototypes from the collection (not its current model's, nor `serving`'s: the
    backend.service.model_choice.ModelChoice commands and servers of this configuration use); returns how many
    vectors went."""
    stored = image_store.models_with_vectors(session)  # without a recorded model, the last chosen is the one in use
    if model_name == (recorded_model(session) or (stored[0][0] if stored else None)):
        raise Conflict(f"{model_name} is the collection's model: switch to another before dropping it")
    if serving is not None and model_name == serving.name:
        raise Conflict(f"{model_name} is the model in use here ({serving.reason}): choose another before dropping "
                         "it")
    prototype_store.lock_prototypes(session, model_name)
    session.execute(sa.delete(Prototype).where(Prototype.model_name == model_name))
    dropped = session.execute(sa.delete(Embedding).where(Embedding.model_name == model_name)).rowcount
    session.execute(sa.delete(EmbeddingModel).where(EmbeddingModel.name == model_name))
    return dropped
