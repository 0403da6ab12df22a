"""PostgreSQL for tests: the machine's server (127.0.0.1:5432, trust auth) when it answers, else None.
Set GRADFLOW_TEST_PG to another URL to use a different server."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from functools import lru_cache

import pytest


@lru_cache(maxsize=1)
def postgres_url() -> str | None:
    url = os.environ.get("GRADFLOW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        import psycopg

        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception:  # noqa: BLE001 - any failure means: no PostgreSQL here, the tests that need it skip
        return None
    return url


@contextmanager
def fresh_database(prefix: str = "gradflow_test"):
    """A new, empty PostgreSQL database for one test (schema creation races included); dropped after."""
    base = postgres_url()
    if base is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set GRADFLOW_TEST_PG)")
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = base.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
