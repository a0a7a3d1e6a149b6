"""Config fragments that point mailgate's provider keys at the testbed servers.

Every integration test that connects a mailbox builds ``[providers.*]`` from
these, so the endpoints, TLS and CA settings are written in one place.
"""

from __future__ import annotations

from typing import Any

from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.submission import SubmissionServer


def oauth_keys(oauth_provider: OAuthProvider, flavour: str, client: Any) -> dict[str, Any]:
    """``client_id`` … ``jwks_url`` for a client registered with the testbed OAuth server."""
    ends = oauth_provider.endpoints(flavour)
    return {
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "authorize_url": ends.authorize_url,
        "token_url": ends.token_url,
        "userinfo_url": ends.userinfo_url,
        "revoke_url": ends.revoke_url,
        "issuer": ends.issuer,
        "jwks_url": None,
    }


def imap_keys(dovecot: Dovecot) -> dict[str, Any]:
    """IMAP over implicit TLS to the testbed Dovecot, trusting its certificate."""
    return {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.ports.imaps,
        "imap_security": "tls",
        "ca_file": str(dovecot.ca_file),
    }


def smtp_keys(submission: SubmissionServer) -> dict[str, Any]:
    """Submission with STARTTLS to the testbed server (same certificate as Dovecot)."""
    return {"smtp_host": "127.0.0.1", "smtp_port": submission.port, "smtp_security": "starttls"}
