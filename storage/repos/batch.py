"""Facts for a group-commit batch: one set of SELECTs for all of its messages.

Edge module: sync reads on the caller's ``Session`` (never writes, never
commits); used by ``gateway.intake`` with ``apply_decision(..., held=...)``.

A batch applies its messages one after another in ONE transaction, and a
message may depend on rows an earlier message of the same batch wrote: its
parent or child (R11), a copy of itself (R12), a contact the earlier one
created (R14), a thread whose instances or membership it changed (R4,
merges). ``BatchFacts`` loads the facts of every message at once, before
any is applied (``load_fact_rows``: four statements for the whole batch
instead of four per message; and one more for the conversations of
every contact found). Each message then uses them unless an
earlier message of the batch *wrote something its keys match*; then its
facts are loaded again, alone, after the held rows are flushed, so they
are exactly what ``load_facts`` would return at that point. What counts as
a match (``_Written``), for each earlier stored message:

- its own Message-ID, against this message's ``message_ids`` (thread
  rows match stored ids);
- every id it references, against this message's own Message-ID (child
  rows match references);
- its identity key, against this message's (R12);
- the address keys of contacts it created, against this message's
  address keys (R14);
- the thread it joined and the threads merged into it, against the
  threads of this message's loaded facts (instances added, messages moved).

Refused, duplicate and unrouted messages write only sync-log and location
rows, which no facts read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from ingest.types import (
    AddressKey,
    AuthResult,
    Decision,
    Facts,
    ImapOrigin,
    Lookups,
    MailboxConnection,
    Provider,
    RouteSettings,
    ThreadId,
)
from storage.repos.facts import FactRows, facts_of, load_fact_rows, mailbox_connections
from storage.repos.inserts import RowBuffer
from storage.repos.messages import conversation_ids


@dataclass(slots=True)
class _Written:
    """Keys the batch's stored messages wrote so far (see module docstring)."""

    message_ids: set[str] = field(default_factory=set)
    referenced_ids: set[str] = field(default_factory=set)
    identity_keys: set[str] = field(default_factory=set)
    contact_keys: set[AddressKey] = field(default_factory=set)
    thread_ids: set[ThreadId] = field(default_factory=set)

    def matches(self, lookups: Lookups, rows: FactRows) -> bool:
        threads = {f.thread_id for f in rows.threads} | {c.thread_id for c in rows.waiting_children}
        return bool(
            not self.message_ids.isdisjoint(lookups.message_ids)
            or (
                lookups.own_message_id is not None and lookups.own_message_id in self.referenced_ids
            )
            or lookups.identity_key in self.identity_keys
            or not self.contact_keys.isdisjoint(lookups.address_keys)
            or not self.thread_ids.isdisjoint(threads)
        )


class BatchFacts:
    """The facts of one batch's messages, loaded together, reloaded one by one when stale.

    Args:
        session: the batch's session.
        lookups: per message of the batch, in order; None for a message
            that will not be routed (quarantined).
        held: the batch's held rows (``apply_decision(held=...)``); flushed
            here before a message's facts are loaded again.
        aliases, bcc_domain, contact_initiated: as for ``load_facts``.
    """

    def __init__(
        self,
        session: Session,
        lookups: Sequence[Lookups | None],
        *,
        held: RowBuffer,
        aliases: Mapping[str, tuple[str, ...]],
        bcc_domain: str | None,
        contact_initiated: Mapping[Provider, bool],
    ) -> None:
        self.session = session
        """The batch's session."""
        self._held = held
        self._aliases = aliases
        self._bcc_domain = bcc_domain
        self._contact_initiated = contact_initiated
        present = [item for item in lookups if item is not None]
        loaded = iter(load_fact_rows(session, present, aliases=aliases, bcc_domain=bcc_domain))
        self._rows = [next(loaded) if item is not None else None for item in lookups]
        # The conversations of every contact the batch may link, in one SELECT.
        held.conversation_ids.update(
            conversation_ids(
                session, {c.contact_id for rows in self._rows if rows for c in rows.contacts}
            )
        )
        self._written = _Written()
        self._connections: dict[int, tuple[MailboxConnection, ...]] = {}
        self.reloaded = 0
        """How many messages needed their facts loaded again (for metrics and tests)."""

    def facts(
        self,
        index: int,
        lookups: Lookups,
        *,
        settings: RouteSettings,
        auth: AuthResult | None,
        origin: ImapOrigin | None,
    ) -> Facts:
        """Return the facts of message ``index`` as ``load_facts`` would return them now.

        Raises:
            ValueError: ``index`` names a message given as None.
        """
        rows = self._rows[index]
        if rows is None:
            raise ValueError(f"message {index} of the batch has no lookups")
        if self._written.matches(lookups, rows):
            self._held.flush(self.session)
            (rows,) = load_fact_rows(
                self.session, (lookups,), aliases=self._aliases, bcc_domain=self._bcc_domain
            )
            self.reloaded += 1
        connections = self._connections_of(origin) if origin is not None else ()
        return facts_of(
            self.session, rows, lookups, settings=settings, auth=auth, connections=connections
        )

    def wrote(self, decision: Decision) -> None:
        """Record what applying ``decision`` wrote that later messages' facts may match."""
        if decision.refusal is not None or decision.duplicate_of is not None:
            return
        if not decision.stores or decision.thread is None:
            return
        prepared = decision.prepared
        written = self._written
        if prepared.parsed.message_id is not None:
            written.message_ids.add(prepared.parsed.message_id)
        written.referenced_ids.update(prepared.links.ancestors)
        written.identity_keys.add(prepared.identity.key)
        if decision.thread.thread_id is not None:
            written.thread_ids.add(decision.thread.thread_id)
        written.thread_ids.update(decision.thread.merge_thread_ids)
        written.contact_keys.update(
            target.new_contact.address.address_key
            for target in decision.conversations
            if target.new_contact is not None
        )

    def _connections_of(self, origin: ImapOrigin) -> tuple[MailboxConnection, ...]:
        """The account's connected rows (R4), once per mailbox per batch (nothing writes them)."""
        found = self._connections.get(origin.mailbox_id)
        if found is None:
            found = mailbox_connections(self.session, origin.mailbox_id, self._contact_initiated)
            self._connections[origin.mailbox_id] = found
        return found
