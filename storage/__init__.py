"""Storage: the database (SQLAlchemy 2), its migrations and the blob store.

Edge package: owns every byte written to disk. Never imports ``gateway``;
repositories are sync functions taking a ``Session`` and never commit:
``storage.db.Database.run`` calls them in one transaction (SQLite on one
worker thread, PostgreSQL through ``AsyncSession.run_sync``). See
docs/storage.md for the schema and its invariants.
"""
