"""Dockerfile.arm64's structure: stages, a pinned base, a non-root final stage, the entry
point, a health check on the agent's /healthz, nothing secret, hash-checked installs from the
constraints file, and agreement with the K3s manifests and pyproject.toml. The image itself is
built and run by tests/system/test_image.py (slow)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from edge_agent.config import HttpSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.arm64"
CONSTRAINTS = ROOT / "Dockerfile.arm64.constraints"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: comments dropped, continuation lines joined."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments (and the syntax directive), also inside continuations
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    assert not buf.strip(), "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        elif not stages:
            assert op == "ARG", f"only ARG may come before the first FROM, not {op}"
            k, _, v = rest.partition("=")
            args[k] = v
        else:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def runtime_requirements() -> list[Requirement]:
    """What the images install (pyproject.toml, as installed in .venv): the common dependencies
    and the `agent` and `hub` extras."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("edge-inference-agent") or []]
    return [r for r in reqs
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("agent", "hub"))]


def constraint_lines() -> list[str]:
    return [x for x in CONSTRAINTS.read_text().splitlines() if x.strip() and not x.startswith("#")]


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)


def test_parser_handles_comments_and_continuations() -> None:
    args, stages = parse(
        "# syntax=docker/dockerfile:1\nARG B=x:1\nFROM ${B} AS a\nRUN one \\\n"
        "# inside\n    && two\nFROM a\nUSER 5\n"
    )
    assert args == {"B": "x:1"}
    assert [(s.base, s.name) for s in stages] == [("${B}", "a"), ("a", None)]
    assert [" ".join(r.split()) for r in stages[0].all("RUN")] == ["one && two"]


