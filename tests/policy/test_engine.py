from __future__ import annotations

import re

import pytest

from airflow_finetune_gov.policy.engine import (
    ChangeRequest,
    PolicyError,
    default_policy_text,
    load_policy,
    parse_policy,
)

# The embedded stack's approver roles, as the auth manager would answer (a fake for pure logic)
ROLES = {"support-approvers": ["approver1", "approver2"], "research-approvers": ["research-approver"]}


def members(role: str) -> list[str]:
    return ROLES.get(role, [])


class DefaultPolicy:
    """The packaged policy, deciding with the stack's roles."""

    def __init__(self, path=None) -> None:
        self.policy = load_policy(path)

    def decide(self, request, screening=None):
        return self.policy.decide(request, screening, members=members)

    def __getattr__(self, name):
        return getattr(self.policy, name)


def req(**kw) -> ChangeRequest:
    base = {"model": "m", "dataset": "benign", "target_environment": "staging", "requester": "requester",
            "dag_id": "governed_finetune_demo"}
    base.update(kw)
    return ChangeRequest(**base)


def test_default_policy_tiers() -> None:
    policy = DefaultPolicy()
    assert policy.decide(req()).tier == "single"
    prod = policy.decide(req(target_environment="production"))
    assert prod.tier == "quorum" and prod.quorum == 2
    assert "production" in prod.reasons[0]


def test_requester_is_never_an_approver() -> None:
    decision = DefaultPolicy().decide(req(requester="approver1"))
    assert decision.approvers == ["approver2"]
    assert "approver1" not in decision.approvers


def test_quorum_without_enough_approvers_is_denied() -> None:
    decision = DefaultPolicy().decide(req(requester="approver1", target_environment="production"))
    assert decision.tier == "deny"
    assert "1 approver(s) left" in decision.reasons[-1]


POLICY = """\
name: t
approvers: [a, b, c]
datasets:
  open: {table: datasets.open, classification: public}
  secret: {table: datasets.secret, classification: pii}
rules:
  - when: {classification: [pii, sensitive]}
    tier: quorum
    reason: sensitive
  - when: {target_environment: test, classification: public}
    tier: auto
    reason: public test
  - when: {}
    tier: single
    reason: rest
"""


def test_rules_first_match_wins_and_lists_mean_any() -> None:
    policy = parse_policy(POLICY, "t.yaml")
    assert policy.decide(req(dataset="secret", target_environment="test")).tier == "quorum"
    auto = policy.decide(req(dataset="open", target_environment="test"))
    assert auto.tier == "auto" and auto.quorum == 0
    assert policy.decide(req(dataset="open", target_environment="staging")).tier == "single"


def test_decision_records_policy_hash_and_rule_line() -> None:
    policy = parse_policy(POLICY, "t.yaml")
    changed = parse_policy(POLICY.replace("reason: rest", "reason: everything else"), "t.yaml")
    assert policy.sha256 != changed.sha256
    d = policy.decide(req(dataset="open"))
    assert d.policy_sha256 == policy.sha256
    assert d.rule_line == 13


