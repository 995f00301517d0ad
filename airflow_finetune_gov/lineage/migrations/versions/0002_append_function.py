"""PostgreSQL: append an event in one round trip (``fgov_lineage_append``); nothing on other databases.

Before this, an append was BEGIN, the chain lock, the two tails, the INSERT and COMMIT from the client,
so the lock (which every writer needs) was held across three client round trips plus the commit's WAL
flush. The function takes the lock, reads both tails, hashes and inserts on the server; called in
autocommit, the lock is held for the function and the flush only. The client still builds the whole
canonical JSON (all escaping is Python's ``json``): it sends the text before and after the two
``prev_*`` members, and the function only splices in the tails, which are hex or null. ``record``
checks the returned hash against its own, and ``verify`` recomputes every hash in Python.

It runs with the caller's privileges (not SECURITY DEFINER): only a role that may INSERT can append.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SIGNATURE = "fgov_lineage_append(bigint, text, text, text, integer, integer, text, text, text, text, text, text)"

FUNCTION = r"""
CREATE FUNCTION fgov_lineage_append(
    lock_key bigint, p_dag_id text, p_run_id text, p_task_id text, p_try_number integer, p_map_index integer,
    p_event_type text, p_actor text, p_created_at text, p_payload text, p_before text, p_after text)
RETURNS TABLE (o_id bigint, o_prev_run_hash text, o_prev_hash text, o_hash text)
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
  PERFORM pg_advisory_xact_lock(lock_key);
  -- Each query of a VOLATILE function takes a new snapshot: these see the tail the lock's previous
  -- holder committed.
  SELECT e.hash INTO o_prev_hash FROM fgov_lineage_event e ORDER BY e.id DESC LIMIT 1;
  SELECT e.hash INTO o_prev_run_hash FROM fgov_lineage_event e
    WHERE e.dag_id = p_dag_id AND e.run_id = p_run_id ORDER BY e.id DESC LIMIT 1;
  o_hash := encode(sha256(convert_to(
    p_before || '"prev_hash":' || coalesce(to_json(o_prev_hash)::text, 'null')
             || ',"prev_run_hash":' || coalesce(to_json(o_prev_run_hash)::text, 'null') || p_after,
    'UTF8')), 'hex');
  INSERT INTO fgov_lineage_event (dag_id, run_id, task_id, try_number, map_index, event_type, actor, created_at,
                                  payload, prev_run_hash, prev_hash, hash)
  VALUES (p_dag_id, p_run_id, p_task_id, p_try_number, p_map_index, p_event_type, p_actor, p_created_at,
          p_payload, o_prev_run_hash, o_prev_hash, o_hash)
  RETURNING id INTO o_id;
  RETURN NEXT;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    # Functions are executable by PUBLIC by default; create_schema grants EXECUTE to the writer.
    op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP FUNCTION {SIGNATURE}")
