"""The files a config names, checked as the node would use them (``edge-agent validate-config``).

Blocking (it opens files); never run on the event loop. Kept apart from the settings themselves
(``edge_agent.config``), which only parse and validate values.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.common import settings as common_settings
from edge_agent.config import AgentSettings
from edge_agent.contract.manifest import load_manifest, model_path
from edge_agent.contract.rejection import Rejection


def file_problems(settings: AgentSettings) -> list[common_settings.FieldError]:
    """The files the settings name that this process cannot use: one (field, message, path)
    each. Blocking; ``validate-config`` reports these on the box the config is for.

    TLS files (``mqtt``: ``ConnectionSettings.tls_problems``; ``hub``) must be readable, secret
    files (keys, tokens, the password) also not readable by others (``secret_files``). With
    ``identity.bootstrap`` the certificate and key are the bootstrap's to write: a fresh node
    has none yet, so ``mqtt.cert_file``/``key_file`` are skipped, and ``hub.cert_file``/
    ``key_file`` where they name the same files (as they should: nothing writes others).
    """
    m, h = settings.mqtt, settings.hub
    written = {m.cert_file, m.key_file} if settings.identity.bootstrap else set()
    out = [p for p in m.tls_problems() if Path(p[2]) not in written]
    readable = [("hub.ca_file", h.ca_file), ("hub.cert_file", h.cert_file),
                ("hub.public_key_file", h.public_key_file)]
    secrets = [("mqtt.password_file", m.password_file), ("hub.key_file", h.key_file),
               ("hub.token_file", h.token_file), ("http.token_file", settings.http.token_file)]
    if m.tls:
        secrets.append(("mqtt.key_file", m.key_file))
    if settings.identity.bootstrap:
        readable.append(("identity.token_file", settings.identity.token_file))
    for field, path in readable + secrets:
        if path is None or path in written or any(f == field for f, _, _ in out):
            continue
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            out.append((field, f"cannot read: {exc.strerror or exc}", str(path)))
            continue
        if (field, path) in secrets:
            try:
                common_settings.check_secret_file(path, settings.secret_files)
            except OSError as exc:
                out.append((field, str(exc.strerror or exc), str(path)))
    return out + _manifest_problems(settings)


def _manifest_problems(settings: AgentSettings) -> list[common_settings.FieldError]:
    """Each ``models[i].manifest`` must be a valid manifest beside a readable model file."""
    out: list[common_settings.FieldError] = []
    for i, spec in enumerate(settings.models):
        field = f"models.{i}.manifest"
        try:
            manifest = load_manifest(spec.manifest)
            onnx_file = model_path(spec.manifest, manifest)
            with onnx_file.open("rb") as f:
                f.read(1)
        except OSError as exc:
            where = getattr(exc, "filename", None) or spec.manifest
            out.append((field, f"cannot read: {exc.strerror or exc}", str(where)))
        except (Rejection, ValueError) as exc:
            out.append((field, f"not a usable manifest: {str(exc)[:200]}", str(spec.manifest)))
    return out
