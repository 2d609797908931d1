"""What a person decided about near-duplicate pairs (backend.search.duplicates): a pair decided once is not offered again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "duplicate_decisions",
        sa.Column("image_a", sa.BigInteger(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("image_b", sa.BigInteger(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("image_a < image_b", name="duplicate_pair_ordered"),
        sa.CheckConstraint("decision IN ('distinct', 'kept_all')", name="duplicate_decision_known"),
    )
    op.create_index("ix_duplicate_decisions_image_b", "duplicate_decisions", ["image_b"])


def downgrade() -> None:
    op.drop_table("duplicate_decisions")
