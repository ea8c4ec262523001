"""object facts: SHA-256 of multipart uploads and MFMT times, keyed by container, key and ETag

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gateway.users.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ftp_object_facts",
        sa.Column("container", sa.String(255), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("etag", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("mtime", sa.Double(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("container", "key"),
    )


def downgrade() -> None:
    op.drop_table("ftp_object_facts")
