"""Database engine and schema migrations (SQLite file by default, PostgreSQL through DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url

import migrations
from router.errors import DatabaseUnavailable

CONNECT_TIMEOUT_S = 5  # PostgreSQL: a database that does not answer is an outage (503), not a hung request


def lock_key_sql(name: str) -> str:
    """SQL for the advisory lock key `name` in this schema (tests run many schemas in one database)."""
    return f"('x' || substr(md5(current_schema() || '/llm-router/{name}'), 1, 16))::bit(64)::bigint"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (the driver this package installs)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def create_db_engine(url: str) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN: savepoints then work
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
            connection.exec_driver_sql("BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, pool_timeout=10,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def database_error(error: BaseException) -> DatabaseUnavailable | None:
    """The 503 for an error that means the database cannot be reached (refused or lost connection, pool
    exhausted); None for any other error (a constraint, a bad query: those are bugs or conflicts)."""
    if isinstance(error, DatabaseUnavailable):
        return error
    outage = isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.PendingRollbackError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated
    )
    if not outage:
        try:
            import psycopg

            outage = isinstance(error, psycopg.OperationalError)
        except ImportError:  # pragma: no cover - psycopg is a dependency
            pass
    if not outage:
        return None
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DatabaseUnavailable(f"the database is unavailable ({detail}); this request was not completed: retry it")


def migrate(engine: Engine, revision: str = "head") -> None:
    """Alembic upgrade on the given engine (`llm-router migrate`, and at start with auto_migrate)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # replicas starting together: one migrates, the others wait
            connection.execute(text(f"SELECT pg_advisory_xact_lock({lock_key_sql('migrate')})"))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
