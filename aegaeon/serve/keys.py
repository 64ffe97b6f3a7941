"""The cluster's ZeroMQ CURVE keys: nodes accept api servers that hold the cluster's api key, and only them.

`aegaeon keys DIR` writes two key pairs with ZeroMQ's own certificate files:

- `node.key` (public) and `node.key_secret`: the nodes' pair; api servers need the public half.
- `api.key` (public) and `api.key_secret`: the api servers' pair; nodes need the public half.

A node encrypts its port with its pair and admits a connection only when the client proves it holds a
secret key whose public half is a `*.key` file of the directory (ZeroMQ's ZAP check). `aegaeon serve`
takes the directory from `--cluster-keys DIR` or the `AEGAEON_CLUSTER_KEYS` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

KEYS_ENV = "AEGAEON_CLUSTER_KEYS"
NODE_KEY = "node"
API_KEY = "api"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_MODE = 0o600


@dataclass(frozen=True)
class ClusterKeys:
    """The key directory, read: the public halves always, a secret half where this machine holds it."""

    directory: Path
    node_public: bytes
    api_public: bytes
    node_secret: bytes | None
    api_secret: bytes | None

    @classmethod
    def load(cls, directory: str | Path) -> ClusterKeys:
        """Read DIR (ValueError naming what is missing)."""
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise ValueError(
                f"cluster keys: {directory} is not a directory (make one with `aegaeon keys DIR`)"
            )
        node_public, node_secret = _pair(directory, NODE_KEY)
        api_public, api_secret = _pair(directory, API_KEY)
        return cls(directory, node_public, api_public, node_secret, api_secret)

    def for_node(self) -> bytes:
        """The node's secret key (ValueError if this directory lacks it)."""
        return _require(self.node_secret, self.directory / f"{NODE_KEY}{SECRET_SUFFIX}")

    def for_api(self) -> bytes:
        """The api server's secret key (ValueError if this directory lacks it)."""
        return _require(self.api_secret, self.directory / f"{API_KEY}{SECRET_SUFFIX}")


def write_keys(directory: str | Path) -> list[Path]:
    """Create DIR with a fresh node pair and api pair (secret files readable by their owner only)."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (NODE_KEY, API_KEY):
        public, secret = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret, SECRET_MODE)
        written += [Path(public), Path(secret)]
    return written


def keys_from_env_or(directory: str | None) -> ClusterKeys | None:
    """The keys named by `directory`, else by $AEGAEON_CLUSTER_KEYS, else None."""
    chosen = directory or os.environ.get(KEYS_ENV)
    return ClusterKeys.load(chosen) if chosen else None


def _pair(directory: Path, name: str) -> tuple[bytes, bytes | None]:
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if secret_path.exists():
        public, secret = zmq.auth.load_certificate(str(secret_path))
        return public, secret
    if not public_path.exists():
        raise ValueError(
            f"cluster keys: {public_path} is missing (make the directory with `aegaeon keys DIR`)"
        )
    public, _ = zmq.auth.load_certificate(str(public_path))
    return public, None


def _require(secret: bytes | None, path: Path) -> bytes:
    if secret is None:
        raise ValueError(f"cluster keys: {path} is missing on this machine")
    return secret
