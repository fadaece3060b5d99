"""The PostgreSQL databases Label Studio runs on in the e2e tests and ``bench loop``: made, used, dropped."""

from __future__ import annotations

import pytest

from isal_backend.bench.stack import Postgres, free_port


def test_a_database_is_created_empty_and_dropped() -> None:
    server = Postgres.from_env()
    name = server.create_database("isal_probe")
    try:
        assert server.query("postgres", f"SELECT datname FROM pg_database WHERE datname = '{name}'") == [name]
        assert server.query(name, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == ["0"]
        env = server.label_studio_env(name)
        assert (env["DJANGO_DB"], env["POSTGRE_NAME"], env["POSTGRE_HOST"]) == ("default", name, server.host)
    finally:
        server.drop_database(name)
    assert server.query("postgres", f"SELECT datname FROM pg_database WHERE datname = '{name}'") == []


def test_an_unreachable_server_is_named_in_the_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RuntimeError, match=f"PostgreSQL at 127.0.0.1:{port} .*PGHOST"):
        Postgres(port=port).create_database()
