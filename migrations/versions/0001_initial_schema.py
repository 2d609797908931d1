"""Initial schema: pgvector, categories, images, embedding models, embeddings, prototypes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from typing import Sequence, Union

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "categories",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("original_name", sa.Text()),
        sa.Column("source_dataset", sa.String(64)),
        sa.Column("source_split", sa.String(32)),
        sa.Column("label", sa.Integer()),
        sa.Column("category_id", sa.Integer(), sa.ForeignKey("categories.id", ondelete="RESTRICT")),
        sa.Column("metadata", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_images_category_id", "images", ["category_id"])
    op.create_table(
        "embedding_models",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("dim", sa.Integer(), sa.CheckConstraint("dim > 0"), nullable=False),
        sa.UniqueConstraint("name", "dim"),
    )
    op.create_table(
        "embeddings",
        sa.Column("image_id", sa.BigInteger(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", pgvector.sqlalchemy.VECTOR(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["model_name", "dim"], ["embedding_models.name", "embedding_models.dim"]),
        sa.CheckConstraint("vector_dims(vector) = dim", name="embedding_dim_matches"),
    )
    op.create_index("ix_embeddings_model_name", "embeddings", ["model_name"])
    op.create_table(
        "prototypes",
        sa.Column("category_id", sa.Integer(), sa.ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", pgvector.sqlalchemy.VECTOR(), nullable=False),
        sa.Column("vector_sum", pgvector.sqlalchemy.VECTOR(), nullable=False),
        sa.Column("member_count", sa.Integer(), sa.CheckConstraint("member_count > 0"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["model_name", "dim"], ["embedding_models.name", "embedding_models.dim"]),
        sa.CheckConstraint("vector_dims(vector) = dim AND vector_dims(vector_sum) = dim", name="prototype_dim_matches"),
    )


def downgrade() -> None:
    op.drop_table("prototypes")
    op.drop_table("embeddings")
    op.drop_table("embedding_models")
    op.drop_table("images")
    op.drop_table("categories")
    # Shared by every collection's schema (0009): dropped with the last, the default's in public.
    if op.get_bind().scalar(sa.text("SELECT current_schema()")) == "public":
        op.execute("DROP EXTENSION IF EXISTS vector")
