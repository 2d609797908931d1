"""Categories for collections without labels: k-means clusters of the vectors, stored as categories.

A collection loaded with `populate --categories auto[:K]` (or from a folder with no subfolders) has no categories
of its own, so the two-stage search has nothing to rank. recluster() groups the model's images that no person
categorised into K clusters (spherical k-means, FAISS) and stores them as categories named "cluster 1".."cluster K",
marked `automatic`, with their prototypes; images in categories a person gave are left where they are. It runs
again (`python -m backend recluster`) as the collection grows: the clusters are recomputed from every vector, and
serving processes pick the new categories up through live sync.
"""
import logging
import math

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from backend.errors import Conflict
from backend.search.kmeans import spherical_kmeans
from backend.storage import images as image_store
from backend.storage import prototypes as prototype_store
from backend.storage.members import fetch_members
from backend.storage.notify import announce
from backend.storage.tables import Category, Embedding, EmbeddingModel, Image

log = logging.getLogger(__name__)

NAME = "cluster {}"


def default_k(n: int) -> int:
    """Clusters for n images: about √n / 5 (20 for 10,000), at least 2, at most 256."""
    return max(2, min(256, round(math.sqrt(n) / 5)))


def recluster(session: Session, model_name: str, k: int | None = None, seed: int = 0) -> int:
    """Cluster the images of `model_name` that have no category or an automatic one into k (default_k) automatic
    categories, in the session's transaction; returns the number of clusters made."""
    # One recluster at a time: a second one would rename and delete the categories the first is filling.
    session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('imsrc-recluster'))"))
    candidates = session.scalars(
        sa.select(Embedding.image_id).join(Image, Image.id == Embedding.image_id)
        .outerjoin(Category, Category.id == Image.category_id)
        .where(Embedding.model_name == model_name, sa.or_(Image.category_id.is_(None), Category.automatic))).all()
    if len(candidates) < 2:
        raise Conflict(f"only {len(candidates)} {model_name} vectors without a category: nothing to cluster")
    dim = session.scalar(sa.select(EmbeddingModel.dim).where(EmbeddingModel.name == model_name))
    ids, _, vectors = fetch_members(session, model_name, dim, candidates, uncategorised=True)  # in bulk, by id
    assignment = (vectors @ spherical_kmeans(vectors, min(k or default_k(len(ids)), len(ids)), seed).T).argmax(axis=1)
    used = sorted(set(assignment.tolist()))
    names = [NAME.format(n + 1) for n in range(len(used))]
    taken = session.scalars(sa.select(Category.name).where(Category.name.in_(names), ~Category.automatic)).all()
    if taken:
        raise Conflict(f"categories named {', '.join(taken)} were given by a person: rename them to recluster")
    session.execute(insert(Category).values([{"name": n, "automatic": True} for n in names])
                    .on_conflict_do_nothing(index_elements=["name"]))
    category_of = dict(session.execute(sa.select(Category.name, Category.id).where(Category.name.in_(names))).all())
    category_for = {c: category_of[names[n]] for n, c in enumerate(used)}
    cluster_ids = np.array([category_for[c] for c in assignment.tolist()], np.int64)
    session.execute(sa.text("UPDATE images SET category_id = moved.category FROM unnest(:ids, :cats) "
                            "AS moved(image, category) WHERE images.id = moved.image "
                            "AND images.category_id IS DISTINCT FROM moved.category"),
                    {"ids": ids.tolist(), "cats": cluster_ids.tolist()})
    session.execute(sa.delete(Category).where(Category.automatic, Category.name.not_in(names),
                                              ~sa.exists().where(Image.category_id == Category.id)))
    for model, _ in image_store.models_with_vectors(session):  # members moved: every model's prototypes change
        prototype_store.rebuild_prototypes(session, model)
    announce(session, None, what="resync")  # serving processes re-read which image is in which category
    log.info("clustered %d %s vectors into %d automatic categories", len(ids), model_name, len(used))
    return len(used)
