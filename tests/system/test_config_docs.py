"""docs/configuration.md is generated from the settings classes and must match them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_page_is_current_and_every_field_documented() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_config_docs

    text = gen_config_docs.render()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert text == committed, "run: .venv/bin/python scripts/gen_config_docs.py"
    undocumented = [line for line in text.splitlines() if line.startswith("| `")
                    and line.rstrip().endswith("|  |")]
    assert not undocumented, undocumented


def test_validate_config_reports_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("node: n1\nmqtt: {port: 99999, hots: x}\n"
                   "cameras: [{name: Cam, url: 'test://pattern', model: m}]\n")
    r = subprocess.run([sys.executable, "-m", "edge_agent", "validate-config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "mqtt.port:" in r.stderr and "99999" in r.stderr
    assert "mqtt.hots: unknown key" in r.stderr
    assert "cameras.0.name:" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_config_unreadable_and_not_yaml(tmp_path: Path) -> None:
    for content, expect in ((None, "cannot read config"), ("a: [1,", "not valid YAML"),
                            ("- 1\n- 2\n", "must be a mapping")):
        cfg = tmp_path / "c.yaml"
        if content is not None:
            cfg.write_text(content)
        r = subprocess.run([sys.executable, "-m", "edge_agent", "validate-config",
                            str(cfg if content is not None else tmp_path / "missing.yaml")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert expect in r.stderr and "Traceback" not in r.stderr
