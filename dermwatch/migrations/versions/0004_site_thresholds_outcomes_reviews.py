"""site thresholds, confirmed diagnoses and reviews

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_thresholds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("target_sensitivity", sa.Float(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("melanomas", sa.Integer(), nullable=False),
        sa.Column("sensitivity", sa.Float(), nullable=False),
        sa.Column("sensitivity_low", sa.Float(), nullable=False),
        sa.Column("sensitivity_high", sa.Float(), nullable=False),
        sa.Column("specificity", sa.Float(), nullable=True),
        sa.Column("specificity_low", sa.Float(), nullable=True),
        sa.Column("specificity_high", sa.Float(), nullable=True),
        sa.Column("flag_rate", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("site_thresholds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_site_thresholds_model_sha256"), ["model_sha256"], unique=False)
    for table, columns in (
        ("confirmed_diagnoses", [sa.Column("diagnosis", sa.String(length=32), nullable=False),
                                 sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
                                 sa.Column("source", sa.Text(), nullable=False)]),
        ("reviews", [sa.Column("reviewer", sa.Text(), nullable=False),
                     sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False)]),
    ):
        op.create_table(
            table,
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("image_id", sa.Integer(), nullable=False),
            *columns,
            sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("image_id"),
        )


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("confirmed_diagnoses")
    with op.batch_alter_table("site_thresholds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_site_thresholds_model_sha256"))
    op.drop_table("site_thresholds")
