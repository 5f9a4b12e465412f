"""sidecars belong to arrivals; file names that are not UTF-8 are kept as bytes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sightings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("original_name_bytes", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("sidecar", sa.JSON(), nullable=True))
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("original_name_bytes", sa.LargeBinary(), nullable=True))
    # Until now an image kept the sidecar of its first arrival: give it to that arrival.
    op.execute(
        """
        UPDATE sightings SET sidecar = (SELECT images.sidecar FROM images WHERE images.id = sightings.image_id)
        WHERE sightings.id IN (SELECT MIN(s.id) FROM sightings s GROUP BY s.image_id)
        """
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("sidecar")


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sidecar", sa.JSON(), nullable=True))
    op.execute(
        """
        UPDATE images SET sidecar = (SELECT s.sidecar FROM sightings s WHERE s.image_id = images.id
                                     AND s.sidecar IS NOT NULL ORDER BY s.id LIMIT 1)
        """
    )
    with op.batch_alter_table("rejections", schema=None) as batch_op:
        batch_op.drop_column("original_name_bytes")
    with op.batch_alter_table("sightings", schema=None) as batch_op:
        batch_op.drop_column("sidecar")
        batch_op.drop_column("original_name_bytes")
