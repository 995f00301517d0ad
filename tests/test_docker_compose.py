"""The compose stack (docker-compose.yaml, docker/) mirrors the embedded one; checked without Docker.

The file is read with ``yaml.safe_load`` (which resolves the ``x-airflow-common`` merge keys), so every
check sees what compose itself would see, before variable interpolation.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_finetune_gov.provider_info import CONFIG_OPTIONS
from airflow_finetune_gov.stack import openbao
from airflow_finetune_gov.stack.people import USERS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile.airflow"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"

AIRFLOW_COMPONENTS = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
AIRFLOW_SERVICES = ("bootstrap", *AIRFLOW_COMPONENTS)
ALL_SERVICES = ("postgres", "openbao", *AIRFLOW_SERVICES)
FGOV_PREFIX = "AIRFLOW__FINETUNE_GOV__"

# A whole value that is one compose variable, required (`:?`) or plain: never one with a default.
SECRET_REFERENCE = re.compile(r"^\$\{[A-Z][A-Z0-9_]*(?::?\?[^}]*)?\}$")
# Any variable reference; group 1 is its name.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
# user:password@ in a URL; group 1 is the password.
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@\s]+)@")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|FERNET_KEY")


# --- helpers ------------------------------------------------------------------------------------------
def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whether written as a mapping or as KEY=VALUE items."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list):
        return " ".join(str(part) for part in test)
    return str(test or "")


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from the short (source:target[:mode]) or the long syntax."""
    mounts: dict[str, tuple[str, bool]] = {}
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            mounts[item["target"]] = (str(item.get("source", "")), bool(item.get("read_only")))
        else:
            parts = str(item).split(":")
            mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return mounts


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def project_dirs(instructions: list[tuple[str, str]]) -> set[str]:
    """Directories the Dockerfile copies the project into: pyproject.toml and the package both."""
    with_pyproject: set[str] = set()
    with_package: set[str] = set()
    for keyword, args in instructions:
        if keyword not in {"COPY", "ADD"}:
            continue
        *sources, dest = [part for part in args.split() if not part.startswith("--")]
        dest = dest.rstrip("/")
        sources = [source.rstrip("/") for source in sources]
        if "." in sources:
            with_pyproject.add(dest)
            with_package.add(dest)
        if "pyproject.toml" in sources:
            with_pyproject.add(dest)
        if "airflow_finetune_gov" in sources and dest.endswith("/airflow_finetune_gov"):
            with_package.add(dest.rsplit("/", 1)[0])
    return with_pyproject & with_package


def strings_in(node: Any) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*strings_in(key), *strings_in(value))]
    if isinstance(node, list):
        return [text for item in node for text in strings_in(item)]
    return [node] if isinstance(node, str) else []


def is_truthy(value: str) -> bool:
    return value.strip().strip("\"'").lower() in {"true", "1", "yes", "on", "t", "y"}


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yaml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yaml has no services"
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


# --- services and images ------------------------------------------------------------------------------
def test_every_service_of_the_stack_is_defined(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in ALL_SERVICES if name not in services]
    assert not missing, f"services missing from docker-compose.yaml: {missing}"


def test_postgres_is_the_official_image_major_18(services: dict[str, dict[str, Any]]) -> None:
    image = services["postgres"].get("image", "")
    assert re.fullmatch(r"(?:docker\.io/)?(?:library/)?postgres:18(?:\.\d+)*(?:-[a-z0-9]+)?", image), image


def test_openbao_is_the_official_image_2_7(services: dict[str, dict[str, Any]]) -> None:
    image = services["openbao"].get("image", "")
    assert re.fullmatch(r"(?:(?:docker\.io|quay\.io|ghcr\.io)/)?openbao/openbao:2\.7\.\d+", image), image


def test_dockerfile_builds_on_the_official_airflow_3_3_image(dockerfile: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for keyword, args in dockerfile if keyword == "FROM"]
    assert bases, "docker/Dockerfile.airflow has no FROM"
    # The last stage is the image compose runs.
    assert re.fullmatch(r"apache/airflow:3\.3\.\d+(?:-python3\.\d+)?", bases[-1]), bases[-1]


def test_airflow_services_are_built_from_the_project_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in AIRFLOW_SERVICES:
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name} is not built from docker/Dockerfile.airflow"
        context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, f"{name} builds {build}"
        images.add(services[name].get("image"))
    assert len(images) == 1, f"the Airflow services should share one image, not {images}"


def test_dockerfile_installs_the_project(dockerfile: list[tuple[str, str]]) -> None:
    homes = project_dirs(dockerfile)
    assert homes, "the Dockerfile copies no directory with both pyproject.toml and airflow_finetune_gov/"
    installs = [shlex.split(args) for keyword, args in dockerfile
                if keyword == "RUN" and re.search(r"\b(?:pip|uv pip) install\b", args)]
    assert any(arg.rstrip("/") in homes for argv in installs for arg in argv), (
        f"no RUN pip install of the copied project ({sorted(homes)}): {installs}")


