"""The two images: each program runs without the other's heavy dependency, and the arm64 agent
image, built here under QEMU, classifies a sample and validates the K3s config as a pod would.

The split (pyproject's `agent` and `hub` extras, docs/deploy.md "Images") holds only if the
agent never imports the Kubernetes client and the hub never imports OpenCV, at import time or
later inside a function: checked here with the other package blocked in a real interpreter, and
in the source. Object tracking (the `tracking` extra, its own image) is optional in the same
way: without norfair every module imports, and a config whose cameras publish events is
refused by `validate-config` and `run` (exit 2, naming the image to use). The slow test
builds the agent image with scripts/build-image.sh (base, wheels and layers cached under
.cache/image, so a second run takes seconds) and runs it with podman as uid 10001 with a
read-only root filesystem, no network and no capabilities.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-image.sh"

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
    # tracking (norfair and the scipy it pulls) is its own extra and image, not the agent's
    assert "norfair" in names["tracking"] and "norfair" not in names["agent"] + common
    # development and the tests get both programs, and tracking
    assert "edge-inference-agent[agent,hub,tracking]" in names["dev"]


# ------------------------------------------------------------ an agent image without tracking

EVENTS_CONFIG = """
node: box-1
models: [{name: det, manifest: models/out/yolov8n-like/manifest.json}]
cameras:
  - {name: door, url: models/out/samples/bikes.mp4, model: det}
  - {name: yard, url: models/out/samples/carphone.mp4, model: det, publish: events}
pipeline: {sink: jsonl, jsonl_path: /nonexistent/results.jsonl}
"""


@pytest.fixture
def without_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    """norfair as if not installed (the plain agent image): its import fails in this process."""
    from edge_agent.config import tracking

    monkeypatch.setitem(sys.modules, tracking.TRACKER_MODULE, None)


def test_without_tracking_a_camera_publishing_events_is_a_config_error(
        without_tracker: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent import cli

    path = tmp_path / "agent.yaml"
    path.write_text(EVENTS_CONFIG)
    for argv in (["validate-config", "--no-files", str(path)], ["run", "--config", str(path)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        # the camera that tracks, why, and what to run instead; the one publishing frames is fine
        assert "cameras.1.publish" in err and "'events'" in err, err
        assert "edge-agent-tracking image" in err and "[agent,tracking]" in err, err
        assert "cameras.0" not in err, err
    # publishing frames only needs no tracker
    path.write_text(EVENTS_CONFIG.replace(", publish: events", ""))
    assert cli.main(["validate-config", "--no-files", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: node=box-1")


def test_with_tracking_installed_the_same_config_is_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent import cli

    path = tmp_path / "agent.yaml"
    path.write_text(EVENTS_CONFIG)
    assert cli.main(["validate-config", "--no-files", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: node=box-1 models=1 cameras=2")


def test_without_tracking_the_tracker_says_which_image_to_run(without_tracker: None) -> None:
    from edge_agent.config.tracking import TrackingSettings
    from edge_agent.tracking.tracker import ObjectTracker

    with pytest.raises(ImportError, match="edge-agent-tracking image") as caught:
        ObjectTracker(TrackingSettings(), next_id=1)
    assert caught.value.name == "norfair"


def test_the_agent_runs_without_the_tracking_extra() -> None:
    # every module imports with norfair (and so scipy) absent: it is loaded only to track
    r = blocked("norfair", "--import-all", "edge_agent")
    assert r.returncode == 0, r.stderr[-3000:]
    found = imports_in(ROOT / "edge_agent")
    assert "scipy" not in found
    # only the tracker names it (for types, and in the function that imports it on first use)
    assert {where.split(":")[0] for where in found["norfair"]} == {
        "edge_agent/tracking/tracker.py"}
    r = blocked("norfair", "edge_agent", "validate-config", "--no-files",
                "k3s/base/agent/config.yaml")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


def pod_files(config: Path, folder: Path) -> dict[str, Path]:
    """The files the agent's config names that a pod has before the agent starts: CA
    certificates, the release key, the ServiceAccount token (the node's certificate and key
    come from the bootstrap at start, so they are not among them)."""
    import yaml
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.support.pki import TestPki

    settings = yaml.safe_load(config.read_text())
    pki = TestPki(folder / "pki")
    release = folder / "signing.pub"
    release.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = folder / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")  # read at start, judged by the hub
    made = {"ca_file": pki.ca_file, "public_key_file": release, "token_file": token}
    files: dict[str, Path] = {}
    for section in settings.values():
        if isinstance(section, dict):
            for key, value in section.items():
                if key in made and value:
                    files[str(value)] = made[key]
    return files


def build_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BUILD), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_arm64_agent_image_runs_like_a_pod(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("building under QEMU needs root (binfmt_misc, podman's chroot isolation)")
    missing = [t for t in ("podman", "mmdebstrap", "qemu-aarch64-static") if not shutil.which(t)]
    assert not missing, f"scripts/setup.sh installs {missing}"
    r = build_script("build", "--arch", "arm64", "--image", "agent", timeout=840)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    # the smoke test ran in this build, or its layer (which exists only if it passed) was reused
    step = r.stderr.split('Dockerfile.arm64.smoke "$EXTRAS"')[-1].split("STEP")[0]
    assert "Using cache" in step or (
        "smoke: agent: modules load, edge-agent starts" in step
        and "smoke: absent: kubernetes, norfair" in step
        and "smoke: onnxruntime" in step and "smoke: opencv" in step), step[-3000:]

    models = ROOT / "models" / "out"
    r = build_script("run", "-v", f"{models / 'efficientnet-lite0'}:/models/efficientnet-lite0",
                     "-v", f"{models / 'samples'}:/samples", "--",
                     "infer", "--model", "/models/efficientnet-lite0", "/samples/chelsea.png",
                     timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    (line,) = r.stdout.splitlines()
    out = json.loads(line)
    assert out["classes"][0]["label"] == "Egyptian cat", out
    assert out["classes"][0]["score"] > 0.5, out

    # the ConfigMap's config, with the files a pod has beside it: the fleet CA and the release
    # key (ConfigMaps) and the projected ServiceAccount token, wherever the config says, so the
    # files are checked too (no --no-files)
    config = ROOT / "k3s" / "base" / "agent" / "config.yaml"
    mounts = {"/etc/edge-agent/config/config.yaml": config}
    for where, path in pod_files(config, tmp_path).items():
        mounts.setdefault(where, path)
    volumes = [arg for where, path in mounts.items() for arg in ("-v", f"{path}:{where}")]
    r = build_script("run", *volumes, "-e", "NODE_NAME=box-1", "--",
                     "validate-config", "/etc/edge-agent/config/config.yaml", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.startswith("ok: node=box-1"), r.stdout

    # the pod's constraints held: not root, and nothing could be written outside /tmp
    r = build_script("run", "--entrypoint", "/opt/venv/bin/python", "--", "-c",
                     "import os, sys\n"
                     "print(os.getuid(), os.getgid())\n"
                     "try:\n    open('/opt/venv/x', 'w')\nexcept OSError as e:\n    print(e.errno)",
                     timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.split() == ["10001", "10001", "30"], r.stdout  # 30: EROFS


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
