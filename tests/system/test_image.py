"""The two images: each program runs without the other's heavy dependency, and the arm64 agent
image, built here under QEMU, classifies a sample and validates the K3s config as a pod would.

The split (pyproject's `agent` and `hub` extras, docs/deploy.md "Images") holds only if the
agent never imports the Kubernetes client and the hub never imports OpenCV, at import time or
later inside a function: checked here with the other package blocked in a real interpreter, and
in the source. (The test that builds the arm64 image with scripts/build-image.sh and runs it as
a pod would is not in the suite yet: issue 17.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a meta-path finder that refuses a package, as if it were not installed, then runs argv
BLOCKED_RUN = """
import importlib, importlib.abc, pkgutil, runpy, sys
blocked = sys.argv[1]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
if sys.argv[2] == "--import-all":
    for package in sys.argv[3:]:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if not info.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(info.name)
    print("imported", ", ".join(sys.argv[3:]))
else:
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def blocked(package: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, package, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NODE_NAME": "box-1"})


def imports_in(folder: Path) -> dict[str, list[str]]:
    """Every imported top-level name under a folder, module level or inside functions."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.setdefault(name.split(".")[0], []).append(where)
    return found


def test_the_blocker_blocks() -> None:
    r = blocked("yaml", "--import-all", "edge_agent")
    assert r.returncode != 0 and "No module named 'yaml' (blocked)" in r.stderr


def test_the_agent_never_imports_the_kubernetes_client() -> None:
    r = blocked("kubernetes", "--import-all", "edge_agent")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kubernetes" not in imports_in(ROOT / "edge_agent")
    # the commands a pod runs, end to end, without it
    r = blocked("kubernetes", "edge_agent", "validate-config", "--no-files",
                "k3s/base/agent/config.yaml")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]
    r = blocked("kubernetes", "edge_agent", "infer", "--model", "models/out/tiny-classifier",
                "models/out/samples/chelsea.png")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["classes"], r.stdout


def test_the_hub_never_imports_opencv() -> None:
    r = blocked("cv2", "--import-all", "hub", "edge_agent.contract", "edge_agent.common")
    assert r.returncode == 0, r.stderr[-3000:]
    for folder in ("hub", "edge_agent/contract", "edge_agent/common"):
        assert "cv2" not in imports_in(ROOT / folder), folder
    r = blocked("cv2", "hub", "--help")
    assert r.returncode == 0 and "serve" in r.stdout, r.stderr[-3000:]


def test_the_extras_split_the_heavy_dependencies() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {key: " ".join(reqs) for key, reqs in project["optional-dependencies"].items()}
    common = " ".join(project["dependencies"])
    assert "kubernetes" not in common and "opencv" not in common
    assert "opencv-python-headless" in names["agent"] and "kubernetes" not in names["agent"]
    assert "kubernetes" in names["hub"] and "opencv" not in names["hub"]
    # development and the tests get both programs
    assert "edge-inference-agent[agent,hub]" in names["dev"]


def test_each_workload_runs_its_programs_image() -> None:
    import yaml

    def images(path: str) -> set[str]:
        doc = yaml.safe_load((ROOT / "k3s" / "base" / path).read_text())
        pod = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
        spec = pod["template"]["spec"]
        return {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}

    assert images("agent/daemonset.yaml") == {"edge-agent:0.1.0"}
    assert images("batch/cronjob.yaml") == {"edge-agent:0.1.0"}  # `edge-agent batch`
    assert images("hub/deployment.yaml") == {"edge-hub:0.1.0"}
    kustomization = yaml.safe_load((ROOT / "k3s" / "base" / "kustomization.yaml").read_text())
    assert {i["name"] for i in kustomization["images"]} == {"edge-agent", "edge-hub"}
