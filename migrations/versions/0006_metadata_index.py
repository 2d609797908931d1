"""A GIN index on images.metadata: metadata filters (backend.storage.filters) test equality by containment and presence by
the key operator, both of which it serves, so a selective filter does not read every image.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0006"
down_revision: Union[str, None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # In the migration's transaction (migrations run in one, under imsrc's lock): writes to images wait while it is
    # built, about a second per 100,000 images.
    op.create_index("ix_images_metadata", "images", ["metadata"], postgresql_using="gin")


def downgrade() -> None:
    op.drop_index("ix_images_metadata", table_name="images")
