#!/usr/bin/env bash
# One-shot set-up of the compose stack, run by the `bootstrap` service once PostgreSQL and OpenBao
# are healthy: what `fgov stack up` does between starting them and starting Airflow.
#   1. PostgreSQL roles, databases, demo datasets and the lineage schema (stack.provision);
#   2. the workload-identity key pair in /keys, generated only when missing;
#   3. OpenBao: database secrets engine, JWT auth, policies and roles (`fgov vault bootstrap`);
#   4. the Airflow metadata database (`airflow db migrate`) and the `vault_default` connection.
# Idempotent. OpenBao runs in dev mode and keeps its configuration in memory, so after OpenBao
# restarts, run this again: docker compose up bootstrap
set -euo pipefail

log() { echo "[bootstrap] $*"; }

required=(FGOV_POSTGRES_PASSWORD FGOV_PG_AIRFLOW_PASSWORD FGOV_PG_OWNER_PASSWORD FGOV_PG_LINEAGE_PASSWORD
          FGOV_PG_VAULT_PASSWORD FGOV_PG_MONITOR_PASSWORD VAULT_TOKEN FGOV_VAULT_DB_PASSWORD)
for var in "${required[@]}"; do
  if [ -z "${!var:-}" ]; then
    echo "[bootstrap] $var is not set: see docker/.env.example" >&2
    exit 2
  fi
done

export FGOV_PG_HOST="${FGOV_PG_HOST:-postgres}"
export FGOV_PG_PORT="${FGOV_PG_PORT:-5432}"
export FGOV_KEY_FILE="${AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_PATH:-/keys/workload-identity.pem}"
export FGOV_PUBLIC_KEY_FILE="${FGOV_KEY_FILE%.pem}.pub"
# One policy for provisioning, OpenBao and the DAGs: Airflow's [finetune_gov] policy_file, or the
# packaged default when it is empty.
export FGOV_POLICY_FILE="${AIRFLOW__FINETUNE_GOV__POLICY_FILE:-}"
openbao_host="${FGOV_OPENBAO_HOST:-openbao}"
openbao_port="${FGOV_OPENBAO_PORT:-8200}"
jwt_mount="${AIRFLOW__FINETUNE_GOV__JWT_AUTH_MOUNT:-fgov-jwt}"
conn_id="${AIRFLOW__FINETUNE_GOV__VAULT_CONN_ID:-vault_default}"

log "1/4 PostgreSQL at $FGOV_PG_HOST:$FGOV_PG_PORT: roles, databases, demo datasets, lineage schema"
python - <<'PY'
import os

from airflow_finetune_gov.policy.engine import load_policy
from airflow_finetune_gov.stack import provision

# One variable per login role: airflow -> FGOV_PG_AIRFLOW_PASSWORD, fgov_owner -> FGOV_PG_OWNER_PASSWORD, ...
passwords = {}
for role in provision.LOGIN_ROLES:
    var = f"FGOV_PG_{role.removeprefix('fgov_').upper()}_PASSWORD"
    if not os.environ.get(var):
        raise SystemExit(f"[bootstrap] {var} (password of the PostgreSQL role {role}) is not set")
    passwords[role] = os.environ[var]
provision.provision(os.environ["FGOV_PG_HOST"], int(os.environ["FGOV_PG_PORT"]),
                    os.environ["FGOV_POSTGRES_PASSWORD"], passwords,
                    load_policy(os.environ["FGOV_POLICY_FILE"] or None))
PY

log "2/4 workload-identity key pair: $FGOV_KEY_FILE, $FGOV_PUBLIC_KEY_FILE"
python - <<'PY'
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

key_path = Path(os.environ["FGOV_KEY_FILE"])
if key_path.exists():
    print(f"[bootstrap] keeping the existing key {key_path}")
else:
    # P-256, as the workload-identity JWTs are ES256; the private key is readable by its owner only.
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    print(f"[bootstrap] generated {key_path}")
# The public key is always derived again, so it matches the private key OpenBao will be told about.
key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
Path(os.environ["FGOV_PUBLIC_KEY_FILE"]).write_bytes(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
PY

log "3/4 OpenBao at $openbao_host:$openbao_port: database secrets engine, JWT auth, policies, roles"
# VAULT_TOKEN (the dev root token) and FGOV_VAULT_DB_PASSWORD come from the environment, never argv.
policy_args=()
if [ -n "$FGOV_POLICY_FILE" ]; then
  policy_args=(--policy-file "$FGOV_POLICY_FILE")
fi
fgov vault bootstrap \
  --addr "http://${openbao_host}:${openbao_port}" \
  --db-connection-url "postgresql://{{username}}:{{password}}@${FGOV_PG_HOST}:${FGOV_PG_PORT}/postgres" \
  --db-username fgov_vault \
  --jwt-public-key "$FGOV_PUBLIC_KEY_FILE" \
  --provenance-keys-out /keys/provenance-keys.json \
  "${policy_args[@]}"

log "4/4 Airflow metadata database and the $conn_id connection"
airflow db migrate
airflow connections delete "$conn_id" > /dev/null 2>&1 || true
airflow connections add "$conn_id" \
  --conn-type vault \
  --conn-host "$openbao_host" \
  --conn-port "$openbao_port" \
  --conn-extra "{\"auth_type\": \"jwt\", \"auth_mount_point\": \"${jwt_mount}\", \"use_tls\": false}"

log "done"
