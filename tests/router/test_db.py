from sqlalchemy import inspect

from router.db import create_db_engine, migrate

TABLES = {
    "decisions", "query_embeddings", "rewards", "preferences", "policy_snapshots", "imported_outcomes", "training_runs",
    "alembic_version",
}


def _migrate_from_empty(url: str) -> None:
    engine = create_db_engine(url)
    try:
        assert not set(inspect(engine).get_table_names()) & TABLES
        migrate(engine)
        migrate(engine)  # idempotent: a second upgrade to head changes nothing
        assert TABLES <= set(inspect(engine).get_table_names())
        columns = {c["name"] for c in inspect(engine).get_columns("decisions")}
        assert {"backend", "policy", "propensity", "scores", "cost_usd", "latency_ms", "status", "embedding_id", "tenant"} <= columns
    finally:
        engine.dispose()


def test_migrations_run_from_empty_on_sqlite(sqlite_url):
    _migrate_from_empty(sqlite_url)


def test_migrations_run_from_empty_on_postgresql(pg_url):
    _migrate_from_empty(pg_url)


def test_migrate_command_on_postgresql(pg_url, tmp_path):
    from router.cli import main
    from tests.conftest import backend_table, write_config

    path = write_config(tmp_path / "c.toml", pg_url, backend_table("a", 1, 0.1, 0.2))
    assert main(["migrate", "--config", str(path)]) == 0
    engine = create_db_engine(pg_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()