def test_multi_stage_from_a_pinned_base(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    args, stages = dockerfile
    assert [s.name for s in stages] == ["build", "runtime"]
    for s in stages:
        image = resolve(s.base, args)
        name, _, tag = image.rpartition(":")
        assert name and tag, f"{image}: no tag"
        # an exact patch release (x.y.z), never latest or a floating major
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: tag is not an exact release"
    # the build's virtualenv is copied into the final stage, nothing else from it
    runtime = stages[-1]
    copies = runtime.all("COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"]
    assert not runtime.all("ADD")


def test_final_stage_runs_as_the_pods_non_root_user(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the final stage must switch to a non-root user"
    assert all(u.split(":")[0] not in ("0", "root") for u in users)
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid == uid
    # no instruction after the last USER runs as root, and nothing switches back
    last_user = max(i for i, (op, _) in enumerate(runtime.instructions) if op == "USER")
    assert not [op for op, _ in runtime.instructions[last_user:] if op == "RUN"]
    # the same uid the K3s manifests run every pod as, which owns the state folders
    ds = yaml.safe_load((ROOT / "k3s/base/agent/daemonset.yaml").read_text())
    psc = ds["spec"]["template"]["spec"]["securityContext"]
    assert (psc["runAsUser"], psc["runAsGroup"]) == (int(uid), int(gid))
    (run,) = runtime.all("RUN")
    assert f"useradd --system --uid {uid}" in run
    assert f"install -d -o {uid} -g {gid}" in run and "/var/lib/edge-agent" in run


def test_entrypoint_cmd_healthcheck_and_port(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["edge-agent"]
    cmd = json.loads(runtime.all("CMD")[-1])
    ds = yaml.safe_load((ROOT / "k3s/base/agent/daemonset.yaml").read_text())
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    assert cmd == agent["args"], "the image's default command is the DaemonSet's"
    port = HttpSettings().port
    assert runtime.all("EXPOSE") == [str(port)]
    (hc,) = runtime.all("HEALTHCHECK")
    opts, _, probe = hc.partition(" CMD ")
    assert re.search(r"--interval=\d+s", opts) and re.search(r"--timeout=\d+s", opts)
    assert re.search(r"--start-period=\d+s", opts)
    assert f"http://127.0.0.1:{port}/healthz" in probe
    # exec form, so it works without a shell and with the venv's python on PATH
    assert json.loads(probe)[0] == "python"
    env = " ".join(runtime.all("ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_no_secrets_and_no_remote_adds(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    args, stages = dockerfile
    secretish = re.compile(r"(?i)(passw|secret|token|api_?key|private)")
    names = list(args)
    for s in stages:
        for op, rest in s.instructions:
            if op in ("ARG", "ENV"):
                names += [kv.split("=")[0] for kv in shlex.split(rest)]
            if op in ("COPY", "ADD"):
                assert not re.search(r"https?://", rest), f"remote {op}: {rest}"
                assert not re.search(r"(?i)\.(pem|key|p12|env)\b|secret", rest), rest
    assert not [n for n in names if secretish.search(n)]
    # the build context is an allow-list: everything ignored, then the few inputs let back in
    ignore = [x for x in (ROOT / "Dockerfile.arm64.dockerignore").read_text().splitlines() if x]
    patterns = [x for x in ignore if not x.startswith("#")]
    assert patterns[0] == "*"
    assert not [p for p in patterns if p.startswith("!") and re.search(r"venv|models|\.git", p)]


def test_build_stage_installs_by_hash_and_smoke_tests(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    build = stages[0]
    arg_defaults = dict(a.partition("=")[::2] for a in build.all("ARG"))
    assert arg_defaults["ORT_PACKAGE"] == "onnxruntime"
    assert arg_defaults["CONSTRAINTS"] == CONSTRAINTS.name
    assert arg_defaults["EXTRAS"] == "agent", "a plain build makes the DaemonSet's image"
    assert "ORT_INDEX" in arg_defaults
    runs = " ".join(build.all("RUN"))
    # pip and setuptools by hash first, then every dependency in hash-checking mode
    assert "grep -E '^(pip|setuptools)=='" in runs and "--require-hashes --no-deps" in runs
    assert '--require-hashes --only-binary=:all: --constraint "$CONSTRAINTS"' in runs
    assert "$pip check" in runs and "pip uninstall -y pip setuptools" in runs
    # the last step proves the wheels load and the entry points start, under emulation too
    assert build.all("RUN")[-1] == '/opt/venv/bin/python Dockerfile.arm64.smoke "$EXTRAS"'
    smoke = (ROOT / "Dockerfile.arm64.smoke").read_text()
    assert "QEMU_LD_PREFIX" in smoke and "InferenceSession" in smoke and "cv2.imdecode" in smoke
    # the Jetson path is documented where the build arguments are
    text = DOCKERFILE.read_text()
    assert "onnxruntime-gpu" in text and "l4t-jetpack" in text
    for s in stages:
        for run in s.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run
    names = {d.name for d in runtime_requirements()}
    assert {"onnxruntime", "opencv-python-headless", "kubernetes"} <= names
    assert "opencv-python" not in names, "the GUI build of OpenCV has no place on an edge box"
    # the context holds what the build copies, and the optional pre-downloaded wheels
    ignore = (ROOT / "Dockerfile.arm64.dockerignore").read_text().splitlines()
    assert {"!Dockerfile.arm64.smoke", "!.wheels/"} <= set(ignore)


def test_constraints_pin_and_hash_every_dependency_within_pyproject_ranges() -> None:
    pins: dict[str, str] = {}
    for line in constraint_lines():
        pin, *hashes = line.split()
        name, _, version = pin.partition("==")
        assert version, f"not an exact pin: {line}"
        assert hashes and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes), line
        pins[name.lower()] = version
    for d in runtime_requirements():
        key = d.name.lower()
        assert key in pins, f"{d.name} is not pinned in {CONSTRAINTS.name}"
        assert d.specifier.contains(pins[key]), f"{d.name}=={pins[key]} is outside {d}"
    assert {"pip", "setuptools"} <= set(pins), "the build tools are pinned too"
    # platform wheels carry one hash per architecture (aarch64 and x86_64)
    for line in constraint_lines():
        if line.startswith(("numpy==", "onnxruntime==", "opencv-python-headless==")):
            assert line.count("--hash=") == 2, line
