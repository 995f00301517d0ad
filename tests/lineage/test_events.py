"""The lineage event types, defined once (airflow_finetune_gov/lineage/events.py): writers are checked
against them, and every name the package reads or writes is one of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.events import EVENT_TYPES, EventSchemaError
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore

PACKAGE = Path(events.__file__).resolve().parent.parent
# A quoted "area.verb" name of one of the provider's areas, as writers and readers spell event types.
AREAS = "run|policy|dataset|approval|lease|tuning|evaluation|promotion|rollback|provenance"
NAME = re.compile(rf"""["']({AREAS})\.([a-z_]+)["']""")
# Names of that shape that are another tool's, not events: garak's report setting (evaluation/imports.py)
FOREIGN = {"run.eval_threshold"}


def names_in_source(skip: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path == skip:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in NAME.finditer(line):
                found.setdefault(f"{m[1]}.{m[2]}", []).append(f"{path.relative_to(PACKAGE)}:{n}")
    return found


def test_every_event_name_the_package_spells_is_defined_once() -> None:
    used = names_in_source(skip=Path(events.__file__).resolve())
    undefined = {name: where for name, where in used.items() if name not in EVENT_TYPES and name not in FOREIGN}
    assert not undefined, f"event names used but not defined in lineage/events.py: {undefined}"
    constants = [v for v in vars(events).values() if isinstance(v, events.EventType)]
    assert len(EVENT_TYPES) == len(constants), "two constants define the same event type"
    for definition in EVENT_TYPES.values():
        assert definition.by and definition.means and definition.required, definition


def test_every_defined_event_is_written_somewhere() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "events.py")
    constants = {name for name, value in vars(events).items() if isinstance(value, events.EventType)}
    # written by its literal name, or through its constant, or as "<event>.blocked" (promotion, rollback)
    unwritten = [str(e) for name, e in ((n, getattr(events, n)) for n in constants)
                 if f'"{e}"' not in source and name not in source and not str(e).endswith(".blocked")]
    assert not unwritten, unwritten


def test_a_payload_must_match_its_definition() -> None:
    ok = events.LEASE_RENEWED.payload(lease_id="L", ttl_seconds=60, expires_at="2026-12-01T00:00:00+00:00")
    assert events.check("lease.renewed", ok) is events.LEASE_RENEWED
    with pytest.raises(EventSchemaError, match=r"lease\.renewed: missing \['expires_at'\]"):
        events.check("lease.renewed", {"lease_id": "L", "ttl_seconds": 60})
    with pytest.raises(EventSchemaError, match=r"fields not defined for it \['ttl'\]"):  # a renamed key
        events.check("lease.renewed", {**ok, "ttl": 60})
    with pytest.raises(EventSchemaError, match=r"unknown lineage event type 'lease\.renewd'"):
        events.check("lease.renewd", ok)
    # an open payload (a record defined elsewhere) may carry more than its required fields
    events.check("policy.error", {"error": "x", "dataset": {"rows": 0}})


def test_a_writer_with_a_wrong_payload_records_nothing(tmp_path: Path) -> None:
    store = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(store.engine)
    key = EventKey("d", "r", "revoke_lease", 1)
    with pytest.raises(EventSchemaError):
        events.record(store, key, events.LEASE_NONE, actor="lease-broker", payload={"why": "renamed"})
    assert store.events() == []
    event = events.record(store, key, events.LEASE_NONE, actor="lease-broker", payload={"reason": "none issued"})
    assert event.event_type == "lease.none" and type(event.event_type) is str
    assert store.events()[0].event_type == events.LEASE_NONE
