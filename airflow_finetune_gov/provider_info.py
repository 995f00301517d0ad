"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_finetune_gov import __version__

CONFIG_OPTIONS: dict[str, dict[str, Any]] = {
    "governance_db_url": {
        "description": "SQLAlchemy URL of the governance database that holds the lineage record. "
        "The role in it should be allowed to INSERT and SELECT lineage rows, never UPDATE or DELETE.",
        "version_added": "0.1.0",
        "type": "string",
        "example": "postgresql+psycopg://fgov_lineage:***@127.0.0.1:5432/fgov_governance",
        "default": None,
    },
    "datasets_monitor_url": {
        "description": "SQLAlchemy URL of a login role with no privileges on the dataset server. "
        "Used only to prove that a revoked dynamic role and its sessions are gone (pg_roles, "
        "pg_stat_activity are readable by any role).",
        "version_added": "0.1.0",
        "type": "string",
        "example": "postgresql+psycopg://fgov_monitor:***@127.0.0.1:5432/postgres",
        "default": None,
    },
    "datasets_host": {
        "description": "host:port of the PostgreSQL server holding training datasets, as seen by workers.",
        "version_added": "0.1.0",
        "type": "string",
        "example": "127.0.0.1:5432",
        "default": None,
    },
    "datasets_database": {
        "description": "Database that holds the training datasets.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "fgov_datasets",
    },
    "vault_conn_id": {
        "description": "Airflow connection to Vault/OpenBao. Holds the address only: tasks log in with "
        "their own workload-identity JWT, never a static token.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "vault_default",
    },
    "workload_identity_key_path": {
        "description": "PEM file with the EC private key (P-256) that signs per-task workload-identity "
        "JWTs. OpenBao's JWT auth method holds the matching public key.",
        "version_added": "0.1.0",
        "type": "string",
        "example": "/etc/airflow/fgov-workload-identity.pem",
        "default": None,
    },
    "workload_identity_key_secret": {
        "description": "Instead of a key file: the name of an Airflow Variable holding the PEM signing "
        "key, resolved through the configured secrets backends (e.g. Vault KV, AWS Secrets Manager).",
        "version_added": "0.2.0",
        "type": "string",
        "example": "fgov_workload_identity_key",
        "default": "",
    },
    "workload_identity_issuer": {
        "description": "The ``iss`` claim of workload-identity JWTs; must match the JWT auth config.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "airflow-finetune-gov",
    },
    "workload_identity_audience": {
        "description": "The ``aud`` claim of workload-identity JWTs; must be bound by the JWT roles.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "openbao",
    },
    "jwt_auth_mount": {
        "description": "Mount path of the JWT auth method in Vault/OpenBao.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "fgov-jwt",
    },
    "database_mount": {
        "description": "Mount path of the database secrets engine in Vault/OpenBao.",
        "version_added": "0.1.0",
        "type": "string",
        "example": None,
        "default": "fgov-database",
    },
    "handover_mount": {
        "description": "Mount path of the KV v2 engine where the lease task parks the response-wrapped "
        "credentials for the same run's tuning task (templated policies bind each path to one run).",
        "version_added": "0.2.0",
        "type": "string",
        "example": None,
        "default": "fgov-handover",
    },
    "cluster_policy": {
        "description": "enforce: a DAG with a tuning task lacking an upstream approval, a lease setup/"
        "teardown pair, or an evaluation before promotion fails to import (AirflowClusterPolicyViolation); "
        "off: not checked.",
        "version_added": "0.3.0",
        "type": "string",
        "example": "off",
        "default": "enforce",
    },
    "backends_mount": {
        "description": "Mount path of the KV v2 engine holding remote tuning backends' API keys (e.g. the "
        "openai_compatible backend's secret ``openai`` with OPENAI_API_KEY); only the tune roles may read it.",
        "version_added": "0.3.0",
        "type": "string",
        "example": None,
        "default": "fgov-backends",
    },
    "transit_mount": {
        "description": "Mount path of the transit engine whose non-exportable ed25519 key signs the provenance "
        "of every promoted model (only the provenance JWT role may sign).",
        "version_added": "0.4.0",
        "type": "string",
        "example": None,
        "default": "fgov-transit",
    },
    "provenance_key": {
        "description": "Name of the transit key that signs provenance.",
        "version_added": "0.4.0",
        "type": "string",
        "example": None,
        "default": "fgov-provenance",
    },
    "judge_kv_path": {
        "description": "Path in the backends mount of the judge detector's endpoint (BehaviourEvaluationOperator("
        "detector=\"judge\")): fields OPENAI_BASE_URL, OPENAI_API_KEY and MODEL, read by the control plane's "
        "endpoints identity.",
        "version_added": "0.8.0",
        "type": "string",
        "example": None,
        "default": "judge",
    },
    "model_signing_key": {
        "description": "Name of the transit ECDSA P-256 key that signs each promoted version's OpenSSF model-signing "
        "bundle (model.sig, checked with `model_signing verify key`); empty: no bundle is written.",
        "version_added": "0.7.0",
        "type": "string",
        "example": None,
        "default": "fgov-model-signing",
    },
    "provenance_keys_path": {
        "description": "JSON file with the provenance key's public keys ({\"keys\": {keyid: PEM}}), written by "
        "`fgov stack up` or `fgov vault bootstrap --provenance-keys-out`; promotion, rollback and `fgov models "
        "verify` check signatures against it.",
        "version_added": "0.4.0",
        "type": "string",
        "example": "/etc/airflow/fgov-provenance-keys.json",
        "default": None,
    },
    "control_plane_socket": {
        "description": "Unix socket of the governance control plane (`fgov control-plane serve`). Set, the "
        "governed operators hold no key, database password or token of their own: they ask the control "
        "plane, which knows the calling task from the kernel (SO_PEERCRED) and the executor's registration. "
        "Empty: each process uses the settings below itself (only for a deployment where DAG code is trusted).",
        "version_added": "0.7.0",
        "type": "string",
        "example": "/var/run/fgov/control.sock",
        "default": "",
    },
    "task_user": {
        "description": "OS user the provider's executor (airflow_finetune_gov.executors.TaskUserLocalExecutor) "
        "runs every task process as: not the scheduler's, and unable to read the control plane's and Airflow's "
        "secrets. The executor must run as root to switch to it.",
        "version_added": "0.7.0",
        "type": "string",
        "example": "fgov-dag",
        "default": "",
    },
    "task_airflow_home": {
        "description": "AIRFLOW_HOME of task processes (its airflow.cfg holds no secret: no [api_auth] "
        "jwt_secret, no database URL, no governance setting beyond the control plane's socket).",
        "version_added": "0.7.0",
        "type": "string",
        "example": "/opt/airflow-tasks",
        "default": "",
    },
    "vault_timeout_seconds": {
        "description": "Per-request timeout for Vault/OpenBao calls; revocation retries with backoff "
        "on top of it.",
        "version_added": "0.2.0",
        "type": "integer",
        "example": None,
        "default": "10",
    },
    "policy_file": {
        "description": "YAML policy file (risk tiers, approvers, datasets). Empty: the packaged default.",
        "version_added": "0.1.0",
        "type": "string",
        "example": "/etc/airflow/fgov-policy.yaml",
        "default": None,
    },
    "model_store": {
        "description": "Directory of the content-addressed model store (models/<name>/<version>/).",
        "version_added": "0.1.0",
        "type": "string",
        "example": "/var/lib/fgov/models",
        "default": None,
    },
    "max_suite_bytes": {
        "description": "Largest evaluation suite in bytes (a file, checked before it is read, or a body in "
        "evaluation.suites); a larger one is refused before the evaluation starts.",
        "version_added": "0.5.0",
        "type": "integer",
        "example": None,
        "default": "67108864",
    },
    "max_suite_prompts": {
        "description": "Most prompts (rows) in one evaluation suite; a suite with more is refused.",
        "version_added": "0.5.0",
        "type": "integer",
        "example": None,
        "default": "100000",
    },
    "max_prompt_chars": {
        "description": "Most characters in one field of a suite row (prompt, reference, id, ...); a longer "
        "one is refused with its file and line.",
        "version_added": "0.5.0",
        "type": "integer",
        "example": None,
        "default": "32768",
    },
    "lineage_url_template": {
        "description": "Link to a run's lineage shown in approval requests; {dag_id} and {run_id} are filled in.",
        "version_added": "0.1.0",
        "type": "string",
        "example": "http://airflow.example.com/dags/{dag_id}/runs/{run_id}",
        "default": "",
    },
    "notify_smtp_url": {
        "description": "The control plane's SMTP server for approval notifications: "
        "smtp://[user:password@]host[:port][?starttls=true] or smtps://... (empty: no e-mail). Set it in the "
        "control plane's configuration only: DAG code must not read it.",
        "version_added": "0.9.0",
        "type": "string",
        "sensitive": True,
        "example": "smtp://mail.example.com:587?starttls=true",
        "default": "",
    },
    "notify_from": {
        "description": "The sender address of approval notifications (needed with notify_smtp_url).",
        "version_added": "0.9.0",
        "type": "string",
        "example": "airflow-approvals@example.com",
        "default": "",
    },
    "notify_address_template": {
        "description": "A person's e-mail address from their Airflow user name ({user}); a user name that is an "
        "address is used as it is.",
        "version_added": "0.9.0",
        "type": "string",
        "example": "{user}@example.com",
        "default": "{user}@localhost",
    },
    "notify_webhook_url": {
        "description": "A Slack-compatible incoming webhook for approval notifications (empty: none). A secret: "
        "set it in the control plane's configuration only.",
        "version_added": "0.9.0",
        "type": "string",
        "sensitive": True,
        "example": "https://hooks.slack.com/services/T000/B000/XXXX",
        "default": "",
    },
    "notify_remind_before_seconds": {
        "description": "Remind the approvers still asked this long before a request expires (half-way, for a "
        "request with a shorter response_timeout).",
        "version_added": "0.9.0",
        "type": "integer",
        "example": None,
        "default": "3600",
    },
    "notify_poll_seconds": {
        "description": "How often the control plane reads the lineage record for what to notify.",
        "version_added": "0.9.0",
        "type": "float",
        "example": None,
        "default": "5",
    },
    "teams_sync_seconds": {
        "description": "How often the control plane grants each team's airflow_role (FAB auth manager) read and "
                       "edit on the DAGs the policy gives the team, and revokes the rest.",
        "version_added": "0.10.0",
        "type": "float",
        "example": None,
        "default": "5",
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-finetune-gov",
        "name": "Fine-tune governance",
        "description": "Governed LLM fine-tuning: approval gate, dataset-scoped dynamic credentials, "
        "behaviour evaluation and verifiable lineage.",
        "versions": [__version__],
        "plugins": [
            {"name": "finetune_gov", "plugin-class": "airflow_finetune_gov.plugin.FinetuneGovPlugin"},
        ],
        "config": {
            "finetune_gov": {
                "description": "Settings of the airflow-finetune-gov provider.",
                "options": CONFIG_OPTIONS,
            }
        },
    }
