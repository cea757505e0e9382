"""Child processes of the tests (a hub, an agent) stopped the way Kubernetes stops a pod."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds; the exit code (negative: a signal)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
