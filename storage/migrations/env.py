"""Alembic environment: runs migrations on the connection handed over by :func:`storage.database.migrate`."""

from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - READAR always passes a connection
    raise RuntimeError("READAR migrations run through storage.database.migrate(), which supplies a connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
