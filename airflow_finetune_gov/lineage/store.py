"""Append-only lineage record, chained by hash (pure SQLAlchemy 2, no Airflow import).

Every event is keyed by ``(dag_id, run_id, task_id, try_number, map_index)``. Each row carries the
hash of the previous row of the same run and of the previous row overall, and its own hash over
all of that, so an edited, deleted or reordered row breaks a chain that ``verify`` walks. The
writer's database role gets INSERT and SELECT only (see ``create_schema``): the application cannot
rewrite history, and anybody who can is caught by the chain.

The schema is versioned with Alembic (``lineage/migrations``); ``upgrade_schema`` brings a database to
the newest revision, adopting one that an earlier version created without migrations.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

TABLE = "fgov_lineage_event"
# Not "alembic_version": the governance database may be Airflow's own, whose migrations use that name.
VERSION_TABLE = "fgov_alembic_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The revision whose schema ``Base.metadata.create_all`` produced before there were migrations.
_ADOPTED_REVISION = "0001"
_ADOPTED_COLUMNS = frozenset({"id", "dag_id", "run_id", "task_id", "try_number", "map_index", "event_type",
                              "actor", "created_at", "payload", "prev_run_hash", "prev_hash", "hash"})
# A fixed advisory-lock key serialises writers so the global chain has exactly one tail.
_CHAIN_LOCK = 0x46474F56  # "FGOV"
_SECRET_KEY = re.compile(r"(password|passwd|secret|private_key|client_token|wrap(ping)?_token)$", re.I)


class LineageError(RuntimeError):
    """The lineage record could not be written or read; the governed step must not go on unrecorded."""


class Base(DeclarativeBase):
    pass


class LineageEvent(Base):
    __tablename__ = TABLE

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

    def payload_dict(self) -> dict[str, Any]:
        return json.loads(self.payload)

    def hash_matches(self) -> bool:
        """Whether the stored content still hashes to the stored hash (False: the row was edited)."""
        row = self.to_dict()
        row["payload"] = self.payload
        return event_hash(row) == self.hash

    @property
    def chain(self) -> tuple[str, int]:
        return chain_of(self.task_id, self.map_index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id,
            "try_number": self.try_number, "map_index": self.map_index, "event_type": self.event_type,
            "actor": self.actor, "created_at": self.created_at, "payload": self.payload_dict(),
            "prev_run_hash": self.prev_run_hash, "prev_hash": self.prev_hash, "hash": self.hash,
        }


# Built once: constructing statements cost more CPU per append than running them.
_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_TAILS = select(
    select(LineageEvent.hash).order_by(LineageEvent.id.desc()).limit(1).scalar_subquery(),
    select(LineageEvent.hash)
    .where(LineageEvent.dag_id == bindparam("dag_id"), LineageEvent.run_id == bindparam("run_id"))
    .order_by(LineageEvent.id.desc()).limit(1).scalar_subquery(),
)
_APPEND = insert(LineageEvent).returning(LineageEvent.id)
_SERVER_APPEND_SIGNATURE = ("fgov_lineage_append(bigint, text, text, text, integer, integer, text, text, text, text, "
                            "text, text)")
_SERVER_APPEND = text(
    "SELECT o_id, o_prev_run_hash, o_prev_hash, o_hash FROM fgov_lineage_append(:k, :dag_id, :run_id, :task_id, "
    ":try_number, :map_index, :event_type, :actor, :created_at, :payload, :before, :after)")
_SERVER_APPEND_PIPELINED = (  # the same call in psycopg's own placeholders, for its pipelined executemany
    "SELECT o_id, o_prev_run_hash, o_prev_hash, o_hash FROM fgov_lineage_append(%(k)s, %(dag_id)s, %(run_id)s, "
    "%(task_id)s, %(try_number)s, %(map_index)s, %(event_type)s, %(actor)s, %(created_at)s, %(payload)s, "
    "%(before)s, %(after)s)")
_HAS_SERVER_APPEND = text("SELECT coalesce(has_function_privilege(to_regprocedure(:sig), 'EXECUTE'), false)")


@dataclass(frozen=True)
class EventKey:
    dag_id: str
    run_id: str
    task_id: str
    try_number: int
    map_index: int = -1


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def chain_of(task_id: str, map_index: int) -> tuple[str, int]:
    """Which governed chain a task belongs to: its task group and map index. Several chains may run in
    one DAG run (``governed_finetune`` groups side by side, or mapped); each reads only its own events."""
    return task_id.rpartition(".")[0], int(map_index)


def by_chain(events: Iterable[LineageEvent]) -> dict[tuple[str, int], list[LineageEvent]]:
    """A run's events grouped by governed chain (``chain_of``), each group in event order."""
    groups: dict[tuple[str, int], list[LineageEvent]] = {}
    for ev in events:
        groups.setdefault(ev.chain, []).append(ev)
    return groups


