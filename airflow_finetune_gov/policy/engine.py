"""Policy-as-code: decide the risk tier of a fine-tuning change (pure Python, no Airflow import).

A policy is a YAML file; its sha256 is its version and goes into lineage with every decision. A
malformed file raises ``PolicyError`` naming the file, the line and the problem, so a DAG that uses
it fails at parse time rather than at 3 a.m.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TIERS = ("auto", "single", "quorum", "deny")
ENVIRONMENTS = ("test", "staging", "production")
CLASSIFICATIONS = ("public", "internal", "pii", "sensitive")
TUNING_METHODS = ("full", "lora", "adapter", "prompt_tuning")
CHANGES = ("finetune", "rollback")
WHEN_KEYS = ("target_environment", "classification", "tuning_method", "dataset", "change", "screening")
# Conditions on the training-data screening's counts, compared with a number: "> 0.2", ">= 1", "0"
COMPARED_KEYS = ("flagged_rows", "flagged_share")
SCREENING_STATUSES = ("screened", "unavailable", "disabled")
SCREENING_DETECTORS = ("pattern",)
# How approvers are shown training rows (samples and flagged rows), by the dataset's classification
ROW_DISPLAYS = ("full", "redacted", "none")
DEFAULT_ROW_DISPLAY = {"public": "full", "internal": "full", "pii": "redacted", "sensitive": "none"}
_COMPARISON = re.compile(r"^\s*(>=|<=|>|<|==)?\s*(\d+(?:\.\d+)?)\s*$")
_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__, "==": float.__eq__}


# Training leases one approval may issue: the first, and one more for a run cleared after a failure.
DEFAULT_MAX_LEASES_PER_APPROVAL = 2


class PolicyError(ValueError):
    pass


ROLE_PREFIX = "role:"
# Who holds an auth-manager role now (active users' names), e.g. approval.people.role_members
Members = Callable[[str], Iterable[str]]


@dataclass(frozen=True)
class Team:
    """Who owns what: the DAGs (``dag_id`` patterns) whose runs are the team's, the datasets they may lease, the
    models (name patterns) they may change, the environments they may change them in, and who approves
    (user names, or ``role:NAME`` for whoever holds that auth-manager role when it is read). ``airflow_role`` is
    the Airflow role the control plane keeps granted on the team's DAGs (read, edit), empty for none."""

    name: str
    dags: tuple[str, ...]
    approvers: tuple[str, ...]
    datasets: tuple[str, ...]
    models: tuple[str, ...] = ("*",)
    environments: tuple[str, ...] = ENVIRONMENTS
    airflow_role: str = ""
    line: int = 0

    def owns_dag(self, dag_id: str) -> bool:
        return any(fnmatch.fnmatchcase(dag_id, pattern) for pattern in self.dags)

    def owns_model(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


def resolve_approvers(entries: Iterable[str], members: Members | None) -> list[str]:
    """User names from ``entries`` (names, and ``role:NAME`` read through ``members``), in order, once each."""
    out: list[str] = []
    for entry in entries:
        if entry.startswith(ROLE_PREFIX):
            if members is None:
                raise PolicyError(f"the policy names approvers by role ({entry}), and roles can only be read where "
                                  "the auth manager's are (the control plane, with Airflow's FAB auth manager)")
            names = sorted(str(n) for n in members(entry[len(ROLE_PREFIX):]))
        else:
            names = [entry]
        out += [n for n in names if n not in out]
    return out


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    table: str
    classification: str
    description: str = ""
    owner: str = ""  # who answers for the data: shown to approvers


@dataclass(frozen=True)
class Rule:
    when: dict[str, tuple[str, ...]]
    tier: str
    reason: str
    line: int
    compared: tuple[tuple[str, str, float], ...] = ()  # (key, operator, number): the screening's counts

    def matches(self, facts: Mapping[str, Any]) -> bool:
        """Every condition holds; a condition on a fact this change does not have (a rollback's dataset, the
        screening of a change that was not screened) never matches."""
        if not all(facts.get(k) in allowed for k, allowed in self.when.items()):
            return False
        for key, op, number in self.compared:
            value = facts.get(key)
            if not isinstance(value, int | float) or not _OPS[op](float(value), number):
                return False
        return True


@dataclass(frozen=True)
class ScreeningSettings:
    """The policy's ``screening`` section: the policy check screens the dataset's rows before anyone is asked."""

    enabled: bool = True
    detector: str = "pattern"
    max_rows: int = 5000  # a larger dataset is screened on an even sample of this many rows (recorded)
    examples: int = 3  # flagged rows shown in the approval request (their text is never in lineage)
    max_new_tokens: int = 32  # of the base model's answer to each row's prompt


@dataclass(frozen=True)
class ApprovalSettings:
    """The policy's ``approval`` section: what an approval request shows and what an answer must carry."""

    sample_rows: int = 3  # training rows shown to approvers, an even spread over the dataset
    show_rows: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROW_DISPLAY))
    comment_required_options: tuple[str, ...] = ("Reject",)  # an answer with one of these needs a comment
    comment_required_environments: tuple[str, ...] = ("production",)  # every answer for these needs one

    def row_display(self, classification: str) -> str:
        return self.show_rows.get(classification, "none")

    def comment_required(self, option: str | None, environment: str) -> bool:
        return option in self.comment_required_options or environment in self.comment_required_environments


