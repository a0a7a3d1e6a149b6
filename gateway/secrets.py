"""Encrypt mailbox secrets at rest: OAuth tokens and IMAP/SMTP passwords (BEHAVIOUR.md "Never").

Edge module: holds keys and turns bytes into authenticated ciphertext and
back; no I/O, no logging of any secret. Uses cryptography's Fernet
(AES-128-CBC + HMAC-SHA256, https://github.com/fernet/spec) through
``MultiFernet``: the first key encrypts, every key decrypts, so a key is
rotated by listing the old one in ``security.previous_token_keys``.

Key form: a ``security.token_key`` that is a Fernet key (32 bytes, URL-safe
base64, as printed by ``Fernet.generate_key()``) is used as is; any other
string is treated as a passphrase-like secret and stretched into a Fernet
key with HKDF-SHA256 (RFC 5869; no salt, info ``HKDF_INFO``). HKDF is
right for high-entropy secrets; a human password should not be used.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import SecuritySettings

HKDF_INFO = b"mailgate token_key v1"
"""HKDF ``info`` input: changing it changes every derived key."""

FERNET_KEY_BYTES = 32


class MissingTokenKey(RuntimeError):
    """``security.token_key`` is not set, so no secret can be stored or read."""


class UndecryptableSecret(RuntimeError):
    """A ciphertext was made with none of the configured keys, or was altered."""


def fernet_key(secret: str) -> bytes:
    """Return the Fernet key for one configured secret.

    Args:
        secret: a Fernet key (44 chars URL-safe base64 of 32 bytes), or any
            other non-empty string, which is derived with HKDF-SHA256.

    Returns:
        44 bytes of URL-safe base64, usable by ``Fernet``.

    Raises:
        ValueError: ``secret`` is empty.
    """
    if not secret:
        raise ValueError("token key must not be empty")
    try:
        if len(base64.urlsafe_b64decode(secret.encode("ascii"))) == FERNET_KEY_BYTES:
            return secret.encode("ascii")
    except (binascii.Error, UnicodeEncodeError, ValueError):
        pass
    derived = HKDF(
        algorithm=hashes.SHA256(), length=FERNET_KEY_BYTES, salt=None, info=HKDF_INFO
    ).derive(secret.encode("utf-8"))
    return base64.urlsafe_b64encode(derived)


class TokenCipher:
    """Authenticated encryption of small secrets with a current key and older ones.

    Args:
        keys: configured secrets, current first; at least one.

    Raises:
        MissingTokenKey: ``keys`` is empty.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        fernets = [Fernet(fernet_key(k)) for k in keys]
        if not fernets:
            raise MissingTokenKey("security.token_key is not set: mailboxes cannot be connected")
        self._fernet = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> TokenCipher:
        """Build from ``[security]``: ``token_key`` first, then ``previous_token_keys``.

        Raises:
            MissingTokenKey: ``security.token_key`` is unset.
        """
        if security.token_key is None:
            raise MissingTokenKey("security.token_key is not set: mailboxes cannot be connected")
        keys = [security.token_key.get_secret_value()]
        keys += [k.get_secret_value() for k in security.previous_token_keys]
        return cls(keys)

    def encrypt(self, plaintext: bytes) -> bytes:
        """Return the Fernet token (URL-safe base64) of ``plaintext`` under the current key."""
        return self._fernet.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Return the plaintext of ``ciphertext`` made with any configured key.

        Raises:
            UndecryptableSecret: unknown key or altered ciphertext.
        """
        try:
            return self._fernet.decrypt(ciphertext)
        except InvalidToken:
            raise UndecryptableSecret(
                "stored secret cannot be decrypted with the configured token keys"
            ) from None

    def rotate(self, ciphertext: bytes) -> bytes:
        """Re-encrypt ``ciphertext`` under the current key (same plaintext).

        Raises:
            UndecryptableSecret: unknown key or altered ciphertext.
        """
        try:
            return self._fernet.rotate(ciphertext)
        except InvalidToken:
            raise UndecryptableSecret(
                "stored secret cannot be decrypted with the configured token keys"
            ) from None

    def encrypt_json(self, value: dict[str, Any]) -> bytes:
        """Encrypt a JSON object (compact UTF-8 encoding)."""
        return self.encrypt(json.dumps(value, separators=(",", ":")).encode("utf-8"))

    def decrypt_json(self, ciphertext: bytes) -> dict[str, Any]:
        """Decrypt what ``encrypt_json`` made.

        Raises:
            UndecryptableSecret: unknown key, altered ciphertext, or not a JSON object.
        """
        value = json.loads(self.decrypt(ciphertext))
        if not isinstance(value, dict):
            raise UndecryptableSecret("stored secret is not a JSON object")
        return value
