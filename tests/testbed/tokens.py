"""Access tokens of the testbed: HS256 JWTs that Dovecot and the submission stand-in accept.

One shared HMAC key signs every access token the local OAuth server issues and
every token the testbed mints for its own helpers. Dovecot validates them
locally (oauth2 passdb, ``introspection_mode = local``); the submission server
validates them with :meth:`TokenMinter.verify`. Holds no provider state: which
tokens are revoked or expired early is the OAuth server's business, and only
its ``/userinfo`` endpoint honours that (see docs/testbed.md).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

#: The JWS algorithm Dovecot is configured for (its key file lives under ``HS256/``).
TOKEN_ALGORITHM = "HS256"
#: Seconds ``iat`` is backdated: with ``iat = now`` Dovecot sometimes says
#: "Token is issued in future" (testbed.md §1.2).
IAT_BACKDATE_SECONDS = 30
#: Default access-token lifetime, as Google and Microsoft issue them.
DEFAULT_TOKEN_TTL_SECONDS = 3600


class InvalidTokenError(Exception):
    """A token failed verification: bad signature, unknown or retired kid, malformed, expired."""


class TokenKeys:
    """Signs and verifies testbed access tokens; one ``kid`` per user and epoch.

    Every kid maps to the same HMAC key, written as a file Dovecot reads
    (``<key_dir>/default/HS256/<kid>``, base64; testbed.md §1.2). Retiring a
    user's kid overwrites its file with a random key, so every token issued
    under it fails signature checks at Dovecot (after its auth process
    reloads: it caches keys) and here, while new tokens get a new kid. That
    is how "expire all access tokens" and "revoke grant" reach the IMAP and
    SMTP stand-ins, like Google and Microsoft invalidate tokens server-side.

    Attributes:
        key: raw HMAC key, 32 random bytes.
        key_dir: the directory Dovecot's ``local_validation_key_dict`` points at.
    """

    def __init__(self, key_dir: Path, *, key: bytes | None = None) -> None:
        """Create the key directory tree (mode 0755: Dovecot's auth process reads it)."""
        self.key = key if key is not None else secrets.token_bytes(32)
        self.key_dir = key_dir
        self._lock = threading.Lock()
        self._epochs: dict[str, int] = {}
        self._live: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self._files().mkdir(parents=True, exist_ok=True)
        for path in (key_dir, key_dir / "default", self._files()):
            path.chmod(0o755)

    def on_retire(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every :meth:`retire` (Dovecot reloads its key cache)."""
        self._listeners.append(listener)

    def kid_for(self, subject: str) -> str:
        """Return ``subject``'s current kid, creating its key file on first use.

        Returns:
            ``<16 hex of sha256(subject)>-<epoch>``, filesystem-safe.
        """
        with self._lock:
            epoch = self._epochs.setdefault(subject, 0)
            kid = f"{hashlib.sha256(subject.encode()).hexdigest()[:16]}-{epoch}"
            if kid not in self._live:
                self._write(kid, self.key)
                self._live.add(kid)
            return kid

    def retire(self, subject: str) -> None:
        """Invalidate every token issued so far for ``subject``; later ones get a new kid."""
        with self._lock:
            epoch = self._epochs.get(subject)
            if epoch is not None:
                kid = f"{hashlib.sha256(subject.encode()).hexdigest()[:16]}-{epoch}"
                self._live.discard(kid)
                self._write(kid, secrets.token_bytes(32))
                self._epochs[subject] = epoch + 1
        for listener in self._listeners:
            listener()

    def mint(
        self,
        subject: str,
        *,
        ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS,
        extra_claims: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """Return a signed access token for ``subject``.

        The claims are ``sub`` (the mailbox address: Dovecot's
        ``username_attribute``), ``iat`` (``now`` - 30 s), ``exp`` (``now`` +
        ``ttl_seconds``; zero or negative gives an expired token) and a random
        ``jti``, plus ``extra_claims``. There is deliberately no ``azp``: Dovecot
        would use it as the key directory name.

        Args:
            subject: the mailbox address, e.g. ``alice@example.test``.
            ttl_seconds: lifetime in seconds from ``now``.
            extra_claims: more claims (``scope``, ``aud``, ``email``...).
            now: Unix time in seconds; defaults to the wall clock.

        Returns:
            The compact JWS (RFC 7515 §7.1), ASCII.
        """
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": subject,
            "iat": issued - IAT_BACKDATE_SECONDS,
            "exp": issued + ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra_claims or {})
        header = {"alg": TOKEN_ALGORITHM, "kid": self.kid_for(subject), "typ": "JWT"}
        return jwt.encode(header, claims, OctKey.import_key(self.key), algorithms=[TOKEN_ALGORITHM])

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """Check signature, kid and ``exp`` of ``token`` and return its claims.

        Args:
            token: a compact JWS as minted by :meth:`mint`.
            now: Unix time in seconds; defaults to the wall clock.

        Returns:
            The claims as a dict (``sub``, ``iat``, ``exp``, ``jti``, ...).

        Raises:
            InvalidTokenError: not a JWT, wrong signature or algorithm, retired
                kid, no ``sub``, or ``exp`` not after ``now``.
        """
        try:
            decoded = jwt.decode(token, OctKey.import_key(self.key), algorithms=[TOKEN_ALGORITHM])
        except (JoseError, ValueError) as exc:
            raise InvalidTokenError(type(exc).__name__) from exc
        claims = dict(decoded.claims)
        with self._lock:
            live = decoded.header.get("kid") in self._live
        current = time.time() if now is None else now
        if not live:
            raise InvalidTokenError("retired kid")
        if not isinstance(claims.get("sub"), str):
            raise InvalidTokenError("no sub")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= current:
            raise InvalidTokenError("expired")
        return claims

    def _files(self) -> Path:
        return self.key_dir / "default" / TOKEN_ALGORITHM

    def _write(self, kid: str, key: bytes) -> None:
        path = self._files() / kid
        tmp = path.with_suffix(".tmp")
        tmp.write_text(base64.b64encode(key).decode())
        tmp.chmod(0o644)
        tmp.replace(path)
