"""Alembic migrations of the lineage store: from empty, adopting a database made by the pre-migration
``create_all`` with its rows and chain intact, and refusing a table it does not recognise. On SQLite,
then on a real PostgreSQL (the embedded server, alone) with the stack's roles and grants."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import BigInteger, Integer, String, Text, create_engine, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.lineage.store import (
    TABLE,
    VERSION_TABLE,
    Base,
    EventKey,
    LineageError,
    LineageStore,
    create_schema,
    head_revision,
    schema_revision,
    upgrade_schema,
)


class LegacyBase(DeclarativeBase):
    pass


class LegacyLineageEvent(LegacyBase):
    """The model exactly as ``store.py`` had it before migrations (what ``create_all`` built then)."""

    __tablename__ = "fgov_lineage_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    dag_id: Mapped[str] = mapped_column(String(250), index=True)
    run_id: Mapped[str] = mapped_column(String(250), index=True)
    task_id: Mapped[str] = mapped_column(String(250))
    try_number: Mapped[int] = mapped_column(Integer)
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    event_type: Mapped[str] = mapped_column(String(100), index=True)
    actor: Mapped[str] = mapped_column(String(250))
    created_at: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)
    prev_run_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


def fill(store: LineageStore, runs: tuple[str, ...] = ("r1", "r2", "r3")) -> None:
    for run in runs:
        for i, task in enumerate(("policy_check", "approval_gate", "tune")):
            store.record(EventKey("d", run, task, 1), f"e{i}", actor="x", payload={"n": i, "run": run})


def dump(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {TABLE} ORDER BY id"))]


def schema_diff(engine: Engine) -> list:
    """What autogenerate would change to make the database match the model (empty: they agree)."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}),
                                Base.metadata)


@pytest.fixture
def sqlite(tmp_path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'lineage.db'}")
    yield engine
    engine.dispose()


def test_upgrade_from_empty_builds_the_model_and_records(sqlite: Engine) -> None:
    assert schema_revision(sqlite) is None
    assert upgrade_schema(sqlite) == (None, head_revision())
    assert schema_revision(sqlite) == head_revision()
    assert schema_diff(sqlite) == []
    store = LineageStore(engine=sqlite)
    fill(store)
    assert store.verify().ok and store.verify().checked == 9
    assert upgrade_schema(sqlite) == (head_revision(), head_revision())  # idempotent, rows untouched
    assert len(store.events()) == 9


def test_database_from_create_all_is_adopted_with_its_rows(sqlite: Engine) -> None:
    LegacyBase.metadata.create_all(sqlite)
    store = LineageStore(engine=sqlite)
    fill(store)
    rows = dump(sqlite)
    assert not inspect(sqlite).has_table(VERSION_TABLE)

    assert upgrade_schema(sqlite) == (None, head_revision())
    assert dump(sqlite) == rows
    assert schema_diff(sqlite) == []
    fill(store, ("r4",))  # the chain continues across the upgrade
    result = store.verify()
    assert result.ok and result.checked == 12, result.problems


def test_adoption_keeps_a_broken_chain_broken(sqlite: Engine) -> None:
    """Adopting is not laundering: an edit made before the upgrade is still named after it."""
    LegacyBase.metadata.create_all(sqlite)
    store = LineageStore(engine=sqlite)
    fill(store)
    with sqlite.begin() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET actor = 'mallory' WHERE id = 4"))
    upgrade_schema(sqlite)
    problems = store.verify().problems
    assert problems and problems[0].startswith("event 4 ") and "edited" in problems[0]