# --- health and start order ---------------------------------------------------------------------------
@pytest.mark.parametrize(("service", "probe"), [
    ("postgres", "pg_isready"),
    ("openbao", "/v1/sys/health"),
    ("airflow-api-server", "/api/v2/monitor/health"),
])
def test_healthchecks(services: dict[str, dict[str, Any]], service: str, probe: str) -> None:
    assert probe in healthcheck_command(services[service]), f"{service} healthcheck does not use {probe}"


def test_bootstrap_waits_for_healthy_postgres_and_openbao(services: dict[str, dict[str, Any]]) -> None:
    depends = services["bootstrap"].get("depends_on")
    assert isinstance(depends, dict), "bootstrap depends_on must name conditions"
    for dependency in ("postgres", "openbao"):
        assert (depends.get(dependency) or {}).get("condition") == "service_healthy", (
            f"bootstrap must wait for {dependency} to be healthy: {depends}")


def test_bootstrap_runs_once(services: dict[str, dict[str, Any]]) -> None:
    assert str(services["bootstrap"].get("restart")) == "no"


@pytest.mark.parametrize("component", AIRFLOW_COMPONENTS)
def test_airflow_components_start_after_a_successful_bootstrap(
        services: dict[str, dict[str, Any]], component: str) -> None:
    depends = services[component].get("depends_on")
    assert isinstance(depends, dict), f"{component} depends_on must name conditions"
    assert (depends.get("bootstrap") or {}).get("condition") == "service_completed_successfully", depends


def test_bootstrap_script_runs_every_set_up_step(services: dict[str, dict[str, Any]],
                                                 dockerfile: list[tuple[str, str]]) -> None:
    command = services["bootstrap"].get("command")
    argv = command if isinstance(command, list) else shlex.split(str(command))
    scripts = [arg for arg in argv if arg.startswith("/opt/") and arg.endswith((".sh", ".py"))]
    assert scripts, f"bootstrap runs no script: {argv}"
    in_image = scripts[0]
    copies = {args.split()[-1]: args.split()[-2] for keyword, args in dockerfile if keyword == "COPY"}
    assert in_image in copies, f"the Dockerfile does not copy {in_image}"
    script = (ROOT / copies[in_image]).read_text()
    for step in ("provision.provision(", "fgov vault bootstrap", "--jwt-public-key", "airflow db migrate",
                 "airflow connections add", "--conn-type vault", "auth_type", "auth_mount_point", "use_tls"):
        assert step in script, f"{copies[in_image]} does not run {step!r}"


# --- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", AIRFLOW_SERVICES)
def test_simple_auth_manager_with_real_roles(services: dict[str, dict[str, Any]], service: str) -> None:
    env = env_of(services[service])
    assert env.get("AIRFLOW__CORE__AUTH_MANAGER", "").endswith("SimpleAuthManager"), service
    assert not is_truthy(env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")), (
        f"{service}: all-admins mode records every approver as Anonymous")
    pairs = [item.split(":") for item in env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "").split(",")]
    users = {pair[0].strip(): pair[1].strip() for pair in pairs if len(pair) >= 2}
    assert {"requester", "approver1", "approver2", "auditor"} <= users.keys(), users
    # the compose sketch keeps the simple auth manager (no roles, no teams): its users are some of the stack's
    assert set(users) <= set(USERS), f"{service}: users not among the embedded stack's {sorted(USERS)}"


@pytest.mark.parametrize("service", AIRFLOW_SERVICES)
def test_airflow_runs_the_local_executor_without_examples(services: dict[str, dict[str, Any]],
                                                          service: str) -> None:
    env = env_of(services[service])
    assert env.get("AIRFLOW__CORE__EXECUTOR") == "LocalExecutor"
    assert not is_truthy(env.get("AIRFLOW__CORE__LOAD_EXAMPLES", "True"))
    assert env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL") == "http://airflow-api-server:8080/execution/"
    assert "@postgres:5432/airflow" in env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")


def test_airflow_services_share_the_signing_secrets(services: dict[str, dict[str, Any]]) -> None:
    # Tokens issued by the api-server must verify in every component, and connections must decrypt.
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY"):
        values = {env_of(services[name]).get(key) for name in AIRFLOW_SERVICES}
        assert len(values) == 1 and None not in values, f"{key} differs between Airflow services: {values}"


@pytest.mark.parametrize("service", AIRFLOW_SERVICES)
def test_finetune_gov_env_names_real_options(services: dict[str, dict[str, Any]], service: str) -> None:
    keys = {name.removeprefix(FGOV_PREFIX).lower()
            for name in env_of(services[service]) if name.startswith(FGOV_PREFIX)}
    unknown = keys - CONFIG_OPTIONS.keys()
    assert not unknown, f"{service}: {sorted(unknown)} are not [finetune_gov] options"
    needed = {"governance_db_url", "datasets_monitor_url", "datasets_host", "datasets_database",
              "vault_conn_id", "workload_identity_key_path", "jwt_auth_mount", "database_mount", "model_store"}
    assert needed <= keys, f"{service} lacks {sorted(needed - keys)}"


