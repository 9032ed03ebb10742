"""Encryption at rest for credentials given to the API (Fernet: AES-128-CBC + HMAC-SHA256).

Keys come from `[registry] encryption_keys`: any strings of 32+ characters, stretched with
HKDF into Fernet keys. The first key encrypts; every key decrypts, so a key can be rotated by
putting the new one first and keeping the old one until storages have been saved again.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class VaultError(Exception):
    pass


class Vault:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._fernet = MultiFernet([Fernet(_derive(key)) for key in keys]) if keys else None

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        if self._fernet is None:
            raise VaultError("storing credentials needs [registry].encryption_keys in the server config")
        return self._fernet.encrypt(secret.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        if self._fernet is None:
            raise VaultError("stored credentials cannot be read: [registry].encryption_keys is not set")
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, ValueError):
            raise VaultError("stored credentials cannot be decrypted with [registry].encryption_keys") from None


def _derive(key: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"media-gateway storage credentials")
    return base64.urlsafe_b64encode(hkdf.derive(key.encode()))
