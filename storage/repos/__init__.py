"""Repositories: async functions over a caller's ``AsyncSession`` returning frozen values.

None of them commits; ``apply_decision`` and ``quarantine_message`` flush.
"""
