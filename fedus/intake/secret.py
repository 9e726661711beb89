"""Pseudonyms for grouping keys: HMAC-SHA256 with a secret that never leaves the site.

Frames of one patient must share a group so splits keep them on one side, but a
plain hash of a PatientID can be reversed by hashing candidate IDs; a keyed hash
cannot without the site's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = ".fedus-site-secret"
PSEUDONYM_HEX = 16


def site_secret(folder: Path) -> bytes:
    """The site's secret in `folder`, created (mode 0600) on first use."""
    path = folder / SECRET_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another scan created it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def pseudonym(secret: bytes, value: str) -> str:
    """Keyed, truncated hash of an identifier; empty stays empty (no grouping)."""
    if not value:
        return ""
    return hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]
