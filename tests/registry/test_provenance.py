"""Provenance envelopes and their verification (pure logic: an in-process ed25519 key stands in for
OpenBao's transit key here; the stack tests sign with the real transit engine)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import model_signing_verify

from airflow_finetune_gov.registry import provenance
from airflow_finetune_gov.registry.store import ModelStore

KEYID = "fgov-transit/fgov-provenance:v1"


def test_pae_matches_the_dsse_specification_example() -> None:
    assert provenance.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


@pytest.fixture
def signed(tmp_path: Path) -> tuple[ModelStore, str, str, dict[str, str], Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    store = ModelStore(tmp_path)
    base = store.put("base", {"model.safetensors": b"base weights"}, {"kind": "base"})
    m = store.put("m", {"adapter_model.safetensors": b"lora weights", "adapter_config.json": b"{}"},
                  {"kind": "adapter"})
    tuned = {"model": "m", "version": m["version"], "base_model": "base", "base_version": base["version"],
             "content_sha256": "ab" * 32, "rows": 12, "dataset_uri": "postgresql://db/datasets.benign",
             "backend": "local_peft", "hyperparameters": {"epochs": 10}}
    approval = {"dataset": "benign", "target_environment": "staging", "policy_sha256": "f" * 64,
                "approval_id": "a1", "tier": "single", "approvers": ["approver1"], "requester": "requester"}
    statement = provenance.build_statement(store=store, tuned=tuned, approval=approval,
                                           evaluation={"verdict": "pass", "evaluation_id": "e1"}, dag_id="d",
                                           run_id="r1", conf={"dataset": "benign"})
    envelope = provenance.sign(statement, lambda message: (KEYID, key.sign(message)))
    provenance.write(store, "m", m["version"], envelope)
    return store, "m", m["version"], {KEYID: pem}, key


def test_a_signed_model_verifies_and_says_what_built_it(signed) -> None:
    store, name, version, keys, _ = signed
    statement = provenance.verify_model(store, name, version, keys)
    assert {s["name"] for s in statement["subject"]} == {f"m/{version}/adapter_model.safetensors",
                                                         f"m/{version}/adapter_config.json"}
    build = statement["predicate"]["buildDefinition"]
    assert build["externalParameters"]["hyperparameters"] == {"epochs": 10}
    assert [d["uri"] for d in build["resolvedDependencies"]][1] == "postgresql://db/datasets.benign"
    assert build["resolvedDependencies"][1]["digest"] == {"sha256": "ab" * 32}
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == "d/r1"
    assert build["internalParameters"]["approval"]["approvers"] == ["approver1"]


@pytest.mark.parametrize(("tamper", "error"), [
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"lora weightS"),
     "adapter_model.safetensors: digest differs from the signed provenance"),
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda f: (f / "extra.bin").write_bytes(b"x"), "extra.bin: not in the signed provenance"),
    (lambda f: (f / provenance.ENVELOPE_FILE).unlink(), "has no signed provenance"),
])
def test_any_change_to_the_files_is_named(signed, tamper, error: str) -> None:
    store, name, version, keys, _ = signed
    tamper(store.path(name, version))
    with pytest.raises(provenance.ProvenanceError, match=error):
        provenance.verify_model(store, name, version, keys)


def test_an_edited_statement_or_another_key_does_not_verify(signed) -> None:
    store, name, version, keys, _ = signed
    path = store.path(name, version) / provenance.ENVELOPE_FILE
    envelope = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["buildDefinition"]["internalParameters"]["approval"]["approvers"] = ["mallory"]
    forged = {**envelope, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}
    path.write_text(json.dumps(forged))
    with pytest.raises(provenance.ProvenanceError, match="does not verify: the statement was altered"):
        provenance.verify_model(store, name, version, keys)
    other = Ed25519PrivateKey.generate()
    path.write_text(json.dumps(provenance.sign(statement, lambda m: ("someone-else:v1", other.sign(m)))))
    with pytest.raises(provenance.ProvenanceError, match="no signature by a known key"):
        provenance.verify_model(store, name, version, keys)


def test_url_safe_unpadded_base64_verifies_and_timestamps_are_utc_z(signed) -> None:
    """DSSE: verifiers MUST accept standard and URL-safe base64; another signer may write either."""
    store, name, version, keys, _ = signed
    path = store.path(name, version) / provenance.ENVELOPE_FILE
    envelope = json.loads(path.read_text())

    def url_safe(value: str) -> str:
        return base64.urlsafe_b64encode(base64.b64decode(value)).decode().rstrip("=")

    envelope["payload"] = url_safe(envelope["payload"])
    envelope["signatures"] = [{**s, "sig": url_safe(s["sig"])} for s in envelope["signatures"]]
    assert any(c in envelope["payload"] + envelope["signatures"][0]["sig"] for c in "-_")  # really URL-safe
    path.write_text(json.dumps(envelope))
    statement = provenance.verify_model(store, name, version, keys)
    metadata = statement["predicate"]["runDetails"]["metadata"]
    assert metadata["finishedOn"].endswith("Z") and "+00:00" not in metadata["finishedOn"]
    assert provenance.utc_z("2026-12-01T10:00:00+01:00") == "2026-12-01T09:00:00Z"
    envelope["payload"] = "not base64!"
    path.write_text(json.dumps(envelope))
    with pytest.raises(provenance.ProvenanceError, match="not base64"):
        provenance.verify_model(store, name, version, keys)


def test_missing_public_keys_name_where_they_come_from(tmp_path: Path) -> None:
    with pytest.raises(provenance.ProvenanceError, match="fgov vault bootstrap --provenance-keys-out"):
        provenance.load_public_keys(tmp_path / "nope.json")


def test_the_model_signing_bundle_verifies_with_the_openssf_tool(signed, tmp_path: Path) -> None:
    """``model.sig`` as the promotion writes it, checked by ``model_signing verify key`` (PyPI ``model-signing``,
    the OpenSSF tool) with only the public key: it passes, and fails once a file changes."""
    import subprocess

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    store, name, version, _, _ = signed
    key = ec.generate_private_key(ec.SECP256R1())  # the transit key's kind; a local one stands in for OpenBao here
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    folder = store.path(name, version)
    bundle = provenance.model_signing_bundle(provenance.model_signing_statement(folder, name), pem,
                                             lambda message: ("", key.sign(message, ec.ECDSA(hashes.SHA256()))))
    provenance.write_file(folder / provenance.MODEL_SIGNATURE, bundle)
    (tmp_path / "key.pub").write_text(pem)

    def verify() -> subprocess.CompletedProcess[str]:
        return model_signing_verify(folder, tmp_path / "key.pub")

    ok = verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert provenance.verify_model(store, name, version, signed[3])  # the SLSA envelope ignores model.sig
    (folder / "adapter_config.json").write_text('{"r": 64}')
    bad = verify()
    assert bad.returncode != 0 and "adapter_config.json" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
