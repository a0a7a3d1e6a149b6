"""Storage: the database (SQLAlchemy 2, async), its migrations and the blob store.

Edge package: owns every byte written to disk. Never imports ``gateway``;
repositories take an ``AsyncSession`` and never commit (the caller owns the
transaction). See docs/storage.md for the schema and its invariants.
"""
