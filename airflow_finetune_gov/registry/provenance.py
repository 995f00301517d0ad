"""Signed provenance for promoted models: an in-toto Statement with a SLSA provenance v1 predicate, in a
DSSE envelope signed by a key that never leaves OpenBao (its transit engine).

- **Statement** (``build_statement``): subject = every file of the model version with its sha256;
  ``buildDefinition.externalParameters`` = the run's conf and hyperparameters, the dataset and target
  environment as approved; ``resolvedDependencies`` = the base model (its manifest sha256) and the
  dataset (its content sha256, the rows trained on); ``runDetails.metadata.invocationId`` =
  ``dag_id/run_id``; plus the approval (who, tier, policy sha256) and the evaluation verdict.
- **Envelope** (DSSE v1): ``payloadType`` ``application/vnd.in-toto+json``, the statement base64, and
  a signature over DSSE's pre-authentication encoding (PAE), made by OpenBao's transit engine
  (``ed25519`` key, not exportable); ``keyid`` = ``<mount>/<key>:v<N>``.
- **Verification** (``verify_model``) needs only the public keys (``provenance_keys`` file, written when
  OpenBao is bootstrapped): the signature, the statement's shape, and that every file on disk has the
  digest in the subject and no file is missing or added. Pure Python + ``cryptography``.
- **OpenSSF model signing** (``model_signing_bundle``): besides the SLSA envelope, ``model.sig`` in the
  version's folder is a Sigstore bundle v0.3 whose DSSE payload is the ``https://model_signing/signature/v1.0``
  predicate over every file of the folder (but the two signatures), signed by a transit ECDSA P-256 key
  (``[finetune_gov] model_signing_key``): ``model_signing verify key --signature DIR/model.sig
  --public_key model-signing.pub.pem DIR`` (the OpenSSF tool, PyPI ``model-signing``) checks it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_finetune_gov.registry.store import ModelStore, file_sha256

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/airflow-finetune-gov/airflow-finetune-gov/governed-finetune/v1"
ENVELOPE_FILE = "provenance.dsse.json"
MODEL_SIGNATURE = "model.sig"  # the OpenSSF model-signing bundle (its CLI's default name)
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# What the model-signing manifest leaves out: the signatures (written after it) and VCS metadata, as the tool does
MODEL_SIGNING_IGNORED = (ENVELOPE_FILE, MODEL_SIGNATURE, ".git", ".gitattributes", ".github", ".gitignore")

Signer = Callable[[bytes], tuple[str, bytes]]  # PAE bytes -> (keyid, signature)


class ProvenanceError(RuntimeError):
    """Missing, unsigned, forged or mismatched provenance; the message says which."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def model_files(store: ModelStore, name: str, version: str) -> dict[str, str]:
    """sha256 of every file of the version on disk (not the manifest, not the envelope)."""
    folder = store.path(name, version)
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("manifest.json", ENVELOPE_FILE, MODEL_SIGNATURE)}


def utc_z(timestamp: str | None) -> str | None:
    """An ISO 8601 timestamp in UTC with the ``Z`` suffix (what SLSA's examples and most verifiers expect)."""
    if timestamp is None:
        return None
    parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def b64decode_either(value: str) -> bytes:
    """Standard or URL-safe base64, padded or not: DSSE verifiers MUST accept either encoding."""
    text = value.strip().translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise ProvenanceError("a DSSE payload or signature is not base64 (standard or URL-safe)") from None


