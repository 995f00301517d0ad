"""``fgov stack up|down|status``: the embedded real stack (PostgreSQL, OpenBao, Airflow) on loopback.

State lives under one directory (default ``./.fgov``, git-ignored): data, logs, secrets (mode 0700,
files 0600) and ``stack.json``, which names ports, URLs, users and where their passwords are.
``up`` is idempotent and all-or-nothing: if any step fails, every process it started is stopped
before the error is raised, so a failed start leaves nothing running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import requests

from airflow_finetune_gov.policy.engine import load_policy
from airflow_finetune_gov.provider_info import CONFIG_OPTIONS
from airflow_finetune_gov.stack import airflow as af
from airflow_finetune_gov.stack import openbao, people, postgres, provision, users
from airflow_finetune_gov.stack.procs import ProcRecord, StackError, pick_free_port, port_free, tcp_open
from airflow_finetune_gov.vault.bootstrap import BootstrapSpec, DatasetGrant, bootstrap

DEMO_DAG_ID = "governed_finetune_demo"


@dataclass
class StackOptions:
    state_dir: Path
    dags_folder: Path
    postgres_port: int | None = None
    openbao_port: int | None = None
    airflow_port: int | None = None
    policy_file: str | None = None
    postgres_url: str | None = None  # an existing server (superuser URL) instead of the embedded one
    raw_audit_log: Path | None = None  # test-only: an audit device that records secrets in plaintext
    notify_smtp_url: str = ""  # approval notifications (the control plane's configuration only)
    notify_webhook_url: str = ""
    notify_address_template: str = "{user}@localhost"
    log: Any = field(default=print)


def _default_port(env: str, explicit: int | None) -> int | None:
    if explicit:
        return explicit
    value = os.environ.get(env)
    return int(value) if value else None


class Stack:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.secrets = self.dir / "secrets"
        self.logs = self.dir / "logs"
        self.state_file = self.dir / "stack.json"

    # --- state -----------------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())

    def records(self, state: dict[str, Any] | None = None) -> list[ProcRecord]:
        """Recorded processes, including those of a start-up that was itself killed half-way."""
        state = state if state is not None else self.load()
        raw = list((state or {}).get("processes", []))
        partial = self.dir / "stack.partial.json"
        if partial.exists():
            raw += json.loads(partial.read_text()).get("processes", [])
        seen: dict[int, ProcRecord] = {}
        for item in raw:
            record = ProcRecord.from_json(item)
            seen.setdefault(record.pid, record)
        return list(seen.values())

    def _secret(self, name: str, factory=lambda: secrets.token_urlsafe(24)) -> str:
        self.secrets.mkdir(parents=True, exist_ok=True)
        self.secrets.chmod(0o700)
        path = self.secrets / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(factory())
        return path.read_text()

    def _write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)

    # --- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.load()
        if state is None:
            return {"running": False, "state_dir": str(self.dir), "processes": []}
        procs = [{"name": r.name, "pid": r.pid, "alive": r.alive(), "log": r.log} for r in self.records(state)]
        airflow_health = af.health(state["airflow"]["url"]) if any(p["alive"] for p in procs) else {}
        return {
            "running": bool(procs) and all(p["alive"] for p in procs),
            "state_dir": str(self.dir),
            "processes": procs,
            "airflow": state["airflow"]["url"],
            "airflow_health": {k: v.get("status") for k, v in airflow_health.items() if isinstance(v, dict)},
            "openbao": state["openbao"]["addr"],
            "postgres": f"{state['postgres'].get('host', '127.0.0.1')}:{state['postgres']['port']}",
        }

    # --- down ------------------------------------------------------------------------------------
    def down(self, log=print) -> list[str]:
        state = self.load()
        stopped = []
        for record in reversed(self.records(state)):
            was_alive = record.alive()
            if record.name == "postgres":
                postgres.shutdown(record)
            else:
                from airflow_finetune_gov.stack.procs import stop

                stop(record)
            if was_alive:
                stopped.append(f"{record.name} (pid {record.pid})")
                log(f"stopped {record.name} (pid {record.pid})")
        (self.dir / "stack.partial.json").unlink(missing_ok=True)
        if state is not None:
            state["processes"] = []
            state["stopped_at"] = datetime.now(UTC).isoformat()
            self._write_json(self.state_file, state)
        return stopped

    def stop_component(self, component: str, log=print) -> None:
        """Stop one component (``openbao`` or an Airflow one) with its process tree, as ``down`` would."""
        from airflow_finetune_gov.stack.procs import stop

        if component not in ("openbao", "control-plane") and component not in af.COMPONENTS:
            raise StackError(f"unknown component {component!r}: openbao, control-plane or one of "
                             f"{', '.join(af.COMPONENTS)}")
        state = self.load()
        if state is None or not state.get("processes"):
            raise StackError(f"no stack is running in {self.dir}: `fgov stack up` first")
        name = component if component in ("openbao", "control-plane") else f"airflow-{component}"
        for record in self.records(state):
            if record.name == name and record.alive():
                stop(record)
                log(f"stopped {name} (pid {record.pid})")

    def restart(self, component: str, log=print) -> ProcRecord:
        """Stop one component (``openbao``, or an Airflow one: ``scheduler``, ``triggerer``,
        ``dag-processor``, ``api-server``) if it runs, start it again and wait until it is healthy.
        OpenBao comes back on its storage, unsealed, with its leases. Under the LocalExecutor,
        restarting the scheduler also ends the task processes it runs: what a crashed scheduler does."""
        self.stop_component(component, log=log)
        state = self.load()
        assert state is not None
        if component == "openbao":
            name = "openbao"
            new = openbao.restart(self.dir / "openbao", int(state["openbao"]["addr"].rsplit(":", 1)[1]),
                                  self.logs / "openbao.log", (self.secrets / "openbao-unseal-key").read_text(),
                                  raw_audit_log=Path(raw) if (raw := state["openbao"].get("raw_audit_log")) else None)
        elif component == "control-plane":
            name = "control-plane"
            socket_path = Path(state["control_plane"]["socket"])
            plane = state["control_plane"]
            new = af.start_control_plane(Path(plane.get("home") or state["airflow"]["home"]), self.logs, socket_path,
                                         user=plane.get("user"), groups=plane.get("groups") or ())
            af.wait_control_plane(socket_path, new)
        else:
            name = f"airflow-{component}"
            new = af.start_component(Path(state["airflow"]["home"]), component, self.logs,
                                     dag_home=Path(state["control_plane"]["dag_home"]),
                                     dag_user=state["control_plane"]["task_user"])
            af.wait_healthy(state["airflow"]["url"], [new])
        state["processes"] = [r.to_json() for r in self.records(state) if r.name != name] + [new.to_json()]
        self._write_json(self.state_file, state)
        log(f"started {name} (pid {new.pid})")
        return new

    # --- up --------------------------------------------------------------------------------------
    def up(self, opts: StackOptions) -> dict[str, Any]:
        log = opts.log
        state = self.load()
        records = self.records(state)
        if opts.postgres_url and opts.postgres_port:
            raise StackError("give either --postgres-url (an existing server) or --postgres-port, not both")
        if (state and state.get("processes") and all(r.alive() for r in records)
                and af.components_healthy(state["airflow"]["url"])):
            log(f"stack already running (state in {self.dir})")
            return state
        if any(r.alive() for r in records):
            log("stack partly running: stopping what is left before a clean start")
        if records:
            self.down(log=lambda *_: None)

        policy = load_policy(opts.policy_file)
        # Preflight: everything that can fail before a process starts is checked first.
        external = _parse_postgres_url(opts.postgres_url) if opts.postgres_url else None
        pg_bin = postgres.bin_dir() if external is None else f"external {external['host']}:{external['port']}"
        bao_bin = openbao.binary()
        af.airflow_bin()
        if not opts.dags_folder.is_dir():
            raise StackError(f"DAGs folder {opts.dags_folder} does not exist: run from the project root or "
                             "pass --dags-folder")
        taken: set[int] = set()
        ports: dict[str, int] = {}
        for name, explicit, env in (("postgres", opts.postgres_port, "FGOV_POSTGRES_PORT"),
                                    ("openbao", opts.openbao_port, "FGOV_OPENBAO_PORT"),
                                    ("airflow", opts.airflow_port, "FGOV_AIRFLOW_PORT")):
            wanted = _default_port(env, explicit)
            if wanted is not None:
                # OpenBao's cluster listener (its integrated storage) takes the next port up
                for port in (wanted, wanted + 1) if name == "openbao" else (wanted,):
                    if not port_free(port) or tcp_open(port):
                        raise StackError(f"port {port} for {name} is already in use on 127.0.0.1: free it, or "
                                         f"choose another with --{name}-port (or {env}); nothing was started")
                ports[name] = wanted
                taken.update({wanted, wanted + 1} if name == "openbao" else {wanted})
        if external is not None:
            ports["postgres"] = external["port"]
        for name in ("postgres", "openbao", "airflow"):
            while name not in ports:
                port = pick_free_port(taken)
                taken.add(port)
                if name != "openbao" or (port + 1 not in taken and port_free(port + 1)):
                    ports[name] = port
                    taken.add(port + 1)
        log(f"binaries: postgres {pg_bin}, bao {bao_bin}; ports {ports}")

        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        started: list[ProcRecord] = []
        t0 = time.monotonic()
        try:
            state = self._start(opts, policy, ports, started, external)
        except BaseException:
            log("start-up failed: stopping everything this attempt started")
            for record in reversed(started):
                if record.name == "postgres":
                    postgres.shutdown(record)
                else:
                    from airflow_finetune_gov.stack.procs import stop

                    stop(record)
            raise
        state["cold_start_seconds"] = round(time.monotonic() - t0, 1)
        self._write_json(self.state_file, state)
        (self.dir / "stack.partial.json").unlink(missing_ok=True)
        log(f"stack up in {state['cold_start_seconds']}s: Airflow {state['airflow']['url']}")
        return state

    def _start(self, opts: StackOptions, policy, ports: dict[str, int], started: list[ProcRecord],
               external: dict[str, Any] | None) -> dict[str, Any]:
        log = opts.log
        if external is None:
            su_user, su_pw, pg_host = "postgres", self._secret("postgres-superuser"), "127.0.0.1"
        else:
            su_user, su_pw, pg_host = external["user"], external["password"], external["host"]
        role_pw = {role: self._secret(f"pg-{role}") for role in provision.LOGIN_ROLES}
        key_path = self.secrets / "workload-identity.pem"
        pubkey = _ensure_signing_key(key_path)

        # PostgreSQL
        pgdata = self.dir / "postgres" / "data"
        if external is None:
            postgres.initdb(pgdata, su_pw)
            started.append(postgres.start(pgdata, ports["postgres"], self.logs / "postgres.log"))
            self._write_partial(ports, started)
            log(f"postgres ready on 127.0.0.1:{ports['postgres']}")
        else:
            log(f"using the existing PostgreSQL at {pg_host}:{ports['postgres']}")
        try:
            provision.provision(pg_host, ports["postgres"], su_pw, role_pw, policy, superuser=su_user)
        except Exception as exc:  # psycopg errors name host, role and cause
            raise StackError(f"provisioning PostgreSQL at {pg_host}:{ports['postgres']} as {su_user} failed: "
                             f"{exc}".strip()) from exc
        log("postgres provisioned: roles, databases, demo datasets, lineage schema")

        # OpenBao
        bao_record, root_token, unseal_key = openbao.start(self.dir / "openbao", ports["openbao"],
                                                           self.logs / "openbao.log", raw_audit_log=opts.raw_audit_log)
        started.append(bao_record)
        self._write_partial(ports, started)
        self._write_secret_file("openbao-root-token", root_token)
        self._write_secret_file("openbao-unseal-key", unseal_key)
        bao_addr = f"http://127.0.0.1:{ports['openbao']}"
        client = hvac.Client(url=bao_addr, token=root_token)
        summary = bootstrap(client, BootstrapSpec(
            db_connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg_host}:{ports['postgres']}/postgres",
            db_username="fgov_vault", db_password=role_pw["fgov_vault"],
            datasets=[DatasetGrant(name, provision.group_role(name)) for name in policy.datasets],
            service_roles=provision.SERVICE_GROUPS,
            jwt_public_key_pem=pubkey,
            default_ttl=f"{policy.lease['default_ttl_minutes']}m",
            max_ttl=f"{policy.lease['max_ttl_minutes']}m",
        ))
        provenance_keys = self.dir / "provenance-keys.json"
        self._write_json(provenance_keys, {"keys": summary.pop("provenance_public_keys")})
        model_signing_pem = self.dir / "model-signing.pub.pem"  # for `model_signing verify key`
        model_signing_pem.write_text(summary.pop("model_signing_public_key"))
        model_signing_pem.chmod(0o644)
        log(f"openbao ready at {bao_addr}: {summary}")

        # The DAG user: parses DAG files, runs triggers and tasks; reads none of the above
        dag_user = users.ensure_task_user()
        # The control plane's user: holds its key, its configuration and the model store, none of which the
        # DAG user can read or write
        control_user = users.ensure_control_user(dag_user)
        users.make_interpreter_reachable(log)
        users.check_runs_python(dag_user)
        users.check_runs_python(control_user)
        if opts.policy_file:
            users.check_reads(control_user, Path(opts.policy_file), "the policy file")
        (self.dir / "openbao").chmod(0o700)  # its data and audit logs are the deployment's
        home = self.dir / "airflow"
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        dag_home = users.own(self.dir / "airflow-dag", dag_user, 0o700)
        task_logs = users.own(self.dir / "airflow-logs", dag_user, 0o755)
        # The model store is written by the control plane only (a task hands its files over through it) and read
        # by everyone; a state directory from an earlier version had left it to the DAG user
        model_store = users.own_tree(self.dir / "models", control_user, 0o755)
        control_home = users.own(self.dir / "control-plane", control_user, 0o700)
        control_key = control_home / "workload-identity.pem"
        shutil.copyfile(key_path, control_key)
        os.chown(control_key, control_user.pw_uid, control_user.pw_gid)
        control_key.chmod(0o600)
        openlineage_file = self.logs / "openlineage.jsonl"
        openlineage_file.touch()
        os.chown(openlineage_file, dag_user.pw_uid, dag_user.pw_gid)
        provenance_keys.chmod(0o644)  # public keys: tasks verify signatures with them
        control_socket = users.own(self.dir / "control", control_user, 0o755) / "control.sock"

        # Airflow
        airflow_url = f"http://127.0.0.1:{ports['airflow']}"
        passwords_file = self.secrets / "airflow-passwords.json"
        if not passwords_file.exists():
            self._write_json(passwords_file, {})
        passwords = json.loads(passwords_file.read_text())
        if set(passwords) != set(people.USERS):  # a state directory of an earlier version lacks some users
            passwords = {u: passwords.get(u) or secrets.token_urlsafe(16) for u in people.USERS}
            self._write_json(passwords_file, passwords)
        pg = (pg_host, ports["postgres"])
        airflow_db = provision.url("airflow", role_pw["airflow"], *pg, "airflow")
        # the DAG user's login to the same database: every table but the auth manager's (users, password hashes,
        # roles, permissions, sessions), which DAG code could otherwise rewrite to make itself an approver
        dag_airflow_db = provision.url(provision.DAG_METADATA_ROLE, role_pw[provision.DAG_METADATA_ROLE], *pg,
                                       "airflow")
        governance_url = provision.url("fgov_lineage", role_pw["fgov_lineage"], *pg, provision.GOVERNANCE_DB)
        monitor_url = provision.url("fgov_monitor", role_pw["fgov_monitor"], *pg, "postgres")
        fgov_conf = {
            "governance_db_url": governance_url,
            "datasets_monitor_url": monitor_url,
            "datasets_host": f"{pg_host}:{ports['postgres']}",
            "datasets_database": provision.DATASETS_DB,
            "vault_conn_id": "vault_default",
            "workload_identity_key_path": str(key_path),
            "workload_identity_issuer": CONFIG_OPTIONS["workload_identity_issuer"]["default"],
            "workload_identity_audience": CONFIG_OPTIONS["workload_identity_audience"]["default"],
            "jwt_auth_mount": "fgov-jwt",
            "database_mount": "fgov-database",
            "handover_mount": summary["handover_mount"],
            "backends_mount": summary["backends_mount"],
            "transit_mount": summary["transit_mount"],
            "provenance_key": summary["provenance_key"],
            "model_signing_key": summary["model_signing_key"],
            "provenance_keys_path": str(provenance_keys),
            "policy_file": opts.policy_file or "",
            "model_store": str(model_store),
            "lineage_url_template": airflow_url + "/dags/{dag_id}/runs/{run_id}",
            "control_plane_socket": str(control_socket),
            "task_user": dag_user.pw_name,
            "task_airflow_home": str(dag_home),
        }
        core = {
            "dags_folder": str(opts.dags_folder.resolve()),
            "load_examples": "False",
            "executor": "airflow_finetune_gov.executors.TaskUserLocalExecutor",
            "parallelism": "8",
            "dags_are_paused_at_creation": "False",
            "fernet_key": self._secret("airflow-fernet-key", _fernet_key),
            "execution_api_server_url": f"{airflow_url}/execution/",
        }
        shared = {
            "logging": {"base_log_folder": str(task_logs)},
            "dag_processor": {"refresh_interval": "30"},
            # OpenLineage events (with the fgovGovernance facet) to a file next to the other logs
            "openlineage": {"namespace": "fgov", "transport": json.dumps(
                {"type": "file", "log_file_path": str(openlineage_file), "append": True})},
        }
        # The deployment's own components (api-server, scheduler, control plane): every secret
        af.write_config(home, {
            "core": {
                **core,
                "auth_manager": af.AUTH_MANAGER,
            },
            "fab": {"cache_ttl": "5"},  # a membership ops change counts in Airflow within seconds
            "database": {"sql_alchemy_conn": airflow_db, "sql_alchemy_conn_async": airflow_db},
            "api": {"host": "127.0.0.1", "port": str(ports["airflow"]), "base_url": airflow_url, "workers": "1"},
            "api_auth": {"jwt_secret": self._secret("airflow-jwt-secret")},
            "scheduler": {"task_queued_timeout": "600"},
            "finetune_gov": fgov_conf,
            **shared,
        })
        # The DAG user's (dag-processor, triggerer, tasks): Airflow's metadata database and fernet key, which
        # Airflow gives DAG code by design, and nothing that signs a token or reaches governance but the socket.
        dag_conf = {k: fgov_conf[k] for k in af.DAG_USER_SETTINGS if k in fgov_conf}
        af.write_config(dag_home, {
            "core": core,  # no auth manager: the dag-processor then syncs no DAG's access_control into roles
            "database": {"sql_alchemy_conn": dag_airflow_db, "sql_alchemy_conn_async": dag_airflow_db},
            "finetune_gov": dag_conf,
            **shared,
        }, owner=dag_user)
        # The control plane's: what it needs of the deployment's configuration (the metadata database for
        # Airflow's connections and the sweep's run states, the governance writer, its own copy of the key), and
        # not Airflow's token-signing secret
        af.write_config(control_home, {
            "core": {**core, "auth_manager": af.AUTH_MANAGER},  # it reads the roles (never signs a token)
            "database": {"sql_alchemy_conn": airflow_db, "sql_alchemy_conn_async": airflow_db},
            "api": {"base_url": airflow_url},  # the links in notifications
            "finetune_gov": {**fgov_conf, "workload_identity_key_path": str(control_key),
                             # notifications: their channels' credentials are the control plane's alone
                             "notify_smtp_url": opts.notify_smtp_url, "notify_webhook_url": opts.notify_webhook_url,
                             "notify_from": "airflow-finetune-gov@localhost",
                             "notify_address_template": opts.notify_address_template, "notify_poll_seconds": "2",
                             "teams_sync_seconds": "2"},
            **shared,
        }, owner=control_user)
        control_groups = [dag_user.pw_gid]
        t = time.monotonic()
        af.migrate(home)
        people.sync(home, passwords, af.env_for(home))
        provision.grant_dag_metadata(pg_host, ports["postgres"], role_pw["airflow"])
        af.add_vault_connection(home, ports["openbao"], "fgov-jwt")
        log(f"airflow metadata database migrated, its users, roles and the DAG user's login set in "
            f"{time.monotonic() - t:.1f}s")
        started.append(af.start_control_plane(control_home, self.logs, control_socket, user=control_user.pw_name,
                                              groups=control_groups))
        self._write_partial(ports, started)
        af.wait_control_plane(control_socket, started[-1])
        log(f"control plane listening on {control_socket}")
        for comp in af.COMPONENTS:
            started.append(af.start_component(home, comp, self.logs, dag_home=dag_home, dag_user=dag_user.pw_name))
        self._write_partial(ports, started)
        af.wait_healthy(airflow_url, started)
        log(f"airflow healthy at {airflow_url}")

        return {
            "state_dir": str(self.dir),
            "started_at": datetime.now(UTC).isoformat(),
            "postgres": {"host": pg_host, "port": ports["postgres"], "managed": external is None,
                         "data": str(pgdata) if external is None else None,
                         "superuser_password_file": str(self.secrets / "postgres-superuser")
                         if external is None else None,
                         "databases": ["airflow", provision.GOVERNANCE_DB, provision.DATASETS_DB]},
            "openbao": {"addr": bao_addr, "root_token_file": str(self.secrets / "openbao-root-token"),
                        "raw_audit_log": str(opts.raw_audit_log) if opts.raw_audit_log else None,
                        "audit_log": str(self.dir / "openbao" / "audit.log"),
                        "jwt_mount": summary["jwt_mount"], "database_mount": summary["database_mount"]},
            "control_plane": {"socket": str(control_socket), "task_user": dag_user.pw_name,
                              "home": str(control_home), "user": control_user.pw_name, "groups": control_groups,
                              "task_uid": dag_user.pw_uid, "dag_home": str(dag_home)},
            "airflow": {"url": airflow_url, "home": str(home), "config": str(home / "airflow.cfg"),
                        "dag_home": str(dag_home), "logs": str(task_logs),
                        "users": {u: {"roles": r} for u, r in people.USERS.items()},
                        "passwords_file": str(passwords_file)},
            "governance_db_url_file": str(self._write_secret_file("governance-db-url", governance_url)),
            "workload_identity_key": str(key_path),
            "model_store": fgov_conf["model_store"],
            "provenance_keys": str(provenance_keys),
            "model_signing_public_key": str(model_signing_pem),
            "processes": [r.to_json() for r in started],
        }

    def _write_secret_file(self, name: str, value: str) -> Path:
        self.secrets.mkdir(parents=True, exist_ok=True)
        self.secrets.chmod(0o700)
        path = self.secrets / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        return path

    def _write_partial(self, ports: dict[str, int], started: list[ProcRecord]) -> None:
        # Recorded as soon as each process starts, so `fgov stack down` can stop a start-up that
        # was itself killed half-way.
        self._write_json(self.dir / "stack.partial.json",
                         {"ports": ports, "processes": [r.to_json() for r in started]})

    # --- helpers for tests and the demo -----------------------------------------------------------
    def airflow_password(self, user: str) -> str:
        state = self.load()
        if state is None:
            raise StackError("the stack is not up: run `fgov stack up`")
        return json.loads(Path(state["airflow"]["passwords_file"]).read_text())[user]

    def token(self, user: str) -> str:
        state = self.load()
        assert state is not None
        resp = requests.post(f"{state['airflow']['url']}/auth/token",
                             json={"username": user, "password": self.airflow_password(user)}, timeout=30)
        if resp.status_code not in (200, 201):
            raise StackError(f"login as {user} failed: HTTP {resp.status_code} {resp.text[:200]}")
        return resp.json()["access_token"]


def _parse_postgres_url(url: str) -> dict[str, Any]:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    if parsed.scheme.split("+")[0] not in ("postgresql", "postgres") or not parsed.hostname:
        raise StackError(f"--postgres-url must look like postgresql://USER:PASSWORD@HOST:PORT/postgres, got "
                         f"scheme {parsed.scheme!r}")
    if not parsed.username or parsed.password is None:
        raise StackError("--postgres-url needs a user allowed to create roles and databases, with its password")
    return {"host": parsed.hostname, "port": parsed.port or 5432, "user": unquote(parsed.username),
            "password": unquote(parsed.password)}


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _ensure_signing_key(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return loaded.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
