"""The lineage record. Its names load on first use (PEP 562), so importing a submodule such as
``lineage.openlineage`` (which every governed operator does) does not build the SQLAlchemy models."""

from __future__ import annotations

from typing import Any

__all__ = ["EventKey", "LineageError", "LineageEvent", "LineageStore"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from airflow_finetune_gov.lineage import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
