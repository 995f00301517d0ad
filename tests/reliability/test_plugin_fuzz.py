"""The governance view's HTTP API fuzzed from its own OpenAPI schema (schemathesis + Hypothesis) on the
real api-server: the schema is fetched over HTTP from ``/fgov/openapi.json`` and every generated request
goes to the served app (no in-process client).

- Without a valid token (none, the Authorization values schemathesis derives from the security scheme,
  a forged JWT, and a real token whose claims were altered after signing, as a header and as the UI's
  cookie) every request to every operation is refused with 401/403 and the body is Airflow's bare
  refusal: no run, no lineage event.
- With a real token (``auditor``: every operation; ``requester``: the reads only, as a POST would
  trigger a DAG run per example) no generated input gets a 5xx, responses match the schema where it
  documents them, and the auditor's lease-sweep request is always 403.
- Hostile values (NUL, dot segments, percent signs, overlong strings, out-of-range integers) put into
  every parameter of a real run's URLs get no 5xx either.

Generation is derandomized (the same requests every run) and small: under a minute once the stack is up
and the record holds a promoted demo run (else one is run first, about a minute and a half more).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from support import StackView, b64, with_claims

from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack

OPERATIONS = [("GET", "/api/runs"), ("GET", "/api/runs/{dag_id}/{run_id}"),
              ("GET", "/api/runs/{dag_id}/{run_id}/evidence"), ("POST", "/api/lease-sweep"),
              ("GET", "/api/models/{name}"), ("GET", "/ui/"), ("GET", "/ui/models/{name}"),
              ("GET", "/ui/runs/{dag_id}/{run_id}"), ("GET", "/ui/runs/{dag_id}/{run_id}/report/{task_id}")]
READS = [op for op in OPERATIONS if op[0] == "GET"]
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
REFUSALS = ({"detail": "Not authenticated"}, {"detail": "Invalid JWT token"})
NOT_ROUTED = {"detail": "Not Found"}
# Hostile values for every string and integer parameter (NUL cannot be stored in PostgreSQL text).
HOSTILE_TEXT = ["\x00", "a\x00b", ".", "..", "%", "%00", "%2e%2e", "' OR '1'='1' --", "\u202egnp.exe", "\ufeff", "\n",
                "\U0001f600" * 64, "x" * 4096, "../" * 8 + "etc/passwd", "null", "-1"]
HOSTILE_INT = [0, -1, 1001, 2**31, 2**63, -(2**63) - 1, 10**100, "1e3", "0x10", " 1", "1.0", "", "NaN"]


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches under ./.hypothesis by default: keep it out of the checkout."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


@pytest.fixture(scope="module")
def base_url(view: StackView) -> str:
    return view.state["airflow"]["url"] + "/fgov"


@pytest.fixture(scope="module")
def schema(base_url: str) -> Any:
    """The schema as the api-server serves it (FastAPI serves it without a token: it holds no data)."""
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=schemathesis.Config(), timeout=30)


@pytest.fixture(scope="module")
def tokens(view: StackView) -> dict[str, str]:
    return {user: view.client(user).session.headers["Authorization"].removeprefix("Bearer ")
            for user in ("auditor", "requester")}


@pytest.fixture(scope="module")
def run(view: StackView, base_url: str, tokens: dict[str, str]) -> dict[str, Any]:
    """A promoted demo run with an evaluation report, so that there is data to leak and the fuzz reaches
    the pages that render it (one already in the record is reused, else one is run)."""

    def promoted() -> dict[str, Any] | None:
        listed = requests.get(f"{base_url}/api/runs", params={"limit": 1000}, timeout=30,
                              headers={"Authorization": f"Bearer {tokens['auditor']}"})
        assert listed.status_code == 200, listed.text
        for row in listed.json()["runs"]:
            chains = [c for c in row["chains"] if c["evaluation"] and c["evaluation"].get("report")]
            if row["dag_id"] == DEMO_DAG_ID and row["status"] == "promoted" and chains:
                return {"dag_id": row["dag_id"], "run_id": row["run_id"], "name": chains[0]["model"],
                        "task_id": chains[0]["evaluation"]["task_id"], "map_index": chains[0]["map_index"]}
        return None

    found = promoted()
    if found is None:
        _run_id, state, tasks = view.run(DEMO_DAG_ID, dataset="public_faq", target_environment="test")
        assert state == "success", tasks
        found = promoted()
    assert found is not None
    return found


def forged() -> str:
    """A well-formed JWT for an admin, signed with a key the api-server does not have."""
    return ".".join([b64(json.dumps({"alg": "HS512", "typ": "JWT"}).encode()),
                     b64(json.dumps({"sub": "admin", "role": "admin", "aud": "apache-airflow"}).encode()),
                     b64(b"\x00" * 64)])


def strategy(operation: Any, mode: GenerationMode, run: dict[str, Any]) -> Any:
    """Cases for ``operation``: everything generated, or anchored on the real run (its dag_id and run_id
    fixed, the rest generated) so that unauthenticated requests aim at real data and authenticated ones
    reach the code that renders it."""
    names = {p.name for p in operation.path_parameters}
    generated = operation.as_strategy(generation_mode=mode)
    if not names:
        return generated
    anchored = operation.as_strategy(generation_mode=mode,
                                     path_parameters={k: run[k] for k in ("dag_id", "run_id", "name") if k in names})
    return st.one_of(generated, anchored)


def fuzz(schema: Any, operations: list[tuple[str, str]], run: dict[str, Any], examples: int,
         send: Callable[[Any, Any], None]) -> None:
    """Each operation, positive and negative data, ``examples`` cases each, through ``send``."""
    for method, path in operations:
        for mode in GenerationMode:
            examples_of(schema[path][method], strategy(schema[path][method], mode, run), examples, send)()


def examples_of(operation: Any, cases: Any, examples: int, send: Callable[[Any, Any], None]) -> Callable[[], None]:
    @fuzz_settings(examples)
    @given(case=cases)
    def one(case: Any) -> None:
        send(operation, case)

    return one


def describe(case: Any, response: Any) -> str:
    """The request as sent (credentials shortened) and the answer."""
    sent = {k: v[:20] + "..." for k, v in response.request.headers.items() if k.lower() in ("authorization", "cookie")}
    return f"{case.method} {response.request.url} {sent} -> {response.status_code} {response.text[:300]!r}"


def test_the_served_schema_lists_every_route_under_fgov(base_url: str, schema: Any) -> None:
    served = requests.get(f"{base_url}/openapi.json", timeout=30)
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json()["servers"] == [{"url": "/fgov"}]
    listed = sorted((op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations())
    assert listed == sorted(OPERATIONS), "a route was added or removed: fuzz it here too"
    assert schema.get_base_url() == base_url


@pytest.mark.parametrize("identity", ["no-token", "schema-generated-token", "forged-token", "altered-claims-bearer",
                                      "altered-claims-cookie"])
def test_without_a_valid_token_every_generated_request_is_refused_and_reads_nothing(
        schema: Any, base_url: str, run: dict[str, Any], tokens: dict[str, str], identity: str) -> None:
    altered = with_claims(tokens["auditor"], sub="requester", role="admin")
    seen: dict[int, int] = {}

    def send(_operation: Any, case: Any) -> None:
        if identity != "schema-generated-token":  # else: whatever schemathesis derived from the security scheme
            case.headers.pop("Authorization", None)
        if identity == "forged-token":
            case.headers["Authorization"] = f"Bearer {forged()}"
        elif identity == "altered-claims-bearer":
            case.headers["Authorization"] = f"Bearer {altered}"
        elif identity == "altered-claims-cookie":
            case.cookies = {**(case.cookies or {}), "_token": altered}
        response = case.call(base_url=base_url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert run["run_id"] not in response.text and "event_type" not in response.text, describe(case, response)
        if response.status_code == 404:
            # Not routed to the plugin at all (a newline or a "/" in a path parameter): Airflow's bare 404.
            # The plugin's own 404s name what is missing and come only after authentication.
            assert response.json() == NOT_ROUTED, describe(case, response)
            return
        assert response.status_code in (401, 403), describe(case, response)
        assert response.json() in REFUSALS, describe(case, response)

    fuzz(schema, OPERATIONS, run, 25, send)
    expected = {"no-token": {401}, "forged-token": {403}, "altered-claims-bearer": {403},
                "altered-claims-cookie": {403}}.get(identity, {401, 403})
    assert set(seen) - {404} == expected, seen
    assert seen.get(404, 0) < sum(seen.values()) // 10, seen


def test_the_auditor_gets_no_server_error_and_no_lease_sweep(schema: Any, base_url: str, run: dict[str, Any],
                                                             tokens: dict[str, str]) -> None:
    statuses: dict[str, set[int]] = {}

    def send(operation: Any, case: Any) -> None:
        case.headers["Authorization"] = f"Bearer {tokens['auditor']}"
        response = case.call(base_url=base_url, timeout=30)
        statuses.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if operation.method.upper() == "POST":
            assert response.status_code == 403, describe(case, response)
            assert response.json() == {"detail": "auditor may not trigger fgov_lease_sweep"}
        else:
            assert response.status_code in (200, 404, 422), describe(case, response)

    fuzz(schema, OPERATIONS, run, 50, send)
    assert statuses["POST /api/lease-sweep"] == {403}
    # the fuzz reached the data: the run list and the real run's pages answered
    assert 200 in statuses["GET /api/runs"] and 200 in statuses["GET /api/runs/{dag_id}/{run_id}"]
    assert 200 in statuses["GET /ui/runs/{dag_id}/{run_id}"] and 200 in statuses["GET /api/models/{name}"]
    assert 200 in statuses["GET /api/runs/{dag_id}/{run_id}/evidence"]


def test_the_requester_reads_with_no_server_error(schema: Any, base_url: str, run: dict[str, Any],
                                                   tokens: dict[str, str]) -> None:
    def send(_operation: Any, case: Any) -> None:
        case.headers["Authorization"] = f"Bearer {tokens['requester']}"
        response = case.call(base_url=base_url, timeout=30)
        case.validate_response(response, checks=CHECKS)
        # 403: a DAG that is not the requester's team's (every generated dag_id but the run's)
        assert response.status_code in (200, 403, 404, 422), describe(case, response)

    fuzz(schema, READS, run, 25, send)  # no POST: each would trigger fgov_lease_sweep (tested in tests/plugin)


def real_case(operation: Any, run: dict[str, Any], token: str, **override: Any) -> Any:
    """A request for ``operation`` on the real run (its report, map index), with some values overridden."""
    real = {"dag_id": run["dag_id"], "run_id": run["run_id"], "task_id": run["task_id"], "name": run["name"],
            "map_index": run["map_index"], "limit": 5, **override}
    return operation.Case(path_parameters={p.name: real[p.name] for p in operation.path_parameters},
                          query={p.name: real[p.name] for p in operation.query if p.name in override
                                 or p.name == "map_index"},
                          headers={"Authorization": f"Bearer {token}"})


def test_the_real_runs_pages_answer_and_match_the_schema(schema: Any, base_url: str, run: dict[str, Any],
                                                         tokens: dict[str, str]) -> None:
    """The auditor reads the real run at each URL: 200, and the answer matches the schema (status, media type,
    body) as schemathesis checks it. All mismatches are listed together."""
    failures = []
    for method, path in READS:
        case = real_case(schema[path][method], run, tokens["auditor"])
        response = case.call(base_url=base_url, timeout=30)
        if response.status_code != 200:
            failures.append(describe(case, response))
            continue
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            failures += [f"{method} {path}: {f.title}: {f.message}" for f in group.exceptions]
    assert not failures, "\n".join(failures)


def test_hostile_values_in_every_parameter_of_a_real_runs_urls_get_no_server_error(
        schema: Any, base_url: str, run: dict[str, Any], tokens: dict[str, str]) -> None:
    """Each parameter of each read in turn gets each hostile value, the others keep the real run's (so the
    request gets as far as it can); every request answering 5xx is listed."""
    failures: dict[str, str] = {}  # by URL
    count = 0
    for method, path in READS:
        operation = schema[path][method]
        for parameter in [*operation.path_parameters, *operation.query]:
            integer = parameter.definition["schema"].get("type") == "integer"
            for value in HOSTILE_INT if integer else HOSTILE_TEXT:
                case = real_case(operation, run, tokens["auditor"], **{parameter.name: value})
                count += 1
                try:
                    response = case.call(base_url=base_url, timeout=30)
                except requests.RequestException as exc:
                    failures[f"{method} {path} {parameter.name}={value!r}"] = repr(exc)
                    continue
                if response.status_code >= 500:
                    failures[response.request.url] = describe(case, response)
    assert count > 100
    assert not failures, (f"{len(failures)} distinct requests of {count} got a server error:\n"
                          + "\n".join(failures.values()))
