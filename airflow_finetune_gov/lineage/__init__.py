from airflow_finetune_gov.lineage.store import EventKey, LineageError, LineageEvent, LineageStore

__all__ = ["EventKey", "LineageError", "LineageEvent", "LineageStore"]
