"""The database: SQLAlchemy models, engine set-up and schema checks."""