@dataclass(frozen=True)
class ChangeRequest:
    """A fine-tune of ``model`` on ``dataset`` into ``target_environment``; or, with ``change="rollback"``,
    moving alias ``target_environment`` of ``model`` back to version ``rollback_to`` (no dataset)."""

    model: str
    dataset: str
    target_environment: str
    requester: str
    tuning_method: str = "lora"
    base_version: str = ""
    change: str = "finetune"
    rollback_to: str = ""
    justification: str = ""  # the requester's why, shown to approvers as text
    dag_id: str = ""  # the run's DAG (the task's identity, never the requester's input): its team, with teams


@dataclass(frozen=True)
class Decision:
    tier: str
    reasons: list[str]
    policy_name: str
    policy_sha256: str
    approvers: list[str]
    quorum: int
    classification: str
    dataset_table: str
    rule_line: int
    request: dict[str, Any] = field(default_factory=dict)
    data_owner: str = ""
    comment_required: list[str] = field(default_factory=list)  # the options an answer must say why with
    team: str = ""  # the run's DAG's team, with teams

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping: dict[str, Any] = dict(loader.construct_mapping(node, deep=True))  # type: ignore[arg-type]
    mapping["__line__"] = node.start_mark.line + 1
    mapping["__keylines__"] = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    return mapping


def _line(mapping: dict[str, Any], key: str) -> int:
    return mapping.get("__keylines__", {}).get(key, mapping["__line__"])


