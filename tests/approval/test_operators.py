"""The approval request's pure parts: its subject and how training rows are shown (the request itself is
rendered and answered on the real stack: tests/integration/test_approval_gate.py, test_required_actions_ui.py)."""

from __future__ import annotations

from airflow_finetune_gov.approval.operators import change_subject, redact, shown_row


def test_the_subject_puts_environment_progress_dataset_and_model_first() -> None:
    finetune = {"target_environment": "production", "dataset": "benign", "model": "fgov-demo-tiny"}
    assert change_subject(finetune, 0, 2) == "[production · 0 of 2 approved] benign → fgov-demo-tiny"
    assert change_subject(finetune, 1, 2) == "[production · 1 of 2 approved] benign → fgov-demo-tiny"
    rollback = {"target_environment": "staging", "model": "m", "change": "rollback", "base_version": "v2",
                "rollback_to": "v1"}
    assert change_subject(rollback, 0, 1) == "[staging · 0 of 1 approved] rollback m v2 → v1"


def test_redaction_masks_addresses_links_and_numbers() -> None:
    text = "Mail jo.doe+x@corp.example.com or call +1 (555) 123-4567; see https://acme.example/a?b=1, order 42."
    assert redact(text) == "Mail [email] or call +[number]; see [url] order [number]."


def test_a_row_is_one_escaped_line_and_redacted_when_the_classification_says_so() -> None:
    prompt, response = "my card is 4111 1111 1111 1111\nhelp", "[click](http://evil.example) <b>now</b>"
    full = shown_row(prompt, response, "full")
    assert "\n" not in full and "\\[click\\]" in full and "\\<b\\>" in full and "4111" in full
    redacted = shown_row(prompt, response, "redacted")
    assert "4111" not in redacted and "\\[number\\]" in redacted and "evil.example" not in redacted


def test_the_request_form_has_its_comment_field() -> None:
    """HITLOperator keeps only params whose source is "task": the Comment field must say so, or Airflow's form
    shows no field and every answer comes without a reason (as it did before this test)."""
    from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
    from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator

    gate = FineTuneApprovalOperator(task_id="approval_gate")
    assert list(gate.serialized_params) == ["comment"] and gate.serialized_params["comment"]["schema"]["title"] == \
        "Comment"
    review = BehaviourEvaluationOperator(task_id="evaluate")
    assert list(review.serialized_params) == ["comment"]


def test_inside_a_dag_with_params_of_its_own_the_form_keeps_its_comment_field() -> None:
    """Airflow merges the DAG's params into the operator's; HITLOperator keeps the task's only."""
    import pendulum
    from airflow.sdk import DAG, Param

    from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
    from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator

    with DAG("d", schedule=None, start_date=pendulum.datetime(2026, 1, 1), params={"dataset": Param("benign")}):
        gate = FineTuneApprovalOperator(task_id="approval_gate")
        review = BehaviourEvaluationOperator(task_id="evaluate")
    assert list(gate.serialized_params) == ["comment"] and list(review.serialized_params) == ["comment"]
