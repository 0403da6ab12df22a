"""PostgreSQL for tests: the machine's server ($GRADFLOW_TEST_POSTGRES, default
postgresql://postgres@127.0.0.1:5432/postgres, trust auth). Each user gets a fresh database, dropped after;
tests skip, with the reason, when no server answers."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest


@contextmanager
def fresh_database(prefix: str = "gradflow_test"):
    """A new, empty database (schema creation races included); yields its postgresql:// URL."""
    psycopg = pytest.importorskip("psycopg")
    admin = os.environ.get("GRADFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        con = psycopg.connect(admin, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {admin.rsplit('@', 1)[-1]}: {str(e).strip()[:200]}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with con.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.close()