def last_payload(events: Iterable[LineageEvent], *types: str) -> dict[str, Any] | None:
    """The payload of the last event of one of ``types``, or ``None``."""
    found = [e for e in events if e.event_type in types]
    return found[-1].payload_dict() if found else None


_HASHED = ("dag_id", "run_id", "task_id", "try_number", "map_index", "event_type", "actor", "created_at", "payload",
           "prev_run_hash", "prev_hash")
# The two tails sit side by side in the canonical (key-sorted) JSON; see ``_split_around_tails``.
_TAILS_MEMBERS = '"prev_hash":"\\u0000P","prev_run_hash":"\\u0000R"'


def event_hash(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({f: row[f] for f in _HASHED}).encode()).hexdigest()


def _split_around_tails(row: Mapping[str, Any]) -> tuple[str, str]:
    """The canonical JSON that ``event_hash`` hashes, cut around its ``prev_hash`` and ``prev_run_hash``
    members, for the server to splice the tails in (migration 0002). Every other byte is Python's."""
    doc = canonical({f: row.get(f) for f in _HASHED} | {"prev_hash": "\0P", "prev_run_hash": "\0R"})
    before, found, after = doc.partition(_TAILS_MEMBERS)
    # Inside a JSON string every quote is escaped, so the members can only match where they are.
    if not found or _TAILS_MEMBERS in after:
        raise LineageError("canonical JSON of an event changed shape: cannot append on the server")
    return before, after


def _pipelined(conn: Any) -> bool:
    """Whether ``conn`` runs on psycopg 3 (whose ``executemany`` pipelines the statements)."""
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(getattr(conn.connection, "driver_connection", None), psycopg.Connection)


def check_no_secrets(payload: Any, path: str = "payload") -> None:
    """Refuse payloads with secret-looking keys: lineage is read by auditors and must hold none."""
    if isinstance(payload, Mapping):
        for key, value in payload.items():
            if _SECRET_KEY.search(str(key)):
                raise LineageError(f"refusing to record {path}.{key}: lineage never stores secrets")
            check_no_secrets(value, f"{path}.{key}")
    elif isinstance(payload, list | tuple):
        for i, value in enumerate(payload):
            check_no_secrets(value, f"{path}[{i}]")


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problems: list[str]


