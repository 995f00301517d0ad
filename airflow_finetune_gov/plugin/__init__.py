"""The Airflow plugin of the provider (the governance view arrives with the lineage work)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class FinetuneGovPlugin(AirflowPlugin):
    name = "finetune_gov"
