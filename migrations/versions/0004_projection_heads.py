"""Projection heads learnt from the collection's categories (backend.embedding.projection), one row per trained version.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "projection_heads",
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("in_dim", sa.Integer(), sa.CheckConstraint("in_dim > 0"), nullable=False),
        sa.Column("out_dim", sa.Integer(), sa.CheckConstraint("out_dim > 0"), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("report", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_projection_heads_model_name", "projection_heads", ["model_name"])
    op.create_index("ix_projection_heads_base_model", "projection_heads", ["base_model"])


def downgrade() -> None:
    op.drop_table("projection_heads")