def test_unknown_table_without_version_is_refused(sqlite: Engine) -> None:
    with sqlite.begin() as conn:
        conn.execute(text(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(text(f"INSERT INTO {TABLE} (body) VALUES ('keep me')"))
    with pytest.raises(LineageError, match=r"refusing to adopt it") as err:
        upgrade_schema(sqlite)
    assert "missing ['actor'" in str(err.value) and "unexpected ['body']" in str(err.value)
    assert schema_revision(sqlite) is None
    assert dump(sqlite) == [(1, "keep me")]


def test_fgov_db_upgrade_and_status(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = create_engine(url)
    LegacyBase.metadata.create_all(engine)
    fill(LineageStore(engine=engine))
    engine.dispose()
    assert fgov(["db", "status", "--db-url", url]) == 1
    assert "revision none" in capsys.readouterr().out
    assert fgov(["db", "upgrade", "--db-url", url]) == 0
    assert capsys.readouterr().out.strip() == f"lineage schema: none -> {head_revision()}"
    assert fgov(["db", "status", "--db-url", url]) == 0
    assert fgov(["db", "upgrade", "--db-url", url]) == 0
    assert capsys.readouterr().out.strip().endswith(f"lineage schema at {head_revision()}")
    assert fgov(["audit", "verify", "--db-url", url]) == 0


# --- on a real PostgreSQL ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg() -> Iterator[dict[str, str]]:
    from airflow_finetune_gov.stack import postgres
    from airflow_finetune_gov.stack.procs import pick_free_port

    root = Path(tempfile.mkdtemp(prefix="fgov-migrations-"))
    root.chmod(0o755)
    admin_pw = secrets.token_urlsafe(12)
    postgres.initdb(root / "pg", admin_pw)
    port = pick_free_port(set())
    server = postgres.start(root / "pg", port, root / "pg.log")
    try:
        yield {"port": str(port), "admin": f"host=127.0.0.1 port={port} user=postgres password={admin_pw}"}
    finally:
        postgres.shutdown(server)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gov_db(pg: dict[str, str]) -> Iterator[dict[str, str]]:
    """A fresh governance database owned by its own owner role, plus a writer and a reader role."""
    tag = secrets.token_hex(4)
    pw = {r: secrets.token_urlsafe(12) for r in ("owner", "writer", "reader")}
    names = {r: f"t{tag}_{r}" for r in pw}
    db = f"gov_{tag}"
    with psycopg.connect(pg["admin"] + " dbname=postgres", autocommit=True) as conn:
        for role, name in names.items():
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{pw[role]}'")
        conn.execute(f"CREATE DATABASE {db} OWNER {names['owner']}")
    with psycopg.connect(pg["admin"] + f" dbname={db}", autocommit=True) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {names['writer']}, {names['reader']}")
    yield {**{f"{r}_url": f"postgresql+psycopg://{names[r]}:{pw[r]}@127.0.0.1:{pg['port']}/{db}" for r in pw},
           **{f"{r}_role": names[r] for r in names}}


pgmark = pytest.mark.stack


@pgmark
def test_postgres_create_schema_from_empty_grants_append_only(gov_db: dict[str, str]) -> None:
    create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"], reader_roles=(gov_db["reader_role"],))
    owner = create_engine(gov_db["owner_url"])
    try:
        assert schema_revision(owner) == head_revision()
        assert schema_diff(owner) == []
    finally:
        owner.dispose()
    writer = LineageStore(gov_db["writer_url"])
    fill(writer)
    assert writer.verify().ok
    _assert_append_only(writer.engine)
    reader = LineageStore(gov_db["reader_url"])
    assert len(reader.events()) == 9
    assert schema_revision(reader.engine) == head_revision()  # readers may see the revision
    with pytest.raises(LineageError, match="permission denied for table fgov_lineage_event"):
        fill(reader, ("r9",))
    writer.engine.dispose()
    reader.engine.dispose()


@pgmark
def test_postgres_create_all_database_is_adopted_with_rows_and_grants(gov_db: dict[str, str]) -> None:
    owner = create_engine(gov_db["owner_url"])
    try:
        # What the stack did before migrations: create_all as the owner, then the same grants.
        LegacyBase.metadata.create_all(owner)
        with owner.begin() as conn:
            conn.execute(text(f"GRANT SELECT, INSERT ON {TABLE} TO {gov_db['writer_role']}"))
            conn.execute(text(f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {gov_db['writer_role']}"))
        writer = LineageStore(gov_db["writer_url"])
        fill(writer)
        rows = dump(owner)
        assert len(rows) == 9

        create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"])
        assert schema_revision(owner) == head_revision()
        assert schema_diff(owner) == []
        assert dump(owner) == rows
        fill(writer, ("r4",))
        result = writer.verify()
        assert result.ok and result.checked == 12, result.problems
        _assert_append_only(writer.engine)
        writer.engine.dispose()
    finally:
        owner.dispose()


@pgmark
def test_postgres_migration_as_the_writer_fails_whole(gov_db: dict[str, str], capsys) -> None:
    """`fgov db upgrade` with the writer's URL: refused by PostgreSQL, and nothing half-made is left."""
    assert fgov(["db", "upgrade", "--db-url", gov_db["writer_url"]]) == 2
    assert "permission denied for schema public" in capsys.readouterr().err
    owner = create_engine(gov_db["owner_url"])
    try:
        assert not inspect(owner).has_table(VERSION_TABLE) and not inspect(owner).has_table(TABLE)
        assert fgov(["db", "upgrade", "--db-url", gov_db["owner_url"], "--writer-role", gov_db["writer_role"]]) == 0
        assert schema_revision(owner) == head_revision()
    finally:
        owner.dispose()
    fill(LineageStore(gov_db["writer_url"]), ("r1",))


def _assert_append_only(engine: Engine) -> None:
    for statement in (f"UPDATE {TABLE} SET actor = 'mallory' WHERE id = 1", f"DELETE FROM {TABLE} WHERE id = 1",
                      f"UPDATE {VERSION_TABLE} SET version_num = 'x'"):
        with pytest.raises(Exception, match="permission denied"), engine.begin() as conn:
            conn.execute(text(statement))


TRICKY = [
    ("d", "manual__2026-01-01T00:00:00+00:00", "policy_check", {"quote": 'a "b" \\c', "uni": "Zoë ✓ 日本"}),
    ("dåg", "run/ünïcode", "gate", {"marker": '"prev_hash":"\\u0000P","prev_run_hash":"\\u0000R"'}),
    ("d", "r\"quoted\"", "tune", {"nested": {"list": [1, 2.5, None, True], "ctl": "tab\there\nnewline\u0001"}}),
]


@pgmark
def test_postgres_revision_1_with_rows_upgrades_to_head_and_appends_on_the_server(gov_db: dict[str, str]) -> None:
    owner = create_engine(gov_db["owner_url"])
    try:
        upgrade_schema(owner, "0001")
        with owner.begin() as conn:
            conn.execute(text(f"GRANT SELECT, INSERT ON {TABLE} TO {gov_db['writer_role']}"))
            conn.execute(text(f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {gov_db['writer_role']}"))
        old = LineageStore(gov_db["writer_url"])
        fill(old)
        assert old._server_append is False  # no function at revision 0001: the client-side path
        rows = dump(owner)

        assert create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"]) == ("0001", head_revision())
        assert head_revision() == "0002"
        assert dump(owner) == rows
        new = LineageStore(gov_db["writer_url"])
        for dag_id, run_id, task, payload in TRICKY:
            new.record(EventKey(dag_id, run_id, task, 1), "tricky", actor="Zoë", payload=payload)
        assert new._server_append is True
        fill(new, ("r1", "r4"))  # r1 continues its run chain across the two paths
        fill(old, ("r5",))  # a process that started before the upgrade keeps its path; same lock, one chain
        result = new.verify()
        assert result.ok and result.checked == 9 + 3 + 6 + 3, result.problems
        r1 = new.events(run_id="r1")
        assert [e.prev_run_hash for e in r1[1:]] == [e.hash for e in r1[:-1]]
        assert new.events(run_id="run/ünïcode")[0].payload_dict()["marker"] == TRICKY[1][3]["marker"]
        old.engine.dispose()
        new.engine.dispose()
    finally:
        owner.dispose()


@pgmark
def test_postgres_server_hash_disagreeing_with_python_is_refused_and_named(gov_db: dict[str, str],
                                                                            monkeypatch) -> None:
    from airflow_finetune_gov.lineage import store as store_module

    create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"])
    store = LineageStore(gov_db["writer_url"])
    fill(store, ("r1",))
    real = store_module._split_around_tails
    monkeypatch.setattr(store_module, "_split_around_tails",
                        lambda row: (real(row)[0].replace('"actor":"x"', '"actor":"y"'), real(row)[1]))
    with pytest.raises(LineageError, match=r"event 4 \(e0\): the database hashed it as"):
        store.record(EventKey("d", "r1", "t", 1), "e0", actor="x", payload={})
    monkeypatch.undo()
    problems = store.verify().problems
    assert problems and problems[0].startswith("event 4 ") and "edited" in problems[0]
    store.engine.dispose()


def _append_many(url: str, worker: int, n: int) -> None:
    store = LineageStore(url)
    for i in range(n):
        store.record(EventKey("d", f"run{i % 3}", f"w{worker}", 1), "e", actor=f"w{worker}", payload={"i": i})
    store.engine.dispose()


@pgmark
def test_postgres_concurrent_writers_keep_one_chain(gov_db: dict[str, str]) -> None:
    import multiprocessing

    create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(gov_db["writer_url"], w, 150)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    store = LineageStore(gov_db["writer_url"])
    result = store.verify()
    assert result.ok and result.checked == 600, result.problems[:3]
    assert len({e.hash for e in store.events()}) == 600
    store.engine.dispose()


@pgmark
def test_postgres_a_batch_is_appended_in_one_round_trip_and_one_chain(gov_db: dict[str, str], monkeypatch) -> None:
    """``record_many`` (the control plane's group commit) sends a batch's server appends pipelined: the events
    keep their order and both chains verify; a batch in which one event hashes differently on the server is
    recorded not at all."""
    from airflow_finetune_gov.lineage import store as store_module

    create_schema(gov_db["owner_url"], writer_role=gov_db["writer_role"])
    store = LineageStore(gov_db["writer_url"])
    fill(store, ("r1",))
    batch = [(EventKey(dag_id, run_id, task, 1), "tricky", "Zoë", payload) for dag_id, run_id, task, payload in TRICKY]
    batch += [(EventKey("d", f"r{i % 2}", "t", 1), f"b{i}", "x", {"i": i}) for i in range(10)]
    pipelined: list[int] = []
    real_pipelined = LineageStore._append_pipelined
    monkeypatch.setattr(LineageStore, "_append_pipelined",
                        staticmethod(lambda conn, rows: pipelined.append(len(rows)) or real_pipelined(conn, rows)))
    written = store.record_many(batch)
    assert pipelined == [len(batch)]  # the pipelined path, not one round trip per event
    assert [e.event_type for e in written] == [b[1] for b in batch]
    assert [e.id for e in written] == sorted(e.id for e in written)
    result = store.verify()
    assert result.ok and result.checked == 3 + len(batch), result.problems
    r1 = store.events(run_id="r1")
    assert [e.prev_run_hash for e in r1[1:]] == [e.hash for e in r1[:-1]]

    real = store_module._split_around_tails
    monkeypatch.setattr(store_module, "_split_around_tails", lambda row: (
        real(row)[0].replace('"actor":"liar"', '"actor":"y"'), real(row)[1]))
    before = len(store.events())
    with pytest.raises(LineageError, match="none of the 3 events recorded"):
        key = EventKey("d", "r1", "t", 1)
        store.record_many([(key, "ok", "x", {}), (key, "bad", "liar", {}), (key, "ok", "x", {})])
    assert len(store.events()) == before and store.verify().ok
    store.engine.dispose()
