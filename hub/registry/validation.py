"""What a pushed model must pass: the agent's own manifest and graph checks, and the hub's caps.

The checks live once, in the contract (``edge_agent.contract.manifest`` and ``graph``), and
this module calls exactly that code, so the hub accepts a model when and only when an agent
would load it, and refuses it at push time, where a person is watching, rather than on a
hundred nodes during a rollout. What is the hub's own here: the size cap on manifest bytes, the
facts the registry keeps, and the mapping of a contract ``Rejection`` to an ``ArtifactRejected``
whose JSON error carries the rejection's ``reason`` and ``message`` unchanged beside the
broader ``code`` (``manifest_invalid``, ``manifest_mismatch``, ``not_onnx``).

``check_onnx`` is blocking (onnxruntime parses and builds the graph): call it in a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.contract import graph
from edge_agent.contract import manifest as manifests
from edge_agent.contract.rejection import Reason, Rejection
from hub.errors import ArtifactRejected

#: Largest manifest accepted, bytes. ImageNet's 1000 labels are ~20 KB; 1 MiB is ample.
MAX_MANIFEST_BYTES = 1024 * 1024


class ManifestInvalid(ArtifactRejected, code="manifest_invalid"):
    """The manifest is not JSON or does not follow the contract's schema."""


class ManifestMismatch(ArtifactRejected, code="manifest_mismatch"):
    """The manifest does not describe the uploaded model (digest, input, outputs, name)."""


class NotOnnx(ArtifactRejected, code="not_onnx"):
    """The upload does not parse or load as an ONNX model in onnxruntime."""


@dataclass(frozen=True)
class ManifestFacts:
    """What the hub keeps from a checked manifest (the full bytes are stored verbatim)."""

    #: The decoded JSON object, as pushed.
    data: dict[str, Any]
    name: str
    version: str
    task: str
    sha256: str
    #: The contract's validated manifest (what ``check_onnx`` checks the graph against).
    manifest: manifests.ModelManifest


def _refused(cls: type[ArtifactRejected], exc: Rejection) -> ArtifactRejected:
    return cls(exc.message, reason=exc.reason.value)


def parse_manifest(raw: bytes) -> ManifestFacts:
    """Parse and check a manifest; raise ManifestInvalid naming the first bad field."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = manifests.parse_json(raw)
    except Rejection as exc:
        raise _refused(ManifestInvalid, exc) from exc
    # the object the contract accepted is valid JSON: decoding it again cannot fail
    data = json.loads(raw)
    return ManifestFacts(data=data, name=manifest.name, version=manifest.version,
                         task=manifest.task, sha256=manifest.sha256, manifest=manifest)


def check_onnx(path: Path, manifest: manifests.ModelManifest | dict[str, Any]) -> None:
    """Load ``path`` in onnxruntime and check it against the manifest (blocking).

    Raises NotOnnx when onnxruntime cannot load it, ManifestMismatch when its graph disagrees
    with the manifest, ManifestInvalid for a manifest object the contract refuses.
    """
    if not isinstance(manifest, manifests.ModelManifest):
        try:
            manifest = manifests.parse_manifest(manifest)
        except Rejection as exc:
            raise _refused(ManifestInvalid, exc) from exc
    # bytes, as the agent loads them: onnxruntime's messages then name no local path
    data = path.read_bytes()
    try:
        graph.check_model(data, manifest)
    except Rejection as exc:
        raise _refused(NotOnnx if exc.reason is Reason.NOT_ONNX else ManifestMismatch,
                       exc) from exc
