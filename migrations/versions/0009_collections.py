"""Collections: a registry of named collections, each in a PostgreSQL schema of its own (the existing data becomes
the `default` collection, in `public`), and image bytes moved to one table shared by every collection.

This migration runs once per collection schema (backend.storage.migrations.migrate): the shared parts only in `public`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: Union[str, None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _in_public() -> bool:
    return op.get_bind().scalar(sa.text("SELECT current_schema()")) == "public"


def upgrade() -> None:
    if _in_public():
        op.create_table(
            "collections",
            sa.Column("name", sa.String(40), primary_key=True),
            sa.Column("schema", sa.String(63), nullable=False, unique=True),
            sa.Column("model_name", sa.String(64)),
            sa.Column("description", sa.Text()),
            sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
            schema="public")
        op.execute("INSERT INTO public.collections (name, schema) VALUES ('default', 'public')")
        op.create_table("image_blobs", sa.Column("sha256", sa.String(64), primary_key=True),
                        sa.Column("data", sa.LargeBinary(), nullable=False), schema="public")
        op.execute("INSERT INTO public.image_blobs (sha256, data) SELECT sha256, data FROM images")
    op.drop_column("images", "data")
    op.create_foreign_key("images_sha256_blob", "images", "image_blobs", ["sha256"], ["sha256"],
                          referent_schema="public")


def downgrade() -> None:
    op.drop_constraint("images_sha256_blob", "images", type_="foreignkey")
    op.add_column("images", sa.Column("data", sa.LargeBinary()))
    op.execute("UPDATE images SET data = b.data FROM public.image_blobs b WHERE b.sha256 = images.sha256")
    op.alter_column("images", "data", nullable=False)
    if _in_public():  # the other collections cannot outlive the registry: they go with it
        for (schema,) in op.get_bind().execute(sa.text("SELECT schema FROM public.collections WHERE schema <> 'public'")):
            op.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        op.drop_table("image_blobs", schema="public")
        op.drop_table("collections", schema="public")
