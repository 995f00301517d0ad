"""Test-only: the research team's governed chain (the policy gives the team ``research_*`` DAGs, the dataset
``research_notes`` and ``research-*`` models), with the command backend's trainer, so that the teams tests can
show one team's run, data and approvers next to the other's."""

from __future__ import annotations

import sys

from airflow.sdk import Param
from governed_finetune_faults import TRAINER, governed_chain

dag = governed_chain(
    "research_tune",
    params={"dataset": Param("research_notes", type="string"), "model": Param("research-base", type="string"),
            "marker": Param("/tmp/fgov-research.marker", type="string")},  # noqa: S108 - the trainer's pid file
    policy_check={"model": "{{ params.model }}", "dataset": "{{ params.dataset }}", "target_environment": "staging",
                  "tuning_method": "full"},
    tune={"backend": "command", "base_model": "{{ params.model }}", "output_model": "research-tuned",
          "command": [sys.executable, "-c", TRAINER, "{{ params.marker }}", "ok"]},
)
