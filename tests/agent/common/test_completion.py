"""Shell completion for both CLIs: the script each prints, loaded into a real bash, completes
verbs, actions and flags from the same parsers ``--help`` shows."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


@functools.cache
def script(prog: str) -> str:
    return subprocess.run([str(BIN / prog), "completion", "bash"], check=True,
                          capture_output=True, text=True).stdout


def complete(prog: str, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end) with PROG's completion loaded."""
    probe = f"""
{script(prog)}
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
read -r -a COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_python_argcomplete {prog} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "_ARC"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return [w.strip() for w in out.stdout.splitlines() if w.strip()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_verbs_actions_and_flags() -> None:
    assert {"rollout", "results"} <= set(complete("edge-hub", "edge-hub r"))
    assert "models" not in complete("edge-hub", "edge-hub r")
    assert {"start", "status", "promote"} <= set(complete("edge-hub", "edge-hub rollout "))
    assert "--selector" in complete("edge-hub", "edge-hub rollout start --sel")
    assert complete("edge-agent", "edge-agent validate-") == ["validate-config"]


def test_completion_refuses_an_unknown_shell() -> None:
    out = subprocess.run([str(BIN / "edge-agent"), "completion", "tcsh"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr
