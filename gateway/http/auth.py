"""API-key authentication and sub-account scope (INTERFACE.md "HTTP API", ``[[http.api_keys]]``).

Edge module: compares the ``Authorization: Bearer <key>`` header (RFC 6750
§2.1) with the configured keys in constant time and says which sub-accounts
the caller may touch. It never logs a key; it does not touch the database
(the routes resolve sub-accounts and call ``Principal.require``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from gateway.config import ApiKey
from gateway.http.errors import FORBIDDEN, UNAUTHENTICATED, ApiError

BEARER = "bearer"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """An authenticated API key.

    Attributes:
        name: the key's ``name`` from the config (safe to log).
        subaccounts: the sub-accounts it may use, as configured (names or
            numeric ids); None means all.
    """

    name: str
    subaccounts: frozenset[str] | None

    @property
    def unrestricted(self) -> bool:
        """Whether the key may use every sub-account (and create new ones)."""
        return self.subaccounts is None

    def allows(self, subaccount_id: int, subaccount_name: str) -> bool:
        """Return whether the key's scope names this sub-account (by id or by name)."""
        if self.subaccounts is None:
            return True
        return str(subaccount_id) in self.subaccounts or subaccount_name in self.subaccounts

    def require(self, subaccount_id: int, subaccount_name: str) -> None:
        """Raise ``ApiError`` 403 ``forbidden`` unless the sub-account is in scope."""
        if not self.allows(subaccount_id, subaccount_name):
            raise ApiError(
                403,
                FORBIDDEN,
                f"API key {self.name!r} is not allowed to use sub-account {subaccount_name!r}",
                {"subaccount_id": subaccount_id},
            )

    def require_unrestricted(self) -> None:
        """Raise ``ApiError`` 403 unless the key covers all sub-accounts."""
        if not self.unrestricted:
            raise ApiError(403, FORBIDDEN, f"API key {self.name!r} is limited to some sub-accounts")


class ApiKeys:
    """The configured keys; ``authenticate`` turns a request into a ``Principal``.

    Args:
        keys: ``http.api_keys`` (secrets already resolved); may be empty, and
            then every API request is refused with 401.
    """

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = tuple(
            (key.key.get_secret_value().encode("utf-8"), self._principal(key)) for key in keys
        )

    @staticmethod
    def _principal(key: ApiKey) -> Principal:
        scope = frozenset(s.strip() for s in key.subaccounts) if key.subaccounts else None
        return Principal(name=key.name, subaccounts=scope)

    def authenticate(self, request: Request) -> Principal:
        """Return the principal of the request's Bearer key.

        Raises:
            ApiError: 401 ``unauthenticated`` when the header is missing, not
                ``Bearer``, or names no configured key.
        """
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != BEARER or not presented.strip():
            raise ApiError(401, UNAUTHENTICATED, "send an API key as 'Authorization: Bearer …'")
        candidate = presented.strip().encode("utf-8")
        found: Principal | None = None
        for secret, principal in self._keys:
            # compare with every key, so timing does not tell which prefix matched
            if hmac.compare_digest(secret, candidate) and found is None:
                found = principal
        if found is None:
            raise ApiError(401, UNAUTHENTICATED, "unknown API key")
        return found
