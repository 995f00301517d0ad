from airflow_finetune_gov.policy.engine import (
    ChangeRequest,
    Decision,
    Policy,
    PolicyError,
    load_policy,
)

__all__ = ["ChangeRequest", "Decision", "Policy", "PolicyError", "load_policy"]
