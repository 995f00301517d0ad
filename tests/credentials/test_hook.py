"""Where GovernedLeaseHook finds the workload-identity signing key (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_finetune_gov.credentials.broker import LeaseError
from airflow_finetune_gov.credentials.hook import signing_key

PEM = "-----BEGIN PRIVATE KEY-----\nnot-a-real-key\n-----END PRIVATE KEY-----\n"


def test_signing_key_from_an_airflow_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_FGOV_SIGNING_KEY", PEM)  # any secrets backend resolves Variables
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_SECRET", "fgov_signing_key")
    assert signing_key() == PEM.encode()


def test_missing_variable_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_SECRET", "fgov_no_such_variable")
    with pytest.raises(LeaseError, match=r"'fgov_no_such_variable' cannot be read.*workload_identity_key_secret"):
        signing_key()


def test_signing_key_from_a_file_and_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "wi.pem"
    key.write_text(PEM)
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_PATH", str(key))
    assert signing_key() == PEM.encode()
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_PATH", str(tmp_path / "gone.pem"))
    with pytest.raises(RuntimeError, match="workload_identity_key_path"):
        signing_key()
