"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('original_name', sa.Text(), nullable=False),
    sa.Column('sidecar', sa.JSON(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('bytes', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('archive_path', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sha256')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_received_at'), ['received_at'], unique=False)

    op.create_table('rejections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('claim', sa.String(length=64), nullable=False),
    sa.Column('original_name', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('bytes', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('rejected_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('quarantine_path', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('claim')
    )
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rejections_rejected_at'), ['rejected_at'], unique=False)

    op.create_table('predictions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('top_label', sa.String(length=32), nullable=False),
    sa.Column('melanoma_score', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.Column('p_actinic_keratosis', sa.Float(), nullable=False),
    sa.Column('p_basal_cell_carcinoma', sa.Float(), nullable=False),
    sa.Column('p_dermatofibroma', sa.Float(), nullable=False),
    sa.Column('p_melanoma', sa.Float(), nullable=False),
    sa.Column('p_nevus', sa.Float(), nullable=False),
    sa.Column('p_pigmented_benign_keratosis', sa.Float(), nullable=False),
    sa.Column('p_seborrheic_keratosis', sa.Float(), nullable=False),
    sa.Column('p_squamous_cell_carcinoma', sa.Float(), nullable=False),
    sa.Column('p_vascular_lesion', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('image_id', 'model_sha256')
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_flagged'), ['flagged'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_image_id'), ['image_id'], unique=False)

    op.create_table('sightings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('claim', sa.String(length=64), nullable=False),
    sa.Column('original_name', sa.Text(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('claim')
    )
    with op.batch_alter_table('sightings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sightings_image_id'), ['image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_sightings_received_at'), ['received_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('sightings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sightings_received_at'))
        batch_op.drop_index(batch_op.f('ix_sightings_image_id'))

    op.drop_table('sightings')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_image_id'))
        batch_op.drop_index(batch_op.f('ix_predictions_flagged'))

    op.drop_table('predictions')
    with op.batch_alter_table('rejections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rejections_rejected_at'))

    op.drop_table('rejections')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_received_at'))

    op.drop_table('images')
