"""Durable state: SQLite in WAL mode with numbered migrations (:mod:`storage.sqlite`)."""
