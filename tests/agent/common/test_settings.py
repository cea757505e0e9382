"""Settings loading both programs share: file, environment, errors as (field, message, value),
secrets from files, and the CLI scaffold that prints those errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from edge_agent.common import cli, settings


class _Inner(settings.Section):
    port: int = Field(1883, ge=1, le=65535)


class _Demo(settings.ProgramSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")

    name: str = "x"
    inner: _Inner = _Inner()


class _Error(Exception):
    exit_code = 1


class _DemoConfigError(settings.ConfigError, _Error):
    exit_code = 2


def test_file_env_and_overrides_layer_in_order(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.json"  # JSON is YAML too
    cfg.write_text(json.dumps({"name": "file", "inner": {"port": 1000}}))
    assert settings.load(_Demo, cfg, {}).inner.port == 1000
    monkeypatch.setenv("DEMO_INNER__PORT", "2000")
    s = settings.load(_Demo, cfg, {})
    assert (s.name, s.inner.port) == ("file", 2000)  # the environment beats the file
    assert settings.load(_Demo, cfg, {"name": "kw"}).name == "kw"


def test_every_problem_is_reported_with_its_field_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inner: {port: 0, prot: 1}\nnmae: y\n")
    with pytest.raises(_DemoConfigError) as info:
        settings.load(_Demo, cfg, {}, _DemoConfigError)
    errors = {path: (msg, value) for path, msg, value in info.value.errors}
    assert errors["inner.port"][1] == 0
    assert errors["inner.prot"] == ("unknown key", 1)
    assert errors["nmae"] == ("unknown key", "y")
    assert info.value.exit_code == 2
    assert "inner.prot: unknown key (got 1)" in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read config"), ("a: [1,", "not valid YAML"), ("- 1\n", "must be a mapping"),
])
def test_unusable_files(tmp_path: Path, content: str | None, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_text(content)
    with pytest.raises(settings.ConfigError, match=message):
        settings.load(_Demo, cfg, {})


def test_an_empty_file_is_all_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# nothing yet\n")
    assert settings.load(_Demo, cfg, {}) == _Demo()


def test_override_names_the_section() -> None:
    with pytest.raises(settings.ConfigError) as info:
        settings.override(_Inner(), "inner", {"port": 99999})
    assert info.value.errors[0][0] == "inner.port" and info.value.errors[0][2] == 99999
    assert settings.override(_Inner(), "inner", {"port": 8}).port == 8


def test_secret_files_lose_their_line_break_only(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cret \r\n")
    f.chmod(0o600)  # a secret no other user can read (tests/security/test_http_secret_files.py)
    assert settings.read_secret(f) == "s3cret "
    with pytest.raises(OSError):
        settings.read_secret(tmp_path / "missing")


def _fail(args: argparse.Namespace) -> int:
    if args.kind == "config":
        raise _DemoConfigError([("a.b", "bad", 1), ("c", "unknown key", "x")])
    if args.kind == "plain":
        raise _Error("it broke")
    return 0


def register(sub: Any) -> None:
    """A verb for the scaffold test (this module is its own verb package)."""
    p = cli.add_verb(sub, "fail", _fail, help="fail on purpose", description="Fails.")
    p.add_argument("kind")


PROGRAM = cli.Program(prog="demo", description="d", version="9.9", commands="tests.agent.common",
                      verbs=("test_settings",), error=_Error)


def test_cli_turns_errors_into_lines_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(PROGRAM, ["fail", "config"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "demo: error: a.b: bad (got 1)", "demo: error: c: unknown key (got 'x')"]
    assert cli.main(PROGRAM, ["fail", "plain"]) == 1
    assert capsys.readouterr().err == "demo: error: it broke\n"
    assert cli.main(PROGRAM, ["fail", "none"]) == 0
    with pytest.raises(SystemExit) as info:
        cli.main(PROGRAM, ["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == "demo 9.9\n"