def build_statement(*, store: ModelStore, tuned: dict[str, Any], approval: dict[str, Any],
                    evaluation: dict[str, Any], dag_id: str, run_id: str, conf: dict[str, Any] | None,
                    started_on: str | None = None) -> dict[str, Any]:
    """The in-toto statement for ``tuned`` (a ``tuning.completed`` payload) as approved and evaluated."""
    name, version = tuned["model"], tuned["version"]
    files = model_files(store, name, version)
    if tuned.get("base_version"):
        base = store.manifest(tuned["base_model"], tuned["base_version"])
        base_dependency = {"uri": f"model-store:{tuned['base_model']}@{tuned['base_version']}",
                           "digest": {"sha256": base["sha256"]}}
    else:  # a remote fine-tune: the provider's base model, by name (the provider publishes no digest)
        base_dependency = {"uri": f"{tuned.get('endpoint') or 'remote'}#model={tuned['base_model']}",
                           "name": tuned["base_model"]}
    digest = approval.get("dataset_digest") or {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"{name}/{version}/{fname}", "digest": {"sha256": sha}} for fname, sha in files.items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "run_conf": conf or {},
                    "hyperparameters": tuned.get("hyperparameters") or approval.get("hyperparameters") or {},
                    "dataset": approval["dataset"], "target_environment": approval["target_environment"],
                    "backend": tuned.get("backend"),
                },
                "internalParameters": {
                    "policy_sha256": approval["policy_sha256"],
                    "approval": {"approval_id": approval["approval_id"], "tier": approval["tier"],
                                 "approvers": approval["approvers"], "requester": approval["requester"]},
                    "evaluation": {"evaluation_id": evaluation.get("evaluation_id"),
                                   "verdict": evaluation["verdict"], "reviewed_by": evaluation.get("reviewed_by"),
                                   "suites": evaluation.get("suites"),
                                   "report_sha256": evaluation.get("report_sha256")},
                },
                "resolvedDependencies": [
                    base_dependency,
                    {"uri": tuned.get("dataset_uri") or digest.get("uri") or f"dataset:{approval['dataset']}",
                     "digest": {"sha256": tuned["content_sha256"]},
                     "annotations": {"rows": tuned.get("rows")}},
                ],
            },
            "runDetails": {
                "builder": {"id": f"{BUILD_TYPE}#{dag_id}"},
                "metadata": {"invocationId": f"{dag_id}/{run_id}", "startedOn": utc_z(started_on),
                             "finishedOn": utc_z(datetime.now(UTC).isoformat())},
            },
        },
    }


def sign(statement: dict[str, Any], signer: Signer) -> dict[str, Any]:
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    keyid, signature = signer(pae(PAYLOAD_TYPE, payload))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(signature).decode()}]}


def transit_signer(client: Any, mount: str, key: str) -> Signer:
    """Sign with OpenBao's transit key ``key`` (the private key never leaves OpenBao)."""
    def signer(message: bytes) -> tuple[str, bytes]:
        resp = client.secrets.transit.sign_data(name=key, hash_input=base64.b64encode(message).decode(),
                                                mount_point=mount)
        prefix, _, version_sig = resp["data"]["signature"].partition(":")  # vault:v1:<base64>
        version, _, sig = version_sig.partition(":")
        if prefix != "vault" or not version.startswith("v"):
            raise ProvenanceError(f"unexpected transit signature format from {mount}/{key}")
        return f"{mount}/{key}:{version}", base64.b64decode(sig)
    return signer


def transit_public_keys(client: Any, mount: str, key: str) -> dict[str, str]:
    """``{keyid: PEM}`` for every version of the transit key (what ``verify`` needs)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = client.secrets.transit.read_key(name=key, mount_point=mount)["data"]
    if data.get("type") != "ed25519":
        raise ProvenanceError(f"transit key {mount}/{key} is {data.get('type')}, not ed25519")
    out = {}
    for version, info in sorted(data["keys"].items(), key=lambda kv: int(kv[0])):
        raw = base64.b64decode(info["public_key"])
        pem = Ed25519PublicKey.from_public_bytes(raw).public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        out[f"{mount}/{key}:v{version}"] = pem.decode()
    return out


def load_public_keys(path: str | Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"cannot read the provenance public keys from {path}: {exc}; they are written by "
                              "`fgov stack up` / `fgov vault bootstrap --provenance-keys-out`") from None
    return {str(k): str(v) for k, v in data["keys"].items()}


def verify_envelope(envelope: dict[str, Any], public_keys: dict[str, str]) -> dict[str, Any]:
    """The statement, if one signature verifies with a known key; else :class:`ProvenanceError`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if envelope.get("payloadType") != PAYLOAD_TYPE or not envelope.get("signatures"):
        raise ProvenanceError("not a signed in-toto DSSE envelope")
    payload = b64decode_either(str(envelope["payload"]))
    for sig in envelope["signatures"]:
        pem = public_keys.get(str(sig.get("keyid")))
        if pem is None:
            continue
        key = load_pem_public_key(pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ProvenanceError(f"key {sig['keyid']} is not ed25519")
        try:
            key.verify(b64decode_either(str(sig["sig"])), pae(PAYLOAD_TYPE, payload))
        except (InvalidSignature, ValueError):
            raise ProvenanceError(f"signature by {sig['keyid']} does not verify: the statement was altered "
                                  "or not signed by that key") from None
        statement: dict[str, Any] = json.loads(payload)
        if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
            raise ProvenanceError("the signed payload is not an in-toto statement with a SLSA v1 predicate")
        return statement
    known = ", ".join(sorted(public_keys)) or "none"
    raise ProvenanceError(f"no signature by a known key (signed by "
                          f"{', '.join(str(s.get('keyid')) for s in envelope['signatures'])}; known: {known})")


def model_signing_statement(folder: Path, name: str) -> dict[str, Any]:
    """The in-toto statement of OpenSSF model signing v1.0 for ``folder`` (files at its top level; the
    signatures and VCS metadata left out): each file's sha256 as a resource, in name order, and as subject
    the model's name with the sha256 over those digests' bytes, in that order (the tool's manifest digest)."""
    import hashlib

    resources, root = [], hashlib.sha256()
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name in MODEL_SIGNING_IGNORED or not p.is_file():
            continue
        digest = file_sha256(p)
        root.update(bytes.fromhex(digest))
        resources.append({"name": p.name, "algorithm": "sha256", "digest": digest})
    return {"_type": STATEMENT_TYPE, "subject": [{"name": name, "digest": {"sha256": root.hexdigest()}}],
            "predicateType": MODEL_SIGNING_PREDICATE,
            "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                                            "ignore_paths": list(MODEL_SIGNING_IGNORED)},
                          "resources": resources}}


