"""Repositories: plain synchronous functions over a caller's ``Session`` returning frozen values.

None of them commits (``storage.db.Database.run`` owns the transaction);
``apply_decision`` and ``quarantine_message`` flush.
"""