class LineageStore:
    def __init__(self, url: str | None = None, *, engine: Engine | None = None) -> None:
        if engine is None:
            if not url:
                raise LineageError("no governance database URL: set [finetune_gov] governance_db_url")
            engine = create_engine(url, pool_pre_ping=True, future=True)
        self.engine = engine
        self._server_append: bool | None = None  # PostgreSQL at revision >= 0002, checked on first append

    @staticmethod
    def _row(key: EventKey, event_type: str, actor: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The columns of a new event, before its chain tails and hash (refusing secret-looking keys)."""
        check_no_secrets(payload)
        return {
            "dag_id": key.dag_id, "run_id": key.run_id, "task_id": key.task_id,
            "try_number": int(key.try_number), "map_index": int(key.map_index),
            "event_type": event_type, "actor": actor or "unknown",
            "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "payload": canonical(dict(payload)),
        }

    def record(self, key: EventKey, event_type: str, *, actor: str, payload: Mapping[str, Any]) -> LineageEvent:
        row = self._row(key, event_type, actor, payload)
        try:
            if self._server_append is None:
                self._server_append = self._has_server_append()
            if self._server_append:
                return self._record_on_server(row)
            # Core, not the ORM unit of work, and both tails in one statement: every round trip here is
            # made holding the chain lock, which all writers wait for.
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(_LOCK, {"k": _CHAIN_LOCK})
                # A new statement after the lock: under READ COMMITTED it sees the tail the previous
                # holder committed.
                row["prev_hash"], row["prev_run_hash"] = conn.execute(
                    _TAILS, {"dag_id": key.dag_id, "run_id": key.run_id}).one()
                row["hash"] = event_hash(row)
                new_id = conn.execute(_APPEND, row).scalar_one()
            return LineageEvent(id=new_id, **row)
        except SQLAlchemyError as exc:
            raise LineageError(f"could not write lineage event {event_type} for {key.dag_id}/{key.run_id}: "
                               f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc

    def record_many(self, items: Sequence[tuple[EventKey, str, str, Mapping[str, Any]]]) -> list[LineageEvent]:
        """Append ``(key, event_type, actor, payload)`` items in order, in one transaction: one commit (one
        flush of the WAL) for all of them, so concurrent writers that hand their events to one appender
        (the control plane's group commit) share it. All or none are recorded."""
        rows = [self._row(key, event_type, actor, payload) for key, event_type, actor, payload in items]
        out: list[LineageEvent] = []
        try:
            if self._server_append is None:
                self._server_append = self._has_server_append()
            with self.engine.begin() as conn:
                if not self._server_append and conn.dialect.name == "postgresql":
                    conn.execute(_LOCK, {"k": _CHAIN_LOCK})
                if self._server_append and len(rows) > 1 and _pipelined(conn):
                    return self._append_pipelined(conn, rows)
                for row in rows:
                    if self._server_append:
                        before, after = _split_around_tails(row)
                        new_id, row["prev_run_hash"], row["prev_hash"], stored = conn.execute(
                            _SERVER_APPEND, {**row, "k": _CHAIN_LOCK, "before": before, "after": after}).one()
                        row["hash"] = event_hash(row)
                        if stored != row["hash"]:
                            raise LineageError(f"event ({row['event_type']}): the database hashed it as {stored}, "
                                               f"this process as {row['hash']}: not recorded")
                    else:
                        row["prev_hash"], row["prev_run_hash"] = conn.execute(
                            _TAILS, {"dag_id": row["dag_id"], "run_id": row["run_id"]}).one()
                        row["hash"] = event_hash(row)
                        new_id = conn.execute(_APPEND, row).scalar_one()
                    out.append(LineageEvent(id=new_id, **row))
        except SQLAlchemyError as exc:
            raise LineageError(f"could not write {len(rows)} lineage event(s): {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]}") from exc
        return out

    @staticmethod
    def _append_pipelined(conn: Any, rows: list[dict[str, Any]]) -> list[LineageEvent]:
        """The batch's server appends sent together (psycopg's pipeline: one round trip, not one per event),
        in order, in the caller's transaction; each event's hash checked as ``record_many`` does."""
        params = []
        for row in rows:
            before, after = _split_around_tails(row)
            params.append({**row, "k": _CHAIN_LOCK, "before": before, "after": after})
        import psycopg

        try:
            with conn.connection.driver_connection.cursor() as cur:
                cur.executemany(_SERVER_APPEND_PIPELINED, params, returning=True)
                answers = []
                while True:
                    answers.append(cur.fetchone())
                    if not cur.nextset():
                        break
        except psycopg.Error as exc:
            raise LineageError(f"could not write {len(rows)} lineage event(s): {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        out = []
        for row, (new_id, prev_run_hash, prev_hash, stored) in zip(rows, answers, strict=True):
            row["prev_run_hash"], row["prev_hash"] = prev_run_hash, prev_hash
            row["hash"] = event_hash(row)
            if stored != row["hash"]:
                raise LineageError(f"event ({row['event_type']}): the database hashed it as {stored}, this process "
                                   f"as {row['hash']}: none of the {len(rows)} events recorded")
            out.append(LineageEvent(id=new_id, **row))
        return out

    def _has_server_append(self) -> bool:
        if self.engine.dialect.name != "postgresql":
            return False
        with self.engine.connect() as conn:
            return bool(conn.scalar(_HAS_SERVER_APPEND, {"sig": _SERVER_APPEND_SIGNATURE}))

    def _record_on_server(self, row: dict[str, Any]) -> LineageEvent:
        """One round trip in autocommit: the lock is held for the function and the commit only."""
        before, after = _split_around_tails(row)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            new_id, row["prev_run_hash"], row["prev_hash"], stored = conn.execute(
                _SERVER_APPEND, {**row, "k": _CHAIN_LOCK, "before": before, "after": after}).one()
        row["hash"] = event_hash(row)
        if stored != row["hash"]:
            # Committed already: say so loudly; `fgov audit verify` names the event too.
            raise LineageError(f"event {new_id} ({row['event_type']}): the database hashed it as {stored}, "
                               f"this process as {row['hash']}; the chain would not verify")
        return LineageEvent(id=new_id, **row)

    def events(self, *, dag_id: str | None = None, run_id: str | None = None,
               event_type: str | None = None, event_prefix: str | None = None,
               event_types: Sequence[str] | None = None, after_id: int | None = None,
               since: str | None = None) -> list[LineageEvent]:
        """Events in order, of one run or all, of one type, a prefix or a set of types; ``after_id`` and ``since``
        (a ``created_at``) leave out what a follower of the record has seen."""
        stmt = select(LineageEvent).order_by(LineageEvent.id)
        if event_types is not None:
            stmt = stmt.where(LineageEvent.event_type.in_(list(event_types)))
        if after_id is not None:
            stmt = stmt.where(LineageEvent.id > after_id)
        if since is not None:
            stmt = stmt.where(LineageEvent.created_at >= since)
        if event_prefix is not None:
            stmt = stmt.where(LineageEvent.event_type.startswith(event_prefix, autoescape=True))
        if dag_id is not None:
            stmt = stmt.where(LineageEvent.dag_id == dag_id)
        if run_id is not None:
            stmt = stmt.where(LineageEvent.run_id == run_id)
        if event_type is not None:
            stmt = stmt.where(LineageEvent.event_type == event_type)
        try:
            with Session(self.engine) as session:
                rows = list(session.scalars(stmt))
                session.expunge_all()
                return rows
        except SQLAlchemyError as exc:
            where = "/".join(x for x in (dag_id, run_id) if x) or "all runs"
            raise LineageError(f"could not read lineage events of {where}: {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]}") from exc

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs with their event count and first/last event time, the run with the newest event first.

        ``limit``: only the first ``limit`` of them. Finding them reads the newest
        rows backwards (by primary key) until that many runs are seen, and counting reads only their
        rows (index on ``run_id``), so it costs the same with a million events as with a hundred; all
        runs (no limit) is a GROUP BY over the whole table.
        """
        stmt = (
            select(LineageEvent.dag_id, LineageEvent.run_id, func.count(), func.min(LineageEvent.created_at),
                   func.max(LineageEvent.created_at))
            .group_by(LineageEvent.dag_id, LineageEvent.run_id)
            .order_by(func.max(LineageEvent.id).desc())
        )
        try:
            with Session(self.engine) as session:
                wanted: set[tuple[str, str]] | None = None
                if limit is not None and limit > 0:
                    wanted = self._recent_runs(session, limit)
                    if not wanted:
                        return []
                    stmt = stmt.where(LineageEvent.run_id.in_(sorted({r for _, r in wanted})))
                return [
                    {"dag_id": d, "run_id": r, "events": n, "first": first, "last": last}
                    for d, r, n, first, last in session.execute(stmt)
                    if wanted is None or (d, r) in wanted
                ]
        except SQLAlchemyError as exc:
            raise LineageError(f"could not list the runs in lineage: {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]}") from exc

    @staticmethod
    def _recent_runs(session: Session, limit: int) -> set[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        page = max(200, limit * 32)
        below: int | None = None
        while len(seen) < limit:
            stmt = select(LineageEvent.id, LineageEvent.dag_id, LineageEvent.run_id).order_by(
                LineageEvent.id.desc()).limit(page)
            if below is not None:
                stmt = stmt.where(LineageEvent.id < below)
            rows = session.execute(stmt).all()
            for _id, dag_id, run_id in rows:
                seen.setdefault((dag_id, run_id))
                if len(seen) == limit:
                    break
            if len(rows) < page:
                break
            below = rows[-1][0]
        return set(seen)

    def iter_all(self) -> Iterator[LineageEvent]:
        with Session(self.engine) as session:
            yield from session.scalars(select(LineageEvent).order_by(LineageEvent.id).execution_options(
                yield_per=500))

    def verify(self) -> VerifyResult:
        problems: list[str] = []
        prev_hash: str | None = None
        run_tail: dict[tuple[str, str], str] = {}
        checked = 0
        for ev in self.iter_all():
            checked += 1
            if not ev.hash_matches():
                problems.append(f"event {ev.id} ({ev.event_type}, run {ev.run_id}): content does not match "
                                f"its hash (edited)")
            if ev.prev_hash != prev_hash:
                problems.append(f"event {ev.id} ({ev.event_type}, run {ev.run_id}): global chain broken "
                                f"(a row before it was deleted, inserted or reordered)")
            expected_run = run_tail.get((ev.dag_id, ev.run_id))
            if ev.prev_run_hash != expected_run:
                problems.append(f"event {ev.id} ({ev.event_type}, run {ev.run_id}): run chain broken")
            prev_hash = ev.hash
            run_tail[(ev.dag_id, ev.run_id)] = ev.hash
        return VerifyResult(ok=not problems, checked=checked, problems=problems)


def alembic_config(connection: Connection | None = None) -> Any:
    """The migrations' Alembic ``Config``, built in code (the package ships no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def schema_revision(engine: Engine) -> str | None:
    """The database's current revision (None: no version table, i.e. empty or created before migrations)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade_schema(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the lineage schema to ``revision``; returns (revision before, revision after).

    A database whose table was made by ``create_all`` (before migrations) has no version table: it is
    stamped at the revision that describes that table, after checking its columns, and then upgraded,
    so its rows stay. On PostgreSQL everything runs in one transaction holding the chain lock, so no
    event is appended half-way through and a failed migration leaves the database as it was.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK})
        before = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        cfg = alembic_config(conn)
        insp = inspect(conn)
        if before is None and insp.has_table(TABLE):
            columns = {c["name"] for c in insp.get_columns(TABLE)}
            if columns != _ADOPTED_COLUMNS:
                raise LineageError(
                    f"{TABLE} exists without a version table ({VERSION_TABLE}) and its columns are not those of "
                    f"revision {_ADOPTED_REVISION}: missing {sorted(_ADOPTED_COLUMNS - columns)}, "
                    f"unexpected {sorted(columns - _ADOPTED_COLUMNS)}; refusing to adopt it")
            command.stamp(cfg, _ADOPTED_REVISION)
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    return before, after


def create_schema(owner_url: str, writer_role: str | None = None,
                  reader_roles: tuple[str, ...] = ()) -> tuple[str | None, str | None]:
    """Migrate the lineage schema to head as its owner; the writer may INSERT and SELECT, never UPDATE/DELETE.
    Returns the revisions before and after."""
    roles = [r for r in (writer_role, *reader_roles) if r]
    for role in roles:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", role):
            raise LineageError(f"invalid role name {role!r}")
    engine = create_engine(owner_url, future=True)
    try:
        revisions = upgrade_schema(engine)
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                for role in roles:
                    conn.execute(text(f"GRANT SELECT ON {TABLE}, {VERSION_TABLE} TO {role}"))
                if writer_role:
                    conn.execute(text(f"GRANT INSERT ON {TABLE} TO {writer_role}"))
                    conn.execute(text(f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {writer_role}"))
                    conn.execute(text(f"GRANT EXECUTE ON FUNCTION {_SERVER_APPEND_SIGNATURE} TO {writer_role}"))
        return revisions
    finally:
        engine.dispose()
