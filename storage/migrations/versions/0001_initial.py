"""Initial schema: runs, images (with lease/fence/attempts), categories, metric_rows.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("detector", sa.String(100), nullable=False),
        sa.Column("dataset_root", sa.Text, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("code_version", sa.String(100), nullable=False),
        sa.Column("model_fingerprint", sa.String(200), nullable=True),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("category", sa.String(200), nullable=False),
        sa.Column("defect", sa.String(200), nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("image_path", sa.Text, nullable=False),
        sa.Column("mask_path", sa.Text, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.Column("fence", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("object_key", sa.Text, nullable=True),
        sa.Column("image_score", sa.Float, nullable=True),
        sa.Column("diagnostics", sa.JSON, nullable=True),
        sa.Column("timings", sa.JSON, nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("device", sa.String(50), nullable=True),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.UniqueConstraint("run_id", "image_path", name="uq_images_run_path"),
    )
    op.create_index("ix_images_run_id", "images", ["run_id"])
    op.create_index("ix_images_category", "images", ["category"])
    op.create_index("ix_images_status", "images", ["status"])
    op.create_table(
        "categories",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("category", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("dirty", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("aggregating_since", _TS, nullable=True),
        sa.Column("num_used", sa.Integer, nullable=False),
        sa.Column("num_skipped", sa.Integer, nullable=False),
        sa.Column("num_failed", sa.Integer, nullable=False),
        sa.Column("state_key", sa.Text, nullable=True),
        sa.UniqueConstraint("run_id", "category", name="uq_categories_run_category"),
    )
    op.create_index("ix_categories_run_id", "categories", ["run_id"])
    op.create_table(
        "metric_rows",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("scope", sa.String(20), nullable=False),
        sa.Column("category", sa.String(200), nullable=False),
        sa.Column("defect_type", sa.String(200), nullable=False),
        sa.Column("iauroc", sa.Float, nullable=True),
        sa.Column("pauroc", sa.Float, nullable=True),
        sa.Column("pro", sa.Float, nullable=True),
        sa.Column("pro_hard", sa.Float, nullable=True),
        sa.Column("f1_max", sa.Float, nullable=True),
        sa.Column("num_images", sa.Integer, nullable=False),
        sa.Column("num_anom_images", sa.Integer, nullable=False),
        sa.Column("extra", sa.JSON, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.UniqueConstraint("run_id", "scope", "category", "defect_type", name="uq_metric_rows_scope"),
    )
    op.create_index("ix_metric_rows_run_id", "metric_rows", ["run_id"])


def downgrade() -> None:
    for table in ("metric_rows", "categories", "images", "runs"):
        op.drop_table(table)