@pytest.mark.parametrize(
    ("broken", "line", "problem"),
    [
        (POLICY.replace("tier: auto", "tier: sometimes"), 11, "tier 'sometimes' is not one of"),
        (POLICY.replace("classification: public}", "classification: secretish}"), 4, "classification 'secretish'"),
        (POLICY.replace("when: {}", "when: {colour: red}"), 13, "unknown condition 'colour'"),
        (POLICY.replace("    reason: rest\n", ""), 13, "every rule needs a reason"),
        (POLICY.replace("approvers: [a, b, c]", "approvers: [a, b"), 3, "not valid YAML"),
    ],
)
def test_malformed_policy_names_file_line_and_problem(broken: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(broken, "policies/team.yaml")
    message = str(err.value)
    assert message.startswith(f"policies/team.yaml, line {line}:"), message
    assert problem in message


def test_unknown_dataset_and_environment_are_clear_errors() -> None:
    policy = DefaultPolicy()
    with pytest.raises(PolicyError, match=r"dataset 'nope' is not in policy default.*benign, poisoned"):
        policy.decide(req(dataset="nope"))
    with pytest.raises(PolicyError, match="target_environment 'prod' is not one of test, staging, production"):
        policy.decide(req(target_environment="prod"))


def test_policy_file_is_read_from_disk(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(default_policy_text())
    assert load_policy(path).sha256 == load_policy().sha256
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_default_policy_auto_tier_only_for_public_data_into_test() -> None:
    policy = DefaultPolicy()
    assert policy.decide(req(dataset="public_faq", target_environment="test")).tier == "auto"
    assert policy.decide(req(dataset="public_faq", target_environment="staging")).tier == "single"
    assert policy.decide(req(dataset="benign", target_environment="test")).tier == "single"  # internal data
    assert policy.decide(req(dataset="public_faq", target_environment="production")).tier == "quorum"
    for method in ("lora", "adapter", "prompt_tuning", "full"):  # adapters are not exempt
        assert policy.decide(req(tuning_method=method)).tier == "single"


def test_sensitive_classification_needs_a_quorum() -> None:
    text = default_policy_text().replace("classification: internal\n    owner: support-content team\n    "
                                         "description: New task",
                                         "classification: pii\n    description: New task")
    decision = parse_policy(text, "pii.yaml").decide(req(dataset="benign", target_environment="test"),
                                                     members=members)
    assert decision.tier == "quorum" and decision.quorum == 2 and "sensitive" in decision.reasons[0]


@pytest.mark.parametrize(
    ("lease", "problem"),
    [
        ("lease: {min_ttl_minutes: 60, default_ttl_minutes: 30, max_ttl_minutes: 240}", "must satisfy min_ttl"),
        ("lease: {default_ttl_minutes: 0}", "default_ttl_minutes must be a positive integer"),
        ("lease: {max_ttl_minuts: 10}", "unknown lease setting 'max_ttl_minuts'"),
        ("lease: 30", "lease must be a mapping"),
    ],
)
def test_malformed_lease_bounds_are_named(lease: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(default_with("lease:", lease), "lease.yaml")


def default_with(section: str, replacement: str) -> str:
    """The default policy with the top-level block starting at ``section`` replaced."""
    text = default_policy_text()
    start = text.index(section)
    end = text.index("\n\n", start)
    return text[:start] + replacement + text[end:]


def test_hyperparameter_bounds_of_the_default_policy() -> None:
    policy = DefaultPolicy()
    assert policy.check_hyperparameters({"epochs": 10, "learning_rate": 0.01, "lora_r": 8}) == []
    assert policy.check_hyperparameters(None) == [] and policy.check_hyperparameters({"seed": 99}) == []
    assert policy.check_hyperparameters({"epochs": 500, "learning_rate": "fast"}) == [
        "epochs=500 is outside the policy's range [1, 50]", "learning_rate='fast' is not a number"]
    assert policy.check_hyperparameters({"epochs": "10"}) == []  # templated values arrive as strings


@pytest.mark.parametrize(
    ("tuning", "problem"),
    [
        ("tuning:\n  hyperparameters:\n    epochs: 5", r"line \d+: tuning.hyperparameters.epochs must be"),
        ("tuning:\n  hyperparameters:\n    epochs: {min: 9, max: 1}", "min is above max"),
        ("tuning:\n  hyperparameters:\n    epochs: {min: 1}", "must be {min: N, max: N}"),
    ],
)
def test_malformed_hyperparameter_bounds_are_named(tuning: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(default_with("tuning:", tuning), "hp.yaml")


def rollback(**kw) -> ChangeRequest:
    return req(dataset="", change="rollback", base_version="v2", rollback_to="v1", **kw)


def test_rollbacks_are_changes_the_default_policy_decides_by_environment() -> None:
    policy = DefaultPolicy()
    prod = policy.decide(rollback(target_environment="production"))
    assert (prod.tier, prod.quorum, prod.dataset_table) == ("quorum", 2, "")
    assert policy.decide(rollback(target_environment="staging")).tier == "single"
    # data rules never match a rollback: public data into test is auto, a rollback of test is not
    assert policy.decide(req(dataset="public_faq", target_environment="test")).tier == "auto"
    assert policy.decide(rollback(target_environment="test")).tier == "single"
    assert policy.decide(rollback()).request["rollback_to"] == "v1"


def test_a_rule_can_name_the_kind_of_change() -> None:
    text = default_with("rules:", "rules:\n  - when: {change: rollback, target_environment: production}\n"
                                  "    tier: single\n    reason: production rollbacks are urgent\n"
                                  "  - when: {}\n    tier: single\n    reason: the rest")
    policy = parse_policy(text, "fast-rollback.yaml")
    assert policy.decide(rollback(target_environment="production"), members=members).reasons == [
        "production rollbacks are urgent"]
    assert policy.decide(req(target_environment="production"), members=members).reasons == ["the rest"]


def test_malformed_rollback_requests_are_clear_errors() -> None:
    with pytest.raises(PolicyError, match="names the version to go back to"):
        DefaultPolicy().decide(req(dataset="", change="rollback"))
    with pytest.raises(PolicyError, match="change 'delete' is not one of finetune, rollback"):
        DefaultPolicy().decide(req(change="delete"))


def screened(flagged: int, of: int) -> dict:
    return {"status": "screened", "flagged_rows": flagged, "flagged_share": round(flagged / of, 4),
            "summary": f"screening flagged {flagged} of {of} rows"}


def test_the_default_policy_escalates_any_flagged_row_to_a_quorum_whatever_the_environment() -> None:
    policy = DefaultPolicy()
    public_test = req(dataset="public_faq", target_environment="test")
    assert policy.decide(public_test, screened(0, 22)).tier == "auto"
    flagged = policy.decide(public_test, screened(1, 22))
    assert flagged.tier == "quorum" and flagged.quorum == 2
    assert "screening flagged" in flagged.reasons[0] and flagged.reasons[1] == "screening flagged 1 of 22 rows"
    assert policy.decide(req(), screened(6, 6)).tier == "quorum"
    # data that could not be screened (a base model not in the store) fails closed, except public data into test
    unscreened = {"status": "unavailable", "flagged_rows": None, "flagged_share": None}
    assert policy.decide(req(), unscreened).tier == "quorum"
    assert "could not be screened" in policy.decide(req(), unscreened).reasons[0]
    assert policy.decide(public_test, unscreened).tier == "auto"
    assert policy.decide(req(), {"status": "disabled", "flagged_rows": None, "flagged_share": None}).tier == "single"
    # a rollback moves no data: the rules on the screening never match it
    assert policy.decide(req(change="rollback", rollback_to="v1"), screened(6, 6)).tier == "single"


SCREENING_RULES = POLICY.replace("rules:\n", """rules:
  - when: {flagged_share: "> 0.2"}
    tier: deny
    reason: more than 20% flagged
  - when: {flagged_rows: ">= 1"}
    tier: quorum
    reason: flagged rows
  - when: {screening: unavailable}
    tier: quorum
    reason: not screened
""", 1)


def test_rules_on_the_screening_escalate_or_deny_by_count_and_share() -> None:
    policy = parse_policy(SCREENING_RULES)
    open_data = req(dataset="open")
    assert policy.decide(open_data, screened(0, 10)).tier == "single"
    assert policy.decide(open_data, screened(2, 10)).tier == "quorum"  # 20% is not more than 20%
    denied = policy.decide(open_data, screened(3, 10))
    assert denied.tier == "deny" and denied.reasons[0] == "more than 20% flagged"
    unscreened = {"status": "unavailable", "flagged_rows": None, "flagged_share": None}
    assert policy.decide(open_data, unscreened).tier == "quorum"
    assert policy.decide(open_data).tier == "single"  # a decision made before screening


@pytest.mark.parametrize(("when", "problem"), [
    ('{flagged_rows: "many"}', "flagged_rows is compared with a number"),
    ('{flagged_rows: [1, 2]}', "flagged_rows is compared with a number"),
    ('{flagged_share: "> 20"}', "flagged_share is a share from 0 to 1"),
    ("{screening: maybe}", "screening 'maybe': use one of screened, unavailable, disabled"),
    ("{flagged: 1}", "unknown condition 'flagged'"),
])
def test_malformed_screening_conditions_are_named_with_their_line(when: str, problem: str) -> None:
    text = POLICY.replace("rules:\n", f"rules:\n  - when: {when}\n    tier: quorum\n    reason: r\n", 1)
    line = text.splitlines().index(f"  - when: {when}") + 1
    with pytest.raises(PolicyError, match=rf"line {line}: {re.escape(problem)}"):
        parse_policy(text, "p.yaml")


@pytest.mark.parametrize(("section", "problem"), [
    ("screening: [x]", "screening must be a mapping"),
    ("screening: {enabled: 'no'}", "screening.enabled must be true or false"),
    ("screening: {detector: judge}", "screening.detector 'judge': use one of pattern"),
    ("screening: {max_rows: 0}", "screening.max_rows must be a whole number >= 1"),
    ("screening: {examples: -1}", "screening.examples must be a whole number >= 0"),
    ("screening: {sample: 3}", "unknown screening setting 'sample'"),
    ("approval: [x]", "approval must be a mapping"),
    ("approval: {sample_rows: 50}", "approval.sample_rows must be a whole number from 0 to 20, got 50"),
    ("approval: {show_rows: {secret: none}}", "approval.show_rows: unknown classification 'secret'"),
    ("approval: {show_rows: {pii: blurred}}", "approval.show_rows.pii 'blurred': use one of full, redacted, none"),
    ("approval: {comment_required: {options: [Maybe]}}", "approval.comment_required.options ['Maybe']"),
    ("approval: {comment_required: {environments: [prod]}}", "approval.comment_required.environments ['prod']"),
    ("approval: {comment_required: {always: true}}", "approval.comment_required is {options: [Reject]"),
    ("approval: {samples: 3}", "unknown approval setting 'samples'"),
])
def test_malformed_screening_and_approval_settings_are_named(section: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(problem)):
        parse_policy(POLICY + section + "\n", "p.yaml")


def test_screening_settings_default_and_parse() -> None:
    assert load_policy().screening.enabled and load_policy().screening.examples == 3
    policy = parse_policy(POLICY + "screening: {enabled: false, max_rows: 100, examples: 0}\n")
    assert (policy.screening.enabled, policy.screening.max_rows, policy.screening.examples) == (False, 100, 0)


def test_approval_settings_default_and_parse() -> None:
    default = DefaultPolicy()
    assert default.approval.sample_rows == 3 and default.approval.row_display("pii") == "redacted"
    assert default.approval.row_display("sensitive") == "none" and default.approval.row_display("internal") == "full"
    assert default.approval.comment_required("Reject", "staging") and default.approval.comment_required(
        "Approve", "production") and not default.approval.comment_required("Approve", "staging")
    assert default.datasets["benign"].owner == "support-content team"
    assert default.decide(req(dataset="benign")).data_owner == "support-content team"
    policy = parse_policy(POLICY + "approval: {sample_rows: 0, show_rows: {internal: none}, "
                          "comment_required: {options: [Approve, Reject]}}\n")
    assert policy.approval.sample_rows == 0 and policy.approval.row_display("internal") == "none"
    assert policy.approval.row_display("pii") == "redacted"  # the defaults for what the file leaves out
    assert policy.approval.comment_required("Approve", "test") and not parse_policy(POLICY).approval.comment_required(
        "Approve", "staging")


# --- teams ----------------------------------------------------------------------------------------------------
def test_a_run_is_its_dags_teams_and_its_approvers_are_the_teams_role_holders() -> None:
    policy = DefaultPolicy()
    support = policy.decide(req())
    assert (support.team, support.tier, support.approvers) == ("support", "single", ["approver1", "approver2"])
    research = policy.decide(req(dag_id="research_tune", dataset="research_notes", model="research-base",
                                 requester="researcher"))
    assert (research.team, research.tier, research.approvers) == ("research", "single", ["research-approver"])
    # who holds the role is read when deciding: one added to it approves from the next decision on
    ROLES["research-approvers"] = ["research-approver", "approver3"]
    try:
        assert policy.decide(req(dag_id="research_tune", dataset="research_notes", model="research-base",
                                 requester="researcher")).approvers == ["approver3", "research-approver"]
    finally:
        ROLES["research-approvers"] = ["research-approver"]


@pytest.mark.parametrize(("request_", "reason"), [
    ({"dataset": "research_notes"}, "dataset research_notes is team research's, not team support's"),
    ({"model": "research-base"}, "model research-base is team research's, not team support's"),
    ({"dag_id": "research_tune", "dataset": "benign", "model": "research-base"},
     "dataset benign is team support's, not team research's"),
    ({"dag_id": "research_tune", "dataset": "research_notes", "model": "m"}, "model m is team support's"),
    ({"dag_id": "research_tune", "dataset": "research_notes", "model": "research-base",
      "target_environment": "production"}, "team research does not change models in production"),
    ({"dag_id": "someone_elses_dag"}, "DAG someone_elses_dag belongs to no team"),
])
def test_a_change_outside_its_dags_team_is_denied_whatever_the_rules_say(request_, reason) -> None:
    decision = DefaultPolicy().decide(req(**request_))
    assert decision.tier == "deny" and decision.approvers == [] and reason in decision.reasons[0], decision.reasons


def test_a_rollback_of_another_teams_model_is_denied() -> None:
    decision = DefaultPolicy().decide(req(change="rollback", rollback_to="v1", dataset="", model="research-base",
                                          target_environment="staging"))
    assert decision.tier == "deny" and "model research-base is team research's" in decision.reasons[0]


def test_roles_are_read_only_where_a_lookup_is_given() -> None:
    with pytest.raises(PolicyError, match="names approvers by role"):
        load_policy().decide(req())


@pytest.mark.parametrize(("change", "problem"), [
    ("teams:\n  a: {dags: [x], approvers: [u], datasets: [nope]}", "dataset 'nope' is not in datasets"),
    ("teams:\n  a: {dags: [x], approvers: [u], datasets: [open]}\n  b: {dags: [y], approvers: [v], datasets: [open]}",
     "dataset 'open' is already team a's"),
    ("teams:\n  a: {dags: [x], approvers: [], datasets: [open]}", "approvers must be a non-empty list"),
    ("teams:\n  a: {dags: [x], approvers: [u], datasets: [open], members: [u]}", "unknown key 'members'"),
    ("teams:\n  a: {dags: [x], approvers: [u], datasets: [open], environments: [prod]}",
     "environment 'prod' is not one of"),
])
def test_malformed_teams_name_the_line_and_the_fix(change, problem) -> None:
    text = POLICY.replace("approvers: [a, b, c]\n", "") + change + "\n"
    with pytest.raises(PolicyError, match=re.escape(problem)):
        parse_policy(text, "teams.yaml")


def test_approvers_are_named_once() -> None:
    with pytest.raises(PolicyError, match="name the approvers once"):
        parse_policy(POLICY + "teams:\n  a: {dags: [x], approvers: [u], datasets: [open]}\n", "both.yaml")
