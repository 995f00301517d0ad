"""Read the ``[finetune_gov]`` config section.

Airflow's own configuration is the source (airflow.cfg, or ``AIRFLOW__FINETUNE_GOV__<KEY>`` env vars),
so the provider has one place for settings. Errors name the option to set.
"""

from __future__ import annotations

from airflow_finetune_gov.provider_info import CONFIG_OPTIONS

SECTION = "finetune_gov"


class ConfigMissing(RuntimeError):
    pass


def get(key: str, *, required: bool = True) -> str:
    if key not in CONFIG_OPTIONS:
        raise KeyError(f"unknown [{SECTION}] option {key!r}")
    from airflow.configuration import conf

    default = CONFIG_OPTIONS[key].get("default")
    value = conf.get(SECTION, key, fallback=default)
    if (value is None or value == "") and required:
        raise ConfigMissing(
            f"[{SECTION}] {key} is not set: set it in airflow.cfg or as "
            f"AIRFLOW__{SECTION.upper()}__{key.upper()} ({CONFIG_OPTIONS[key]['description']})"
        )
    return value or ""
