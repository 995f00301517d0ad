"""Append-only lineage record, chained by hash (pure SQLAlchemy 2, no Airflow import).

Every event is keyed by ``(dag_id, run_id, task_id, try_number, map_index)``. Each row carries the
hash of the previous row of the same run and of the previous row overall, and its own hash over
all of that, so an edited, deleted or reordered row breaks a chain that ``verify`` walks. The
writer's database role gets INSERT and SELECT only (see ``create_schema``): the application cannot
rewrite history, and anybody who can is caught by the chain.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String, Text, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

TABLE = "fgov_lineage_event"
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


def event_hash(row: Mapping[str, Any]) -> str:
    fields = ("dag_id", "run_id", "task_id", "try_number", "map_index", "event_type", "actor",
              "created_at", "payload", "prev_run_hash", "prev_hash")
    return hashlib.sha256(canonical({f: row[f] for f in fields}).encode()).hexdigest()


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

    def record(self, key: EventKey, event_type: str, *, actor: str, payload: Mapping[str, Any]) -> LineageEvent:
        check_no_secrets(payload)
        try:
            with Session(self.engine) as session, session.begin():
                if self.engine.dialect.name == "postgresql":
                    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK})
                prev = session.scalar(select(LineageEvent.hash).order_by(LineageEvent.id.desc()).limit(1))
                prev_run = session.scalar(
                    select(LineageEvent.hash)
                    .where(LineageEvent.dag_id == key.dag_id, LineageEvent.run_id == key.run_id)
                    .order_by(LineageEvent.id.desc()).limit(1)
                )
                row = {
                    "dag_id": key.dag_id, "run_id": key.run_id, "task_id": key.task_id,
                    "try_number": int(key.try_number), "map_index": int(key.map_index),
                    "event_type": event_type, "actor": actor or "unknown",
                    "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "payload": canonical(dict(payload)), "prev_run_hash": prev_run, "prev_hash": prev,
                }
                event = LineageEvent(**row, hash=event_hash(row))
                session.add(event)
                session.flush()
                session.expunge(event)
                return event
        except SQLAlchemyError as exc:
            raise LineageError(f"could not write lineage event {event_type} for {key.dag_id}/{key.run_id}: "
                               f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc

    def events(self, *, dag_id: str | None = None, run_id: str | None = None,
               event_type: str | None = None, event_prefix: str | None = None) -> list[LineageEvent]:
        stmt = select(LineageEvent).order_by(LineageEvent.id)
        if event_prefix is not None:
            stmt = stmt.where(LineageEvent.event_type.startswith(event_prefix, autoescape=True))
        if dag_id is not None:
            stmt = stmt.where(LineageEvent.dag_id == dag_id)
        if run_id is not None:
            stmt = stmt.where(LineageEvent.run_id == run_id)
        if event_type is not None:
            stmt = stmt.where(LineageEvent.event_type == event_type)
        with Session(self.engine) as session:
            rows = list(session.scalars(stmt))
            session.expunge_all()
            return rows

    def runs(self) -> list[dict[str, Any]]:
        stmt = (
            select(LineageEvent.dag_id, LineageEvent.run_id, func.count(), func.min(LineageEvent.created_at),
                   func.max(LineageEvent.created_at))
            .group_by(LineageEvent.dag_id, LineageEvent.run_id)
            .order_by(func.min(LineageEvent.id))
        )
        with Session(self.engine) as session:
            return [
                {"dag_id": d, "run_id": r, "events": n, "first": first, "last": last}
                for d, r, n, first, last in session.execute(stmt)
            ]

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


def create_schema(owner_url: str, writer_role: str | None = None, reader_roles: tuple[str, ...] = ()) -> None:
    """Create the lineage table as its owner; the writer may INSERT and SELECT, never UPDATE/DELETE."""
    engine = create_engine(owner_url, future=True)
    try:
        Base.metadata.create_all(engine)
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                for role in filter(None, (writer_role, *reader_roles)):
                    if not re.fullmatch(r"[a-z_][a-z0-9_]*", role):
                        raise LineageError(f"invalid role name {role!r}")
                    conn.execute(text(f"GRANT SELECT ON {TABLE} TO {role}"))
                if writer_role:
                    conn.execute(text(f"GRANT INSERT ON {TABLE} TO {writer_role}"))
                    conn.execute(text(f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO {writer_role}"))
    finally:
        engine.dispose()
