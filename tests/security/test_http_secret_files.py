"""Secret files other users can read: refused with the fix in the message, or (``secret_files:
warn``) read with a warning, by the hub, the agent and the CLI alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_agent.common import settings
from hub.cli import main
from tests.support.hub_client import TOKEN, HubProcess, tls_api, write_secret
from tests.support.inproc import run_main


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o660, 0o620])
def test_a_secret_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    f = write_secret(tmp_path / "token", "s3cret")
    f.chmod(mode)
    with pytest.raises(PermissionError, match="chmod 600") as info:
        settings.read_secret(f)
    assert info.value.filename == str(f)
    with capture_logs() as logs:
        assert settings.read_secret(f, "warn") == "s3cret"
    assert [e["event"] for e in logs] == ["secret_file_exposed"]
    f.chmod(0o600)
    assert settings.read_secret(f) == "s3cret"
    f.chmod(0o400)
    assert settings.read_secret(f) == "s3cret"


def test_the_hub_refuses_an_exposed_token_file_unless_told_to_warn(tmp_path: Path) -> None:
    token = write_secret(tmp_path / "token", TOKEN)
    token.chmod(0o644)
    tls = tls_api()
    r = run_main(main, ["serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                        "--token-file", str(token), "--tls-cert-file", tls["tls_cert_file"],
                        "--tls-key-file", tls["tls_key_file"]], clear_prefix="EDGE_HUB_")
    assert r.returncode == 2
    assert "api.token_file" in r.stderr and "readable by other users" in r.stderr
    assert "chmod 600" in r.stderr
    hub = HubProcess(tmp_path / "data", token, env={"EDGE_HUB_SECRET_FILES": "warn"}).start()
    try:
        assert "secret_file_exposed" in hub.log_text()
    finally:
        assert hub.stop() == 0, hub.log_text()[-2000:]
