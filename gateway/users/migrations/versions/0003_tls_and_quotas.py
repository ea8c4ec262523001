"""users: per-user TLS requirement, byte and file quotas, and the usage they are checked against

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Plain ALTER TABLE ADD/DROP COLUMN on both databases (SQLite has DROP COLUMN since 3.35). Not Alembic's batch
# mode: on SQLite it copies the table and drops the old one, and with foreign_keys=ON (gateway.users.db) that drop
# would cascade into ftp_user_permissions.
COLUMNS = (
    # 'required', 'optional', or NULL: the server's tls.required decides.
    ("tls", sa.String(16), True, None),
    # NULL: no quota.
    ("quota_bytes", sa.BigInteger(), True, None),
    ("quota_files", sa.Integer(), True, None),
    ("used_bytes", sa.BigInteger(), False, "0"),
    ("used_files", sa.BigInteger(), False, "0"),
)


def upgrade() -> None:
    for name, type_, nullable, default in COLUMNS:
        op.add_column("ftp_users", sa.Column(name, type_, nullable=nullable, server_default=default))


def downgrade() -> None:
    for name, *_ in reversed(COLUMNS):
        op.drop_column("ftp_users", name)