_META = ("__line__", "__keylines__")
METRIC_NAMES = ("harmful_refusal", "jailbreak_refusal", "benign_compliance", "task_quality")
# What an evaluation must measure when the policy file does not say: the least prompts per metric, by target
# environment ("default" for the others). A run that measures less is never a pass.
DEFAULT_EVALUATION_REQUIRES: dict[str, dict[str, int]] = {
    "default": {"harmful_refusal": 100, "benign_compliance": 50},
    "production": {"harmful_refusal": 100, "benign_compliance": 50, "jailbreak_refusal": 50},
}


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class Policy:
    name: str
    sha256: str
    source: str
    approvers: list[str]
    datasets: dict[str, DatasetEntry]
    rules: list[Rule]
    quorum: int
    lease: dict[str, int]
    evaluation: dict[str, float]
    hyperparameters: dict[str, tuple[float, float]] = field(default_factory=dict)
    evaluation_requires: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_EVALUATION_REQUIRES.items()})
    screening: ScreeningSettings = field(default_factory=ScreeningSettings)
    approval: ApprovalSettings = field(default_factory=ApprovalSettings)
    teams: dict[str, Team] = field(default_factory=dict)

    def team_of(self, dag_id: str) -> Team | None:
        """The first team whose ``dags`` match ``dag_id`` (None: no team does, or the policy has no teams)."""
        return next((t for t in self.teams.values() if t.owns_dag(dag_id)), None)

    def model_owner(self, model: str) -> Team | None:
        """The first team whose ``models`` patterns match ``model``."""
        return next((t for t in self.teams.values() if t.owns_model(model)), None)

    def approver_entries(self, dag_id: str) -> tuple[str, ...]:
        """Who approves the changes of ``dag_id``'s runs, as the policy names them: its team's approvers, or the
        policy's ``approvers`` when it has no teams (a DAG in no team has none)."""
        if not self.teams:
            return tuple(self.approvers)
        team = self.team_of(dag_id)
        return team.approvers if team else ()

    def approvers_for(self, dag_id: str, members: Members | None = None) -> list[str]:
        """The user names who approve ``dag_id``'s changes now (roles read through ``members``)."""
        return resolve_approvers(self.approver_entries(dag_id), members)

    def _outside_team(self, request: ChangeRequest) -> str | None:
        """Why ``request`` is outside its DAG's team (None: it is inside, or the policy has no teams)."""
        if not self.teams:
            return None
        team = self.team_of(request.dag_id)
        if team is None:
            return (f"DAG {request.dag_id or '(none named)'} belongs to no team of policy {self.name}: a team's "
                    "dags patterns must match it before its runs can change a model")
        if request.change == "finetune" and request.dataset not in team.datasets:
            holder = next((t.name for t in self.teams.values() if request.dataset in t.datasets), None)
            whose = f"team {holder}'s" if holder else "no team's"
            return (f"dataset {request.dataset} is {whose}, not team {team.name}'s (its datasets: "
                    f"{', '.join(team.datasets)})")
        owner = self.model_owner(request.model)
        if owner is not team:
            whose = f"team {owner.name}'s" if owner else "no team's"
            return f"model {request.model} is {whose}, not team {team.name}'s (its models: {', '.join(team.models)})"
        if request.target_environment not in team.environments:
            return (f"team {team.name} does not change models in {request.target_environment} (its environments: "
                    f"{', '.join(team.environments)})")
        return None

    def evaluation_required(self, environment: str) -> dict[str, int]:
        """The metrics an evaluation for ``environment`` must measure, with the least prompts each needs."""
        return dict(self.evaluation_requires.get(environment, self.evaluation_requires.get("default", {})))

    def check_hyperparameters(self, hyperparameters: dict[str, Any] | None) -> list[str]:
        """Problems with ``hyperparameters`` against the policy's bounds (an empty list: within bounds).

        Only numeric keys the policy bounds are checked; the backend rejects keys it does not know."""
        problems = []
        for key, (low, high) in self.hyperparameters.items():
            if not hyperparameters or key not in hyperparameters:
                continue
            value = hyperparameters[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                problems.append(f"{key}={value!r} is not a number")
                continue
            if not low <= number <= high:
                problems.append(f"{key}={value} is outside the policy's range [{low:g}, {high:g}]")
        return problems

    def dataset(self, name: str) -> DatasetEntry:
        try:
            return self.datasets[name]
        except KeyError:
            raise PolicyError(
                f"dataset {name!r} is not in policy {self.name} ({self.source}); "
                f"known datasets: {', '.join(sorted(self.datasets))}"
            ) from None

    def decide(self, request: ChangeRequest, screening: Mapping[str, Any] | None = None,
               members: Members | None = None) -> Decision:
        """The first rule matching the request's facts; ``screening`` (the training-data screening's
        ``status``, ``flagged_rows``, ``flagged_share``) adds the facts rules on screening match against.
        With teams, a request outside its DAG's team (another team's dataset, model or environment) is denied
        whatever the rules say, and the approvers are its team's; ``members`` reads who holds a role now."""
        if request.target_environment not in ENVIRONMENTS:
            raise PolicyError(f"target_environment {request.target_environment!r} is not one of "
                              f"{', '.join(ENVIRONMENTS)}")
        if request.change not in CHANGES:
            raise PolicyError(f"change {request.change!r} is not one of {', '.join(CHANGES)}")
        if request.change == "rollback":
            # No data moves: rules on classification, dataset or method do not match a rollback, so
            # the environment rules and the catch-all decide (production: quorum, by default).
            if not request.rollback_to:
                raise PolicyError("a rollback names the version to go back to (rollback_to)")
            ds = DatasetEntry(name="", table="", classification="n/a")
            facts: dict[str, Any] = {"target_environment": request.target_environment, "change": "rollback"}
        else:
            if request.tuning_method not in TUNING_METHODS:
                raise PolicyError(f"tuning_method {request.tuning_method!r} is not one of "
                                  f"{', '.join(TUNING_METHODS)}")
            ds = self.dataset(request.dataset)
            facts = {"target_environment": request.target_environment, "classification": ds.classification,
                     "tuning_method": request.tuning_method, "dataset": ds.name, "change": "finetune"}
            if screening is not None:
                facts |= {"screening": screening.get("status"), "flagged_rows": screening.get("flagged_rows"),
                          "flagged_share": screening.get("flagged_share")}
        outside = self._outside_team(request)
        for rule in self.rules:
            if rule.matches(facts):
                approvers = ([] if outside else
                             [a for a in self.approvers_for(request.dag_id, members) if a != request.requester])
                reasons = [outside] if outside else [rule.reason]
                if screening is not None and screening.get("summary"):
                    reasons.append(str(screening["summary"]))  # what the screening found, whichever rule matched
                tier = "deny" if outside else rule.tier
                need = self.quorum if tier == "quorum" else 1
                if tier in ("single", "quorum") and len(approvers) < need:
                    reasons.append(f"only {len(approvers)} approver(s) left once the requester is excluded; "
                                   f"{need} needed")
                    tier = "deny"
                team = self.team_of(request.dag_id) if self.teams else None
                return Decision(tier=tier, reasons=reasons, policy_name=self.name, policy_sha256=self.sha256,
                                approvers=approvers, quorum=need if tier != "auto" else 0,
                                classification=ds.classification, dataset_table=ds.table,
                                rule_line=team.line if outside and team else rule.line,
                                team=team.name if team else "", request=asdict(request), data_owner=ds.owner,
                                comment_required=[o for o in ("Approve", "Reject") if
                                                  self.approval.comment_required(o, request.target_environment)])
        raise PolicyError(f"no rule of policy {self.name} ({self.source}) matches {facts}; "
                          "end the rules with a catch-all `when: {}`")


def _fail(source: str, line: Any, problem: str) -> PolicyError:
    return PolicyError(f"{source}, line {line}: {problem}")


def _as_tuple(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    sha = hashlib.sha256(text.encode()).hexdigest()
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else "?"
        raise _fail(source, line, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise _fail(source, 1, "the policy must be a mapping")
    top = doc["__line__"]
    for key in ("name", "datasets", "rules"):
        if key not in doc:
            raise _fail(source, top, f"missing required key {key!r}")
    if ("approvers" in doc) == ("teams" in doc):
        raise _fail(source, top, "name the approvers once: a top-level 'approvers' list, or 'teams', each with "
                    "its approvers (with teams, a top-level list would approve nothing)")
    approvers = doc.get("approvers", [])
    if not isinstance(approvers, list) or not all(isinstance(a, str) and a.strip() for a in approvers):
        raise _fail(source, top, "approvers must be a list of user names (or role:NAME)")
    datasets: dict[str, DatasetEntry] = {}
    if not isinstance(doc["datasets"], dict):
        raise _fail(source, top, "datasets must be a mapping of name -> {table, classification}")
    for name, entry in doc["datasets"].items():
        if name in _META:
            continue
        if not isinstance(entry, dict):
            raise _fail(source, doc["datasets"]["__line__"], f"dataset {name!r} must be a mapping")
        line = entry["__line__"]
        if not str(name).replace("_", "").isalnum():
            raise _fail(source, line, f"dataset name {name!r} must be letters, digits and underscores")
        table = entry.get("table")
        if not isinstance(table, str) or len(table.split(".")) != 2 or not all(
                p.replace("_", "").isalnum() for p in table.split(".")):
            raise _fail(source, _line(entry, "table"), f"dataset {name!r}: table must be schema.table, got {table!r}")
        cls = entry.get("classification")
        if cls not in CLASSIFICATIONS:
            raise _fail(source, _line(entry, "classification"),
                        f"dataset {name!r}: classification {cls!r} is not one of "
                        f"{', '.join(CLASSIFICATIONS)}")
        owner = entry.get("owner", "")
        if not isinstance(owner, str):
            raise _fail(source, _line(entry, "owner"), f"dataset {name!r}: owner must be a name or team, got {owner!r}")
        datasets[str(name)] = DatasetEntry(str(name), table, cls, str(entry.get("description", "")), owner)
    rules: list[Rule] = []
    if not isinstance(doc["rules"], list) or not doc["rules"]:
        raise _fail(source, top, "rules must be a non-empty list")
    for raw in doc["rules"]:
        if not isinstance(raw, dict):
            raise _fail(source, top, "each rule must be a mapping with when/tier/reason")
        line = raw["__line__"]
        tier = raw.get("tier")
        if tier not in TIERS:
            raise _fail(source, _line(raw, "tier"), f"tier {tier!r} is not one of {', '.join(TIERS)}")
        when = raw.get("when", {})
        if not isinstance(when, dict):
            raise _fail(source, _line(raw, "when"), "when must be a mapping")
        parsed: dict[str, tuple[str, ...]] = {}
        compared: list[tuple[str, str, float]] = []
        for key, value in when.items():
            if key in _META:
                continue
            if key in COMPARED_KEYS:
                match = _COMPARISON.match(str(value)) if not isinstance(value, bool | list | dict) else None
                if match is None:
                    raise _fail(source, _line(when, key), f"{key} is compared with a number, e.g. {key}: \">= 1\" "
                                f"or \"> 0.2\" (operators >, >=, <, <=, ==), got {value!r}")
                number = float(match.group(2))
                if key == "flagged_share" and number > 1:
                    raise _fail(source, _line(when, key), f"flagged_share is a share from 0 to 1 (0.2 is 20%), "
                                f"got {number:g}")
                compared.append((str(key), match.group(1) or "==", number))
                continue
            if key not in WHEN_KEYS:
                raise _fail(source, _line(when, key), f"unknown condition {key!r}; use one of "
                            f"{', '.join(WHEN_KEYS + COMPARED_KEYS)}")
            parsed[key] = _as_tuple(value)
            if key == "screening" and not set(parsed[key]) <= set(SCREENING_STATUSES):
                raise _fail(source, _line(when, key),
                            f"screening {value!r}: use one of {', '.join(SCREENING_STATUSES)}")
        reason = raw.get("reason")
        if not reason:
            raise _fail(source, line, "every rule needs a reason (it is shown to approvers and recorded)")
        rules.append(Rule(when=parsed, tier=tier, reason=str(reason), line=line, compared=tuple(compared)))
    quorum = doc.get("quorum", 2)
    if not isinstance(quorum, int) or quorum < 2:
        raise _fail(source, top, f"quorum must be an integer >= 2, got {quorum!r}")
    raw_lease = doc.get("lease") or {}
    if not isinstance(raw_lease, dict):
        raise _fail(source, top, "lease must be a mapping of min_ttl_minutes/default_ttl_minutes/max_ttl_minutes/"
                    "max_leases_per_approval")
    lease = {k: v for k, v in raw_lease.items() if k not in _META}
    lease.setdefault("min_ttl_minutes", 5)
    lease.setdefault("default_ttl_minutes", 30)
    lease.setdefault("max_ttl_minutes", 240)
    lease.setdefault("max_leases_per_approval", DEFAULT_MAX_LEASES_PER_APPROVAL)
    for key, value in lease.items():
        if key not in ("min_ttl_minutes", "default_ttl_minutes", "max_ttl_minutes", "max_leases_per_approval"):
            raise _fail(source, _line(raw_lease, key), f"unknown lease setting {key!r}; use min_ttl_minutes, "
                        "default_ttl_minutes, max_ttl_minutes, max_leases_per_approval")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(source, _line(raw_lease, key), f"lease {key} must be a positive integer, got {value!r}")
    if not lease["min_ttl_minutes"] <= lease["default_ttl_minutes"] <= lease["max_ttl_minutes"]:
        raise _fail(source, raw_lease.get("__line__", top) if isinstance(raw_lease, dict) else top,
                    "lease TTLs must satisfy min_ttl_minutes <= default_ttl_minutes <= max_ttl_minutes")
    evaluation = {k: float(v) for k, v in (doc.get("evaluation") or {}).items() if k not in _META}
    bounds: dict[str, tuple[float, float]] = {}
    raw_hp = (doc.get("tuning") or {}).get("hyperparameters") or {} if isinstance(doc.get("tuning"), dict) else {}
    for key, spec in raw_hp.items():
        if key in _META:
            continue
        if not isinstance(spec, dict) or not {"min", "max"} <= set(spec) or not all(
                isinstance(spec[k], int | float) and not isinstance(spec[k], bool) for k in ("min", "max")):
            raise _fail(source, _line(raw_hp, key), f"tuning.hyperparameters.{key} must be {{min: N, max: N}}")
        if spec["min"] > spec["max"]:
            raise _fail(source, _line(raw_hp, key), f"tuning.hyperparameters.{key}: min is above max")
        bounds[str(key)] = (float(spec["min"]), float(spec["max"]))
    return Policy(name=str(doc["name"]), sha256=sha, source=source, approvers=list(approvers),
                  datasets=datasets, rules=rules, quorum=quorum, lease=lease, evaluation=evaluation,
                  hyperparameters=bounds, evaluation_requires=_evaluation_requires(doc, source, top),
                  screening=_screening(doc, source, top), approval=_approval(doc, source, top),
                  teams=_teams(doc, source, top, datasets))


TEAM_KEYS = ("dags", "approvers", "datasets", "models", "environments", "airflow_role")


def _teams(doc: dict[str, Any], source: str, top: int, datasets: Mapping[str, DatasetEntry]) -> dict[str, Team]:
    items = _section(doc, "teams", source, top, "team name -> {dags, approvers, datasets, models, environments, "
                                                  "airflow_role}")
    if items is None:
        return {}
    teams: dict[str, Team] = {}
    owner_of: dict[str, str] = {}
    for name, raw, line in items:
        if not isinstance(raw, dict):
            raise _fail(source, line, f"team {name!r} must be a mapping of {', '.join(TEAM_KEYS)}")
        unknown = sorted(set(raw) - set(TEAM_KEYS) - set(_META))
        if unknown:
            raise _fail(source, _line(raw, unknown[0]), f"team {name!r}: unknown key {unknown[0]!r}; use "
                        f"{', '.join(TEAM_KEYS)}")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("dags", "approvers", "datasets", "models", "environments"):
            value = raw.get(key)
            if value is None and key in ("models", "environments"):
                continue
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise _fail(source, _line(raw, key) if key in raw else line,
                            f"team {name!r}: {key} must be a non-empty list of names")
            lists[key] = tuple(value)
        for ds in lists["datasets"]:
            if ds not in datasets:
                raise _fail(source, _line(raw, "datasets"), f"team {name!r}: dataset {ds!r} is not in datasets")
            if ds in owner_of:
                raise _fail(source, _line(raw, "datasets"), f"team {name!r}: dataset {ds!r} is already "
                            f"team {owner_of[ds]}'s (a dataset has one owning team)")
            owner_of[ds] = name
        bad_env = sorted(set(lists.get("environments", ())) - set(ENVIRONMENTS))
        if bad_env:
            raise _fail(source, _line(raw, "environments"), f"team {name!r}: environment {bad_env[0]!r} is not one of "
                        f"{', '.join(ENVIRONMENTS)}")
        role = raw.get("airflow_role", "")
        if not isinstance(role, str):
            raise _fail(source, _line(raw, "airflow_role"), f"team {name!r}: airflow_role must be a role name")
        teams[name] = Team(name=name, line=line, airflow_role=role, **lists)  # type: ignore[arg-type]
    return teams


def _section(doc: dict[str, Any], name: str, source: str, top: int, keys: str) -> list[tuple[str, Any, int]] | None:
    """The settings of section ``name`` as (key, value, line), or None when the file has no such section."""
    raw = doc.get(name)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(source, top, f"{name} must be a mapping of {keys}")
    return [(str(key), value, _line(raw, key)) for key, value in raw.items() if key not in _META]


def _approval(doc: dict[str, Any], source: str, top: int) -> ApprovalSettings:
    items = _section(doc, "approval", source, top, "sample_rows/show_rows/comment_required")
    if items is None:
        return ApprovalSettings()
    values: dict[str, Any] = {}
    for key, value, line in items:
        if key == "sample_rows":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 20:
                raise _fail(source, line, f"approval.sample_rows must be a whole number from 0 to 20, got {value!r}")
            values["sample_rows"] = value
        elif key == "show_rows":
            if not isinstance(value, dict):
                raise _fail(source, line, "approval.show_rows maps classifications to full, redacted or none, e.g. "
                            "{pii: redacted, sensitive: none}")
            shown = dict(DEFAULT_ROW_DISPLAY)
            for cls, how in value.items():
                if cls in _META:
                    continue
                if cls not in CLASSIFICATIONS:
                    raise _fail(source, _line(value, cls), f"approval.show_rows: unknown classification {cls!r}; "
                                f"use {', '.join(CLASSIFICATIONS)}")
                if how not in ROW_DISPLAYS:
                    raise _fail(source, _line(value, cls), f"approval.show_rows.{cls} {how!r}: use one of "
                                f"{', '.join(ROW_DISPLAYS)}")
                shown[str(cls)] = str(how)
            values["show_rows"] = shown
        elif key == "comment_required":
            if not isinstance(value, dict) or not set(value) - set(_META) <= {"options", "environments"}:
                raise _fail(source, line, "approval.comment_required is {options: [Reject], environments: "
                            "[production]}: an answer with one of the options, or any answer for one of the "
                            "environments, needs a comment")
            options = _as_tuple(value.get("options", []))
            environments = _as_tuple(value.get("environments", []))
            if not set(options) <= {"Approve", "Reject"}:
                raise _fail(source, _line(value, "options"), f"approval.comment_required.options {list(options)}: "
                            "use Approve and/or Reject")
            if not set(environments) <= set(ENVIRONMENTS):
                raise _fail(source, _line(value, "environments"), "approval.comment_required.environments "
                            f"{list(environments)}: use {', '.join(ENVIRONMENTS)}")
            values["comment_required_options"] = options
            values["comment_required_environments"] = environments
        else:
            raise _fail(source, line, f"unknown approval setting {key!r}; use sample_rows, show_rows, "
                        "comment_required")
    return ApprovalSettings(**values)


def _screening(doc: dict[str, Any], source: str, top: int) -> ScreeningSettings:
    items = _section(doc, "screening", source, top, "enabled/detector/max_rows/examples/max_new_tokens")
    if items is None:
        return ScreeningSettings()
    values: dict[str, Any] = {}
    for key, value, line in items:
        if key == "enabled":
            if not isinstance(value, bool):
                raise _fail(source, line, f"screening.enabled must be true or false, got {value!r}")
        elif key == "detector":
            if value not in SCREENING_DETECTORS:
                raise _fail(source, line, f"screening.detector {value!r}: use one of {', '.join(SCREENING_DETECTORS)}")
        elif key in ("max_rows", "max_new_tokens", "examples"):
            least = 0 if key == "examples" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise _fail(source, line, f"screening.{key} must be a whole number >= {least}, got {value!r}")
        else:
            raise _fail(source, line, f"unknown screening setting {key!r}; use enabled, detector, max_rows, "
                        "examples, max_new_tokens")
        values[str(key)] = value
    return ScreeningSettings(**values)


def _evaluation_requires(doc: dict[str, Any], source: str, top: int) -> dict[str, dict[str, int]]:
    raw = doc.get("evaluation_requires")
    if raw is None:
        return {k: dict(v) for k, v in DEFAULT_EVALUATION_REQUIRES.items()}
    if not isinstance(raw, dict):
        raise _fail(source, top, "evaluation_requires must map target environments (or default) to "
                    "{metric: least prompts}")
    out: dict[str, dict[str, int]] = {}
    for env, metrics in raw.items():
        if env in _META:
            continue
        if not isinstance(metrics, dict):
            raise _fail(source, _line(raw, env), f"evaluation_requires.{env} must map metrics to least prompts, "
                        f"e.g. {{harmful_refusal: 100, benign_compliance: 50}}")
        wanted: dict[str, int] = {}
        for metric, least in metrics.items():
            if metric in _META:
                continue
            if metric not in METRIC_NAMES:
                raise _fail(source, _line(metrics, metric), f"evaluation_requires.{env}: unknown metric "
                            f"{metric!r}; known: {', '.join(METRIC_NAMES)}")
            if not isinstance(least, int) or isinstance(least, bool) or least < 1:
                raise _fail(source, _line(metrics, metric), f"evaluation_requires.{env}.{metric} must be a "
                            f"positive whole number of prompts, got {least!r}")
            wanted[str(metric)] = least
        out[str(env)] = wanted
    return out


def default_policy_text() -> str:
    return resources.files("airflow_finetune_gov.policy").joinpath("default_policy.yaml").read_text()


def load_policy(path: str | Path | None = None) -> Policy:
    if not path:
        return parse_policy(default_policy_text(), "airflow_finetune_gov/policy/default_policy.yaml")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {p}: {exc.strerror}") from None
    return parse_policy(text, str(p))