def model_signing_bundle(statement: dict[str, Any], public_key_pem: str, signer: Signer) -> dict[str, Any]:
    """A Sigstore bundle v0.3 carrying the statement in a DSSE envelope signed by ``signer`` (ECDSA, DER), with
    the key named as the tool names it: the sha256 of its PEM (SubjectPublicKeyInfo), no transparency log."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key_pem.encode())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    _, signature = signer(pae(PAYLOAD_TYPE, payload))
    return {"mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": hashlib.sha256(pem).hexdigest()}, "tlogEntries": []},
            "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
                             "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}]}}


def transit_public_key(client: Any, mount: str, key: str) -> str:
    """The PEM of the newest version of transit key ``key`` (an ECDSA key: transit hands out its PEM)."""
    data = client.secrets.transit.read_key(name=key, mount_point=mount)["data"]
    latest = str(data.get("latest_version") or max(int(v) for v in data["keys"]))
    return str(data["keys"][latest]["public_key"])


def write_file(path: Path, document: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2))
    tmp.replace(path)
    return path


def write(store: ModelStore, name: str, version: str, envelope: dict[str, Any]) -> Path:
    path = store.path(name, version) / ENVELOPE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(envelope, indent=2))
    tmp.replace(path)
    return path


def verify_model(store: ModelStore, name: str, version: str, public_keys: dict[str, str]) -> dict[str, Any]:
    """Check version ``name``/``version``'s provenance: signed by a known key, and naming exactly the files
    on disk with their digests. Returns the statement; raises :class:`ProvenanceError` naming the problem."""
    path = store.path(name, version) / ENVELOPE_FILE
    if not path.exists():
        raise ProvenanceError(f"{name} {version} has no signed provenance ({ENVELOPE_FILE}): it was never promoted "
                              "through the governed path")
    try:
        envelope = json.loads(path.read_text())
    except ValueError:
        raise ProvenanceError(f"{path} is not JSON") from None
    statement = verify_envelope(envelope, public_keys)
    prefix = f"{name}/{version}/"
    signed = {s["name"].removeprefix(prefix): s["digest"]["sha256"] for s in statement["subject"]
              if s["name"].startswith(prefix)}
    if len(signed) != len(statement["subject"]):
        raise ProvenanceError(f"the signed statement is about another model, not {name} {version}")
    on_disk = model_files(store, name, version)
    problems = [f"{f}: digest differs from the signed provenance" for f in sorted(signed.keys() & on_disk.keys())
                if signed[f] != on_disk[f]]
    problems += [f"{f}: missing" for f in sorted(signed.keys() - on_disk.keys())]
    problems += [f"{f}: not in the signed provenance" for f in sorted(on_disk.keys() - signed.keys())]
    if problems:
        raise ProvenanceError(f"{name} {version} does not match its signed provenance: {'; '.join(problems)}")
    return statement
