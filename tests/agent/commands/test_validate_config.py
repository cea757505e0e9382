"""``edge-agent validate-config`` checks the files a config names, as the node would use them.

A fresh K3s node has no certificate yet (the bootstrap writes it at start), so with
``identity.bootstrap`` the node's certificate and key may be missing; every other file (the CA
bundles, the signing key, the projected token) must be there, and without the bootstrap the
certificate and key too. Secret files readable by others are refused as the agent refuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.cli import main
from tests.support.inproc import Result, run_main
from tests.support.pki import TestPki


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """What a node's pod mounts: the fleet CA, the release key, the projected token; the
    identity folder on the state volume exists but is empty (nothing bootstrapped yet)."""
    pki = TestPki(tmp_path / "pki")
    (tmp_path / "ca.crt").write_bytes(pki.ca_file.read_bytes())
    (tmp_path / "signing.pub").write_text("-----BEGIN PUBLIC KEY-----\n")
    (tmp_path / "token").write_text("eyJ...")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "identity").mkdir()
    return tmp_path


def k3s_like(site: Path, *, bootstrap: bool = True, **sections: Any) -> dict[str, Any]:
    """The K3s agent config's shape, with the files in ``site``."""
    cert, key = str(site / "identity" / "tls.crt"), str(site / "identity" / "tls.key")
    cfg: dict[str, Any] = {
        "node": "box-1",
        "mqtt": {"ca_file": str(site / "ca.crt"), "cert_file": cert, "key_file": key},
        "identity": {"bootstrap": bootstrap, "token_file": str(site / "token")},
        "hub": {"url": "https://edge-hub:8081", "ca_file": str(site / "ca.crt"),
                "cert_file": cert, "key_file": key,
                "public_key_file": str(site / "signing.pub")},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


def validate(site: Path, cfg: dict[str, Any], *flags: str) -> Result:
    path = site / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_main(main, ["validate-config", *flags, str(path)], clear_prefix="EDGE_AGENT_")


def errors(r: Result) -> dict[str, str]:
    """field -> message line, from the one-line-per-field output."""
    out = {}
    for line in r.stderr.splitlines():
        head, _, rest = line.removeprefix("edge-agent: error: ").partition(": ")
        out[head] = rest
    return out


def test_a_fresh_node_with_bootstrap_needs_no_certificate_yet(site: Path) -> None:
    r = validate(site, k3s_like(site))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: node=box-1")


def test_with_bootstrap_everything_else_is_still_checked(site: Path) -> None:
    (site / "ca.crt").unlink()
    (site / "token").unlink()
    r = validate(site, k3s_like(site, hub={"public_key_file": str(site / "nope.pub")}))
    assert r.returncode == 2
    found = errors(r)
    assert set(found) == {"mqtt.ca_file", "hub.ca_file", "hub.public_key_file",
                          "identity.token_file"}, r.stderr
    assert "No such file" in found["mqtt.ca_file"] and str(site / "ca.crt") in found["hub.ca_file"]
    assert "Traceback" not in r.stderr


def test_a_hub_certificate_elsewhere_is_not_the_bootstraps_to_write(site: Path) -> None:
    other = str(site / "manual" / "hub.crt")
    r = validate(site, k3s_like(site, hub={"cert_file": other,
                                           "key_file": str(site / "manual" / "hub.key")}))
    assert r.returncode == 2
    assert set(errors(r)) == {"hub.cert_file", "hub.key_file"}, r.stderr


def test_without_bootstrap_missing_tls_files_are_field_errors(site: Path) -> None:
    r = validate(site, k3s_like(site, bootstrap=False))
    assert r.returncode == 2
    found = errors(r)
    assert set(found) == {"mqtt.cert_file", "mqtt.key_file", "hub.cert_file", "hub.key_file"}
    assert "cannot read TLS file" in found["mqtt.cert_file"]
    # once they are there (a static site's edge-hub pki issue), the config is fine
    pki = TestPki(site / "pki2")
    ident = pki.identity("box-1", "agent")
    (site / "identity" / "tls.crt").write_bytes(ident.cert_file.read_bytes())
    (site / "identity" / "tls.key").write_bytes(ident.key_file.read_bytes())
    (site / "identity" / "tls.key").chmod(0o600)
    r = validate(site, k3s_like(site, bootstrap=False))
    assert r.returncode == 0, r.stderr


def test_secret_files_readable_by_others_are_refused(site: Path) -> None:
    (site / "identity" / "tls.crt").write_text("cert")
    (site / "identity" / "tls.key").write_text("key")
    (site / "identity" / "tls.key").chmod(0o644)
    (site / "infer-token").write_text("t")
    (site / "infer-token").chmod(0o604)
    cfg = k3s_like(site, bootstrap=False, http={"token_file": str(site / "infer-token")})
    r = validate(site, cfg)
    assert r.returncode == 2
    found = errors(r)
    assert set(found) == {"mqtt.key_file", "hub.key_file", "http.token_file"}, r.stderr
    assert "readable by other users" in found["mqtt.key_file"]
    assert "chmod 600" in found["http.token_file"]
    # the agent would read them with a warning under secret_files: warn, so that passes
    r = validate(site, {**cfg, "secret_files": "warn"})
    assert r.returncode == 0, r.stderr


def test_no_files_checks_the_settings_alone(site: Path) -> None:
    (site / "ca.crt").unlink()
    cfg = k3s_like(site, bootstrap=False)
    assert validate(site, cfg, "--no-files").returncode == 0
    # a bad setting is still one
    cfg["mqtt"]["port"] = 0
    r = validate(site, cfg, "--no-files")
    assert r.returncode == 2 and "mqtt.port" in errors(r), r.stderr


def test_a_missing_or_broken_manifest_or_model_file_is_a_field_error(site: Path) -> None:
    good = Path("models/out/tiny-classifier/manifest.json").resolve()
    models = [{"name": "ok", "manifest": str(good)},
              {"name": "gone", "manifest": str(site / "nowhere" / "manifest.json")},
              {"name": "broken", "manifest": str(site / "broken.json")},
              {"name": "no-onnx", "manifest": str(site / "lonely" / "manifest.json")}]
    (site / "broken.json").write_text("{not json")
    (site / "lonely").mkdir()
    (site / "lonely" / "manifest.json").write_bytes(good.read_bytes())  # its .onnx is not there
    r = validate(site, k3s_like(site, models=models))
    assert r.returncode == 2
    found = errors(r)
    assert set(found) == {"models.1.manifest", "models.2.manifest", "models.3.manifest"}, r.stderr
    assert "not found" in found["models.1.manifest"]
    assert "not a usable manifest" in found["models.2.manifest"]
    assert "cannot read" in found["models.3.manifest"] and ".onnx" in found["models.3.manifest"]
    # the good one alone passes
    assert validate(site, k3s_like(site, models=models[:1])).returncode == 0
