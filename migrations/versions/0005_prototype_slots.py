"""Several prototypes per category: a prototype is (category, model, slot), and each vector counts towards one slot
of its category (backend.storage.images). Existing rows become slot 0, the one prototype they were.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds both columns without rewriting the tables.
    op.add_column("prototypes", sa.Column("slot", sa.SmallInteger(), nullable=False, server_default="0"))
    op.add_column("embeddings", sa.Column("slot", sa.SmallInteger(), nullable=False, server_default="0"))
    op.drop_constraint("prototypes_pkey", "prototypes", type_="primary")
    op.create_primary_key("prototypes_pkey", "prototypes", ["category_id", "model_name", "slot"])


def downgrade() -> None:
    op.execute("DELETE FROM prototypes WHERE slot > 0")  # their members' sums are lost: rebuild the prototypes
    op.drop_constraint("prototypes_pkey", "prototypes", type_="primary")
    op.create_primary_key("prototypes_pkey", "prototypes", ["category_id", "model_name"])
    op.drop_column("embeddings", "slot")
    op.drop_column("prototypes", "slot")
