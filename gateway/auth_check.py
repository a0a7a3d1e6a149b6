"""Sender authentication for R15 with ``bcc.require_dmarc``: DKIM or SPF aligned with From.

Edge module: it reads DNS. DKIM signatures are verified with dkimpy (RFC
6376), SPF is evaluated with pyspf (RFC 7208), and alignment with the From
domain follows DMARC's relaxed mode (RFC 7489 §3.1): the organisational
domains must be equal, the organisational domain being the registrable
domain under the Public Suffix List (``tld`` package). No DMARC record is
required: R15 asks only that DKIM or SPF pass *aligned* with From.

DNS: by default the system resolver. ``bcc.dns_server = "host:port"``
points both checks at one resolver (a local validating resolver, or a test
server); pyspf can only use dnspython's default resolver, so that setting
replaces ``dns.resolver.default_resolver`` for the process (dnspython's
documented way to configure it), once, when the gateway starts.

Blocking DNS calls run in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import dkim
import dns.exception
import dns.resolver
import spf
from tld import get_fld

from ingest.types import AuthResult, Prepared, SmtpEnvelope

log = logging.getLogger(__name__)

DNS_TIMEOUT_SECONDS = 5.0
"""Per-lookup budget; a slow DNS answer counts as no result, not as a failure."""

DnsFunc = Callable[..., bytes | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Signature:
    domain: str
    valid: bool


def organisational_domain(domain: str) -> str:
    """Return the registrable domain of ``domain`` (RFC 7489 §3.2), lower-case.

    Falls back to the domain itself when it is not under a known public
    suffix (e.g. ``localhost`` or a private TLD).
    """
    name = domain.strip().rstrip(".").lower()
    found = get_fld(name, fix_protocol=True, fail_silently=True)
    return str(found) if found else name


def aligned(domain: str, from_domain: str) -> bool:
    """Relaxed DMARC alignment (RFC 7489 §3.1.1 and §3.1.2)."""
    return bool(domain) and organisational_domain(domain) == organisational_domain(from_domain)


def make_resolver(dns_server: str) -> dns.resolver.Resolver:
    """Build a dnspython resolver for ``"host:port"`` (port 53 when omitted)."""
    host, _, port = dns_server.rpartition(":") if ":" in dns_server else (dns_server, "", "53")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host.strip("[]")]
    resolver.port = int(port)
    resolver.lifetime = DNS_TIMEOUT_SECONDS
    return resolver


def use_dns_server(dns_server: str) -> None:
    """Point dnspython's default resolver (used by pyspf) at ``dns_server``."""
    dns.resolver.default_resolver = make_resolver(dns_server)


def _txt_lookup(resolver: dns.resolver.Resolver | None) -> DnsFunc:
    """A dkimpy ``dnsfunc``: name (bytes) → TXT strings joined, or None."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        active = resolver or dns.resolver.get_default_resolver()
        try:
            answer = active.resolve(name.decode("ascii"), "TXT", lifetime=DNS_TIMEOUT_SECONDS)
        except (dns.exception.DNSException, UnicodeDecodeError):
            return None
        for record in answer:
            return b"".join(record.strings)
        return None

    return lookup


def _signatures(raw: bytes, dnsfunc: DnsFunc) -> list[_Signature]:
    """Verify every DKIM-Signature of ``raw``; never raises."""
    out: list[_Signature] = []
    try:
        verifier = dkim.DKIM(raw)
        count = len([h for h in verifier.headers if h[0].lower() == b"dkim-signature"])
    except Exception:  # dkimpy raises on malformed input; that is "no signature"
        return out
    for index in range(count):
        try:
            valid = bool(verifier.verify(idx=index, dnsfunc=dnsfunc))
        except Exception:  # a broken signature is a failed one (RFC 6376 §6.1)
            valid = False
        domain = (verifier.domain or b"").decode("ascii", "replace")
        out.append(_Signature(domain=domain, valid=valid))
    return out


def _spf(envelope: SmtpEnvelope) -> str:
    """SPF result for the envelope sender (RFC 7208 §2.4), lower-case."""
    if not envelope.envelope_sender or "@" not in envelope.envelope_sender:
        return "none"
    try:
        result, _ = spf.check2(
            i=envelope.peer, s=envelope.envelope_sender, h=envelope.helo or "unknown"
        )
    except Exception:  # pyspf raises on malformed records; RFC 7208 §2.6.7 permerror
        return "permerror"
    return str(result).lower()


def check_sender_authentication(
    prepared: Prepared, resolver: dns.resolver.Resolver | None = None
) -> AuthResult | None:
    """Compute DKIM and SPF alignment with From for an SMTP-received message.

    Args:
        prepared: the message; its provenance must be an SMTP envelope and
            its From a single address, else None is returned.
        resolver: the resolver for DKIM keys; None for the default one.

    Returns:
        AuthResult with ``dkim_aligned`` (a valid signature whose d= aligns
        with From), ``spf_aligned`` (SPF pass for an envelope sender whose
        domain aligns with From) and a short ``detail``; None when the
        message cannot be checked. Blocking: call in a worker thread.
    """
    envelope = prepared.raw.provenance
    senders = prepared.parsed.participants.from_
    if not isinstance(envelope, SmtpEnvelope) or len(senders) != 1:
        return None
    from_domain = senders[0].addr_spec.rpartition("@")[2]
    signatures = _signatures(prepared.raw.raw, _txt_lookup(resolver))
    dkim_ok = any(s.valid and aligned(s.domain, from_domain) for s in signatures)
    spf_result = _spf(envelope)
    mail_from_domain = envelope.envelope_sender.rpartition("@")[2]
    spf_ok = spf_result == "pass" and aligned(mail_from_domain, from_domain)
    dkim_text = ",".join(f"{s.domain}:{'pass' if s.valid else 'fail'}" for s in signatures)
    detail = f"dkim={dkim_text or 'none'} spf={spf_result} from={from_domain}"
    return AuthResult(dkim_aligned=dkim_ok, spf_aligned=spf_ok, detail=detail)


class SenderAuthenticator:
    """Async wrapper used by the intake: one resolver, checks off the event loop."""

    def __init__(self, dns_server: str = "") -> None:
        """Use the system resolver, or ``dns_server`` ("host:port") for every lookup."""
        self._resolver = make_resolver(dns_server) if dns_server else None
        if dns_server:
            use_dns_server(dns_server)

    async def __call__(self, prepared: Prepared) -> AuthResult | None:
        """Return the AuthResult for ``prepared`` (see check_sender_authentication)."""
        result = await asyncio.to_thread(check_sender_authentication, prepared, self._resolver)
        if result is not None:
            log.debug("sender authentication", extra={"reason": result.detail})
        return result
