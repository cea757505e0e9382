"""``edge-hub pki init`` and ``edge-hub pki issue``, run as a user runs them."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509

from hub.cli import main
from hub.pki import ca
from tests.support.inproc import Result, run_main


def pki(*argv: str, env: dict[str, str] | None = None) -> Result:
    return run_main(main, ["pki", *argv], env=env, clear_prefix="EDGE_HUB_")


def test_init_then_issue_writes_a_ca_and_a_party_with_private_keys(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = pki("init", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    assert "ca.key" in r.stdout and "keep it secret" in r.stdout
    r = pki("issue", "cam-box-1", "--role", "agent", "--dir", str(d), "--out",
            str(tmp_path / "node"), "--days", "30")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "node"
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert ca.identity((out / "tls.crt").read_bytes()) == ("cam-box-1", "agent")
    assert (out / "ca.crt").read_bytes() == (d / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((d / "ca.crt").read_bytes()))
    assert f"{cert.serial_number:x}" in r.stdout


def test_the_default_folder_is_under_the_hubs_data_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"storage:\n  data_dir: {tmp_path / 'data'}\n")
    assert pki("init", "--config", str(cfg)).returncode == 0
    assert (tmp_path / "data" / "pki" / "ca.key").exists()
    # the environment says where, as for `serve`
    r = pki("init", env={"EDGE_HUB_PKI__DIR": str(tmp_path / "env-ca")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "env-ca" / "ca.crt").exists()
    r = pki("issue", "s", "--role", "server", "--dns", "hub.local", "--ip", "127.0.0.1",
            "--config", str(cfg), "--out", str(tmp_path / "srv"))
    assert r.returncode == 0, r.stderr
    assert ca.identity((tmp_path / "srv" / "tls.crt").read_bytes()) == ("s", "server")


def test_refusals_are_one_clear_line_and_change_nothing(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = pki("issue", "n1", "--role", "agent", "--dir", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "edge-hub pki init" in r.stderr
    assert not (tmp_path / "o").exists()
    assert pki("init", "--dir", str(d)).returncode == 0
    key = (d / "ca.key").read_bytes()
    r = pki("init", "--dir", str(d))
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (d / "ca.key").read_bytes() == key
    cases = [
        (["n1", "--role", "server"], "--dns or --ip"),
        (["n1", "--role", "agent", "--dns", "x.local"], "for --role server"),
        (["Not_A_Node", "--role", "agent"], "not a node name"),
        # a consumer or hub named like a node would get that node's topics on the broker
        (["dash", "--role", "consumer"], "could be a node name"),
        (["box-1", "--role", "hub"], "could be a node name"),
        (["n1", "--role", "agent", "--days", "0"], "days"),
        (["s", "--role", "server", "--ip", "300.1.1.1"], "not an IP address"),
    ]
    for argv, words in cases:
        r = pki("issue", *argv, "--dir", str(d), "--out", str(tmp_path / "o"))
        assert r.returncode in (1, 2), (argv, r)
        assert words in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "o").exists()
    r = pki("issue", "n1", "--role", "admin", "--dir", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_issue_never_overwrites_without_force(tmp_path: Path) -> None:
    d, out = tmp_path / "pki", tmp_path / "out"
    assert pki("init", "--dir", str(d)).returncode == 0
    assert pki("issue", "consumer:a", "--role", "consumer", "--dir", str(d), "--out", str(out)
               ).returncode == 0
    r = pki("issue", "consumer:b", "--role", "consumer", "--dir", str(d), "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    assert ca.identity((out / "tls.crt").read_bytes())[0] == "consumer:a"
    r = pki("issue", "consumer:b", "--role", "consumer", "--dir", str(d), "--out", str(out),
            "--force")
    assert r.returncode == 0, r.stderr
    assert ca.identity((out / "tls.crt").read_bytes())[0] == "consumer:b"
