"""kmnist-tune's own tables beside Optuna's in a PostgreSQL study database: the artifacts (chunked
binary rows, artifacts.py) and the tickets of budget claims in progress (claims.py). Defined here,
with no other dependency, so that creating them (schema.py) and using them need not import each other."""

from __future__ import annotations

import sqlalchemy

METADATA = sqlalchemy.MetaData()

ARTIFACTS_TABLE = "kmnist_tune_artifacts"
ARTIFACTS = sqlalchemy.Table(
    ARTIFACTS_TABLE,
    METADATA,
    sqlalchemy.Column("artifact_id", sqlalchemy.String(255), primary_key=True),
    sqlalchemy.Column("chunk", sqlalchemy.Integer, primary_key=True, autoincrement=False),
    sqlalchemy.Column("data", sqlalchemy.LargeBinary, nullable=False),
)

CLAIMS_TABLE = "kmnist_tune_claims"
CLAIMS = sqlalchemy.Table(
    CLAIMS_TABLE,
    METADATA,
    sqlalchemy.Column("claim_id", sqlalchemy.BigInteger, primary_key=True, autoincrement=True),
    # No foreign key to Optuna's `studies`: deleting a study must not depend on this table.
    sqlalchemy.Column("study_id", sqlalchemy.Integer, nullable=False, index=True),
    sqlalchemy.Column("claimed_at", sqlalchemy.DateTime(timezone=True), nullable=False, server_default=sqlalchemy.func.now()),
)
