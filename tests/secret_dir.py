"""The secret files docker-compose.yml reads from $KMNIST_TUNE_SECRETS (one file a secret, mounted at
/run/secrets/NAME in the services that list it), made for a test: in a fresh folder in /dev/shm that
every user may enter (a container's user and PgBouncer's, postgres here, read them, as compose's bind
mounts let them), each file mode 0644, as .env.example says to make them."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

MEMORY = Path("/dev/shm")
# name -> how long a random one is (hex characters); the W&B key is empty: offline runs.
SECRETS = {
    "postgres_password": 24,
    "worker_password": 32,
    "dashboard_password": 32,
    "pgbouncer_password": 32,
    "signing_key": 64,
    "wandb_api_key": 0,
}


class SecretDir:
    """A folder of the secret files, their values, and where a service's /run/secrets/NAME is here."""

    def __init__(self, **values: str):
        self.path = Path(tempfile.mkdtemp(prefix="kt-secrets-", dir=MEMORY))
        self.path.chmod(0o755)
        self.values = {name: secrets.token_hex(n // 2) if n else "" for name, n in SECRETS.items()} | values
        for name, value in self.values.items():
            self.write(name, value)

    def write(self, name: str, value: str) -> None:
        f = self.path / name
        f.write_text(value + "\n" if value else "")
        f.chmod(0o644)

    def file(self, name: str) -> Path:
        return self.path / name

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