def test_finetune_gov_paths_are_on_mounted_volumes(services: dict[str, dict[str, Any]]) -> None:
    # Tasks run in the scheduler (LocalExecutor): the signing key and the model store must be there.
    scheduler = services["airflow-scheduler"]
    env, mounts = env_of(scheduler), volume_mounts(scheduler)
    for option in ("workload_identity_key_path", "model_store"):
        path = env[FGOV_PREFIX + option.upper()]
        assert any(path == target or path.startswith(target.rstrip("/") + "/") for target in mounts), (
            f"{option}={path} is on no volume of the scheduler ({sorted(mounts)})")
    key_dir = str(Path(env[FGOV_PREFIX + "WORKLOAD_IDENTITY_KEY_PATH"]).parent)
    written = volume_mounts(services["bootstrap"]).get(key_dir, ("bootstrap: none", False))[0]
    assert written == mounts.get(key_dir, ("scheduler: none", True))[0], (
        "the bootstrap must write the key pair to the volume the scheduler reads")
    assert mounts.get("/opt/airflow/dags", ("", False))[0] == "./dags", "./dags is not the DAGs folder"


def test_vault_connection_matches_the_provider_config(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["airflow-scheduler"])
    assert env[FGOV_PREFIX + "VAULT_CONN_ID"] == "vault_default"
    assert env[FGOV_PREFIX + "JWT_AUTH_MOUNT"] == "fgov-jwt"
    assert env[FGOV_PREFIX + "DATABASE_MOUNT"] == "fgov-database"


def test_openbao_audit_config_matches_the_embedded_stack(services: dict[str, dict[str, Any]],
                                                         tmp_path: Path) -> None:
    bao = services["openbao"]
    command = bao.get("command")
    argv = command if isinstance(command, list) else shlex.split(str(command))
    assert "-dev" in argv and "-dev-listen-address=0.0.0.0:8200" in argv, argv
    configs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("-config=")]
    assert configs, "openbao is started without the audit config file"
    assert configs[0] in volume_mounts(bao), f"{configs[0]} is not mounted into openbao"
    source, read_only = volume_mounts(bao)[configs[0]]
    assert read_only, "the OpenBao config file should be mounted read-only"
    audit_log = next(line.split("=", 1)[1].strip().strip('"') for line in (ROOT / source).read_text().splitlines()
                     if line.strip().startswith("file_path"))
    assert any(audit_log.startswith(target.rstrip("/") + "/") for target in volume_mounts(bao)), (
        f"the audit log {audit_log} is on no volume")
    ours = [line for line in (ROOT / source).read_text().splitlines() if not line.startswith("#")]
    expected = openbao.audit_config(Path(audit_log)).splitlines()
    assert ours == expected, "docker/openbao config differs from openbao.audit_config"
    assert "BAO_DEV_ROOT_TOKEN_ID" in env_of(bao)


def test_postgres_data_is_on_the_postgres_18_volume_path(services: dict[str, dict[str, Any]]) -> None:
    # The 18 images keep PGDATA in /var/lib/postgresql/18/docker; a volume on .../data is not used.
    assert "/var/lib/postgresql" in volume_mounts(services["postgres"])


# --- secrets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", ALL_SERVICES)
def test_no_literal_secrets(services: dict[str, dict[str, Any]], service: str) -> None:
    for name, value in env_of(services[service]).items():
        if SECRET_NAME.search(name) and not name.endswith("_FILE"):
            assert SECRET_REFERENCE.fullmatch(value), f"{service}: {name} must be a required ${{VAR}}, not {value!r}"
        for password in URL_PASSWORD.findall(value):
            assert SECRET_REFERENCE.fullmatch(password), f"{service}: {name} has a literal password in its URL"


def test_no_literal_password_anywhere_in_the_compose_file() -> None:
    passwords = URL_PASSWORD.findall(COMPOSE_FILE.read_text())
    assert passwords, "found no user:password@ URL at all: the check would see nothing"
    for password in passwords:
        assert SECRET_REFERENCE.fullmatch(password), f"literal password in a URL: {password!r}"


def test_root_secrets_stay_out_of_the_long_running_airflow_services(services: dict[str, dict[str, Any]]) -> None:
    for name in AIRFLOW_COMPONENTS:
        env_text = " ".join(env_of(services[name]).values())
        for root_secret in ("FGOV_OPENBAO_ROOT_TOKEN", "FGOV_POSTGRES_PASSWORD", "FGOV_PG_OWNER_PASSWORD",
                            "FGOV_PG_VAULT_PASSWORD"):
            assert root_secret not in env_text, f"{name} gets {root_secret}"


def test_every_variable_is_documented_in_the_env_example(compose: dict[str, Any]) -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    used = {name for text in strings_in(compose) for name in VARIABLE.findall(text)}
    assert used, "docker-compose.yaml uses no variables"
    assert used <= documented, f"not in docker/.env.example: {sorted(used - documented)}"


def test_env_example_holds_no_secret_values() -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match and SECRET_NAME.search(match[1]):
            assert match[2] == "", f"docker/.env.example sets {match[1]}: leave secrets empty"
