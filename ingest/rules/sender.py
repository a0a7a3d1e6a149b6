"""R15: mail to a sync address is accepted only from that address's user.

Pure: no I/O, no clock. Reads the parsed From and the edge-computed
authentication result; never looks anything up itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.types import Facts, ParsedMessage, SyncTarget

RULE = "R15"


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderVerdict:
    """Outcome of R15 for one sync target.

    Attributes:
        target: the sync target checked.
        accepted: True when the From is the target's user (and, with
            ``require_dmarc``, DKIM or SPF aligned with it passed).
        reason: why, safe to show in an SMTP reply (no message content).
    """

    target: SyncTarget
    accepted: bool
    reason: str


def check_sender(parsed: ParsedMessage, facts: Facts, target: SyncTarget) -> SenderVerdict:
    """Apply R15 to one sync target.

    Follows BEHAVIOUR.md R15: From must be exactly one address, equal (by
    address key) to the user's login email, a connected mailbox address or
    a configured alias; with ``bcc.require_dmarc`` the edge's DKIM/SPF
    result must also be aligned with From (RFC 7489 §3.1).

    Args:
        parsed: the message; ``participants.from_`` in header order.
        facts: loaded facts; ``facts.auth`` may be None when not computed.
        target: the sync address's owner and allowed sender keys.

    Returns:
        A SenderVerdict; never raises.
    """
    senders = parsed.participants.from_
    if len(senders) != 1:
        return SenderVerdict(
            target=target,
            accepted=False,
            reason=f"From must name exactly one address, found {len(senders)}",
        )
    if senders[0].address_key not in target.sender_keys:
        return SenderVerdict(
            target=target,
            accepted=False,
            reason="From is not this sync address's user or one of their addresses",
        )
    if facts.settings.require_dmarc:
        auth = facts.auth
        if auth is None or not (auth.dkim_aligned or auth.spf_aligned):
            detail = auth.detail if auth is not None else "not checked"
            return SenderVerdict(
                target=target,
                accepted=False,
                reason=f"no DKIM or SPF result aligned with From ({detail})",
            )
    return SenderVerdict(target=target, accepted=True, reason="From is the user")
