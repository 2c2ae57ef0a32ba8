"""Drop the single-column indexes on images.run_id, images.category and images.status.

Every claim and every completion changes ``status``, so PostgreSQL rewrites each index entry of the row at each
step; these three were redundant (every query on images filters by run first, served by the unique
(run_id, image_path) index or by (run_id, category, status)) and cost write work on every image.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("ix_images_run_id", "ix_images_category", "ix_images_status"):
        op.drop_index(name, table_name="images")


def downgrade() -> None:
    op.create_index("ix_images_run_id", "images", ["run_id"])
    op.create_index("ix_images_category", "images", ["category"])
    op.create_index("ix_images_status", "images", ["status"])
