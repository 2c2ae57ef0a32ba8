"""Composite index for the completion check (run, category, status).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_images_run_category_status", "images", ["run_id", "category", "status"])


def downgrade() -> None:
    op.drop_index("ix_images_run_category_status", table_name="images")
