from __future__ import annotations

from importlib.metadata import entry_points

from airflow_finetune_gov.provider_info import get_provider_info


def test_provider_entry_point_and_config_section() -> None:
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("airflow_finetune_gov")]
    info = ep.load()()
    assert info == get_provider_info()
    assert info["package-name"] == "airflow-finetune-gov"
    options = info["config"]["finetune_gov"]["options"]
    for key in ("governance_db_url", "workload_identity_key_path", "vault_conn_id", "policy_file"):
        assert options[key]["description"]
    assert info["plugins"][0]["plugin-class"] == "airflow_finetune_gov.plugin.FinetuneGovPlugin"


def test_airflow_sees_the_provider_and_plugin() -> None:
    from airflow.providers_manager import ProvidersManager

    assert "airflow-finetune-gov" in ProvidersManager().providers
    (plugin_ep,) = [e for e in entry_points(group="airflow.plugins") if e.name == "finetune_gov"]
    assert plugin_ep.load().name == "finetune_gov"
