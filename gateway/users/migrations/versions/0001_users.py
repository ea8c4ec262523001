"""users and their path permissions

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gateway.users.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ftp_users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("storage_uri", sa.String(2048), nullable=True),
        sa.Column("home", sa.String(1024), nullable=False, server_default="/"),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("max_sessions", sa.Integer(), nullable=True),
        sa.Column("upload_limit", sa.BigInteger(), nullable=True),
        sa.Column("download_limit", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=sa.func.now()),
        sa.Column("last_login_at", UTCDateTime(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_table(
        "ftp_user_permissions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("ftp_users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("readable", sa.Boolean(), nullable=False),
        sa.Column("writable", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("user_id", "path"),
    )
    op.create_index("ix_ftp_user_permissions_user_id", "ftp_user_permissions", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_ftp_user_permissions_user_id", table_name="ftp_user_permissions")
    op.drop_table("ftp_user_permissions")
    op.drop_table("ftp_users")
