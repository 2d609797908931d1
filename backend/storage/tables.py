"""SQLAlchemy models: the schema Alembic migrates to (see migrations/versions)."""
from datetime import datetime

from pgvector.sqlalchemy import VECTOR
from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, ForeignKeyConstraint, Index,
                        Integer, LargeBinary, SmallInteger, String, Text, UniqueConstraint, false, func, select)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column


class Base(DeclarativeBase):
    pass


class Collection(Base):
    """A named set of images with its own model, categories, prototypes and index (backend.storage.collections). Its tables
    live in PostgreSQL schema `schema` (the default collection's in `public`); this registry is shared by all."""

    __tablename__ = "collections"
    __table_args__ = {"schema": "public"}

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    schema: Mapped[str] = mapped_column(String(63), unique=True)
    # The model searches use (a re-embed switches it); None: chosen as backend.service.model_choice says.
    model_name: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ImageBlob(Base):
    """An image's encoded bytes, stored once however many collections hold the image."""

    __tablename__ = "image_blobs"
    __table_args__ = {"schema": "public"}

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Made by clustering a collection without labels (backend.pipeline.recluster), not given by a person.
    automatic: Mapped[bool] = mapped_column(Boolean, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("public.image_blobs.sha256"), unique=True)
    # The bytes, from the shared table; loaded only when asked for (a select naming it, or undefer).
    data: Mapped[bytes] = column_property(select(ImageBlob.data).where(ImageBlob.sha256 == sha256)
                                          .correlate_except(ImageBlob).scalar_subquery(), deferred=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    original_name: Mapped[str | None] = mapped_column(Text)
    source_dataset: Mapped[str | None] = mapped_column(String(64))
    source_split: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[int | None] = mapped_column(Integer)
    category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id", ondelete="RESTRICT"), index=True)
    metadata_: Mapped[dict] = mapped_column("metadata", JSONB, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Serves metadata filters (backend.storage.filters): containment for equality, the key operator for presence.
    __table_args__ = (Index("ix_images_metadata", "metadata", postgresql_using="gin"),)


class EmbeddingModel(Base):
    """One row per model that has vectors; pins the dimension all its vectors share."""

    __tablename__ = "embedding_models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer, CheckConstraint("dim > 0"))
    # When a populate last used this model: with MODEL_NAME unset, later commands use the latest one.
    chosen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("name", "dim"),)


class Embedding(Base):
    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[list] = mapped_column(VECTOR())
    # The prototype of its category this vector counts towards (backend.storage.images: several per category).
    slot: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The composite key to (name, dim) plus the check makes the database itself refuse a vector
    # of the wrong size for its model.
    __table_args__ = (
        ForeignKeyConstraint(["model_name", "dim"], ["embedding_models.name", "embedding_models.dim"]),
        CheckConstraint("vector_dims(vector) = dim", name="embedding_dim_matches"),
    )


class Prototype(Base):
    """Per category, model and slot (up to PROTOTYPES_PER_CATEGORY of them, k-means within the category): the
    re-normalised mean of the members' vectors, plus their running sum."""

    __tablename__ = "prototypes"

    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="0")
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[list] = mapped_column(VECTOR())
    vector_sum: Mapped[list] = mapped_column(VECTOR())
    member_count: Mapped[int] = mapped_column(Integer, CheckConstraint("member_count > 0"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (
        ForeignKeyConstraint(["model_name", "dim"], ["embedding_models.name", "embedding_models.dim"]),
        CheckConstraint("vector_dims(vector) = dim AND vector_dims(vector_sum) = dim", name="prototype_dim_matches"),
    )


class ProjectionHead(Base):
    """A head trained on a model's vectors and the collection's categories (backend.embedding.projection); each training adds
    a version, and the newest one for `model_name` (the derived model, e.g. "efficientnet_lite0+proj") is in use."""

    __tablename__ = "projection_heads"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    in_dim: Mapped[int] = mapped_column(Integer, CheckConstraint("in_dim > 0"))
    out_dim: Mapped[int] = mapped_column(Integer, CheckConstraint("out_dim > 0"))
    weights: Mapped[bytes] = mapped_column(LargeBinary)  # numpy .npz, read without pickle
    report: Mapped[dict] = mapped_column(JSONB, server_default="{}")  # how training went (backend.pipeline.train_projection)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DuplicateDecision(Base):
    """A pair of images a person looked at as near-duplicates (image_a < image_b): `distinct` (not duplicates) or
    `kept_all` (duplicates, both kept). Either way the pair is not offered again (backend.search.duplicates)."""

    __tablename__ = "duplicate_decisions"

    image_a: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    image_b: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    decision: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    __table_args__ = (CheckConstraint("image_a < image_b", name="duplicate_pair_ordered"),
                      CheckConstraint("decision IN ('distinct', 'kept_all')", name="duplicate_decision_known"))


class SearchRecord(Base):
    """One search the API answered (backend.storage.history): what was asked, what came back, how long it took."""

    __tablename__ = "search_history"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "upload", "stored" (by stored images) or "vector" (a re-run)
    model_name: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSONB, server_default="{}")
    query_sha256: Mapped[str | None] = mapped_column(String(64))
    query_vector: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, the base model's: to run it again
    query_thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary)
    result_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), server_default="{}")
    result_scores: Mapped[list[float]] = mapped_column(ARRAY(Float), server_default="{}")
    top_category: Mapped[str | None] = mapped_column(String(200))
    timings_ms: Mapped[dict] = mapped_column(JSONB, server_default="{}")
    total_ms: Mapped[float] = mapped_column(Float)
