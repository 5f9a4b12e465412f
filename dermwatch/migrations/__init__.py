"""Alembic migrations of the dermwatch database."""
