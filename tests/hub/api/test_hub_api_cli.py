"""``edge-hub`` as a user runs it: ``serve`` in a child process, ``keygen`` and ``models``
verbs against it over HTTP, with their outputs and exit codes. The client verbs run in this
process (``hub.cli.main``) to keep the test fast; one push runs as a child on a real terminal."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.cli import main
from tests.support.hub_client import (
    READ_TOKEN,
    ROOT,
    TOKEN,
    HubProcess,
    default_pki,
    hub_process,
    tls_api,
    write_secret,
)
from tests.support.hub_models import write_model
from tests.support.inproc import Result, run_main


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with hub_process(tmp_path_factory.mktemp("hub")) as h:
        yield h


def cli(*argv: str, hub: HubProcess | None = None, token: str | None = TOKEN,
        **env: str) -> Result:
    """Run ``edge-hub ARGV`` in this process (the hub it talks to is a real child process)."""
    if hub is not None:
        env.setdefault("EDGE_HUB_URL", hub.url)
        env.setdefault("EDGE_HUB_CA_FILE", str(default_pki().ca_file))
    if token is not None:
        env.setdefault("EDGE_HUB_TOKEN", token)
    return run_main(main, argv, env=env, clear_prefix="EDGE_HUB_")


def test_push_list_show_pull_rm(hub: HubProcess, tmp_path: Path) -> None:
    onnx, _ = write_model(tmp_path / "m", name="cli-model", version="1")
    assert cli("keygen", str(tmp_path / "keys" / "rel")).returncode == 0
    key, pub = tmp_path / "keys" / "rel.key", tmp_path / "keys" / "rel.pub"
    assert key.stat().st_mode & 0o777 == 0o600

    r = cli("models", "push", str(onnx), "--name", "cli-model", "--version", "2.0.1",
            "--sign", str(key), "--notes", "from the cli", hub=hub)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pushed: cli-model 2.0.1") and "signed=true" in r.stdout
    assert "replaced by '2.0.1'" in r.stderr  # the manifest said version 1
    r = cli("models", "push", str(onnx), "--name", "cli-model", "--version", "2.0.1",
            "--sign", str(key), "--notes", "again", hub=hub)
    assert r.returncode == 0 and "already present" in r.stdout, r.stderr

    r = cli("models", "list", "--json", hub=hub)
    versions = json.loads(r.stdout)["versions"]
    mine = [v for v in versions if v["name"] == "cli-model"]
    assert [(v["version"], v["notes"], v["signed"]) for v in mine] == [
        ("2.0.1", "from the cli", True)]
    r = cli("models", "list", "--name", "cli-model", hub=hub)
    assert r.returncode == 0 and "NAME" in r.stdout and "2.0.1" in r.stdout

    r = cli("models", "show", "cli-model", "2.0.1", "--json", hub=hub)
    shown = json.loads(r.stdout)
    assert shown["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    r = cli("models", "show", "cli-model", "2.0.1", hub=hub)
    assert "manifest sha256" in r.stdout and shown["sha256"] in r.stdout

    out = tmp_path / "pulled"
    r = cli("models", "pull", "cli-model", "2.0.1", "-o", str(out), "--verify-key", str(pub),
            "--json", hub=hub)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["signature_verified"] is True and res["resumed"] is False
    pulled = Path(res["path"])
    assert pulled.read_bytes() == onnx.read_bytes()
    assert json.loads(Path(res["manifest"]).read_bytes())["version"] == "2.0.1"

    # resume: a partial file from an interrupted pull is continued with a Range request
    out2 = tmp_path / "resumed"
    out2.mkdir()
    (out2 / (pulled.name + ".part")).write_bytes(onnx.read_bytes()[:100])
    r = cli("models", "pull", "cli-model", "2.0.1", "-o", str(out2), "--json", hub=hub)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"] is True
    assert (out2 / pulled.name).read_bytes() == onnx.read_bytes()

    # a corrupt partial file is caught by the digest and removed
    out3 = tmp_path / "corrupt"
    out3.mkdir()
    (out3 / (pulled.name + ".part")).write_bytes(b"\xff" * 100)
    r = cli("models", "pull", "cli-model", "2.0.1", "-o", str(out3), hub=hub)
    assert r.returncode == 1 and "sha256" in r.stderr
    assert not (out3 / (pulled.name + ".part")).exists() and not (out3 / pulled.name).exists()

    # the wrong public key fails verification
    assert cli("keygen", str(tmp_path / "keys" / "other")).returncode == 0
    r = cli("models", "pull", "cli-model", "2.0.1", "-o", str(tmp_path / "o4"),
            "--verify-key", str(tmp_path / "keys" / "other.pub"), hub=hub)
    assert r.returncode == 1 and "signature" in r.stderr
    assert not (tmp_path / "o4" / pulled.name).exists()

    r = cli("models", "rm", "cli-model", "2.0.1", hub=hub)
    assert r.returncode == 0 and "deleted" in r.stdout
    r = cli("models", "show", "cli-model", "2.0.1", hub=hub)
    assert r.returncode == 1 and "not found" in r.stderr


def test_cli_errors_and_exit_codes(hub: HubProcess, tmp_path: Path) -> None:
    onnx, manifest = write_model(tmp_path / "m", name="err-model")
    push = ["models", "push", str(onnx), "--name", "err-model", "--version", "1"]

    r = cli("models", "push", str(onnx), "--name", "../x", "--version", "1", hub=hub)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid model name" in r.stderr
    r = cli("models", "push", str(tmp_path / "nope.onnx"), "--name", "a", "--version", "1",
            hub=hub)
    assert r.returncode == 2 and "no such file" in r.stderr
    manifest.unlink()
    r = cli(*push, hub=hub)
    assert r.returncode == 2 and "no manifest" in r.stderr
    onnx, manifest = write_model(tmp_path / "m", name="err-model")

    r = cli(*push, hub=hub, token=None)
    assert r.returncode == 1 and "unauthorized" in r.stderr
    wrong = write_secret(tmp_path / "wrong", "nope")
    r = cli(*push, "--token-file", str(wrong), hub=hub)
    assert r.returncode == 1 and "unknown bearer token" in r.stderr
    r = cli(*push, hub=hub, token=READ_TOKEN)
    assert r.returncode == 1 and "forbidden" in r.stderr and "scope read" in r.stderr
    assert cli("models", "list", hub=hub, token=READ_TOKEN).returncode == 0
    wrong.chmod(0o644)  # a token file anyone on the box can read is refused, not sent
    r = cli(*push, "--token-file", str(wrong), hub=hub)
    assert r.returncode == 2 and "readable by other users" in r.stderr
    # a hub whose certificate the CA file does not vouch for: no request is made
    stranger = tmp_path / "stranger-ca.crt"
    stranger.write_bytes(default_pki().authority.issue("x", "server").cert_pem)
    r = cli("models", "list", hub=hub, EDGE_HUB_CA_FILE=str(stranger))
    assert r.returncode == 3 and "TLS with the hub" in r.stderr
    # a token never crosses the network in clear: refused before any connection
    r = cli("models", "list", hub=hub, EDGE_HUB_URL="http://192.0.2.1:8081")
    assert r.returncode == 2 and "over plain HTTP" in r.stderr

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model" * 10)
    r = cli("models", "push", str(junk), "--manifest", str(manifest), "--name", "err-model",
            "--version", "1", hub=hub)
    assert r.returncode == 1 and "manifest_mismatch" in r.stderr  # its sha256 is not junk's
    r = cli("models", "list", hub=hub, EDGE_HUB_URL="http://127.0.0.1:9")
    assert r.returncode == 3 and "cannot reach the hub" in r.stderr
    r = cli("models", "push", str(onnx), hub=hub)
    assert r.returncode == 2 and "--name" in r.stderr
    r = cli("models", "list", hub=hub)
    assert "err-model" not in r.stdout  # nothing was stored by any of the refusals


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    r = cli("serve", "--port", "99999", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "api.port" in r.stderr
    cfg = tmp_path / "hub.yaml"
    cfg.write_text("api:\n  prot: 1\n")
    r = cli("serve", "--config", str(cfg))
    assert r.returncode == 2 and "api.prot: unknown key" in r.stderr
    r = cli("serve", "--data-dir", str(tmp_path), "--plain-http", "--token-file",
            str(tmp_path / "missing"))
    assert r.returncode == 2 and "api.token_file" in r.stderr
    # HTTPS by default: no certificate, no start
    r = cli("serve", "--data-dir", str(tmp_path), "--port", "0")
    assert r.returncode == 2 and "api.tls_cert_file" in r.stderr
    tls = tls_api()
    exposed = tmp_path / "exposed.key"
    exposed.write_bytes(Path(tls["tls_key_file"]).read_bytes())
    exposed.chmod(0o644)
    r = cli("serve", "--data-dir", str(tmp_path), "--port", "0", "--tls-cert-file",
            tls["tls_cert_file"], "--tls-key-file", str(exposed))
    assert r.returncode == 2 and "api.tls_key_file" in r.stderr
    assert "readable by other users" in r.stderr


def test_push_shows_a_progress_bar_on_a_terminal(hub: HubProcess, tmp_path: Path) -> None:
    onnx, _ = write_model(tmp_path / "m", name="tty-model")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_HUB_")}
    env.update(PYTHONPATH=str(ROOT), EDGE_HUB_URL=hub.url, EDGE_HUB_TOKEN=TOKEN,
               EDGE_HUB_CA_FILE=str(default_pki().ca_file), COLUMNS="120", TERM="xterm")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub", "models", "push", str(onnx), "--name", "tty-model",
         "--version", "1"], stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "push tty-model 1" in screen and "pushed: tty-model 1" in screen
    # one unit system: the bar, its speed and the summary line all in binary units
    assert not re.search(r"\d ?(kB|MB|GB)\b", screen), screen


def test_a_missing_token_is_named_with_how_to_pass_one(hub: HubProcess, tmp_path: Path) -> None:
    onnx, _ = write_model(tmp_path / "m", name="no-token-model")
    r = cli("models", "push", str(onnx), "--name", "no-token-model", "--version", "1",
            hub=hub, token=None)
    assert r.returncode == 1, r.stderr
    assert "--token-file" in r.stderr and "EDGE_HUB_TOKEN" in r.stderr
    assert "no token was sent" in r.stderr
    r = cli("models", "push", str(onnx), "--name", "no-token-model", "--version", "1",
            hub=hub, token="not-the-token")
    assert r.returncode == 1 and "was not accepted" in r.stderr, r.stderr


def test_serve_names_an_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    r = cli("serve", "--data-dir", str(tmp_path / "a-file" / "hub"), "--plain-http",
            "--host", "127.0.0.1", "--port", "0")
    assert r.returncode == 2, r.stderr
    assert "storage.data_dir: cannot use it: Not a directory" in r.stderr
    assert "cannot listen" not in r.stderr
