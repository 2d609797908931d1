"""Search history (backend.storage.history): one row per search the API answered, kept for HISTORY_RETENTION_DAYS.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision: str = "0008"
down_revision: Union[str, None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "search_history",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("params", JSONB(), server_default="{}", nullable=False),
        sa.Column("query_sha256", sa.String(64)),
        sa.Column("query_vector", sa.LargeBinary()),
        sa.Column("query_thumbnail", sa.LargeBinary()),
        sa.Column("result_ids", ARRAY(sa.BigInteger()), server_default="{}", nullable=False),
        sa.Column("result_scores", ARRAY(sa.Float()), server_default="{}", nullable=False),
        sa.Column("top_category", sa.String(200)),
        sa.Column("timings_ms", JSONB(), server_default="{}", nullable=False),
        sa.Column("total_ms", sa.Float(), nullable=False),
    )
    op.create_index("ix_search_history_at", "search_history", ["at"])


def downgrade() -> None:
    op.drop_table("search_history")
