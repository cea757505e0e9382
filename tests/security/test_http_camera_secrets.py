"""A camera URL with a password: the password reaches the camera and nothing else.

A real agent process with two cameras whose URLs carry credentials (in the user info, and as a
query parameter, as some cameras want them) that cannot be reached, so it keeps failing,
logging and reconnecting; it publishes results, state and telemetry over a real broker (TLS,
its own certificate). Then every place a password could leak is read: the agent's whole log
(stdout and stderr, OpenCV and FFmpeg included), ``/metrics``, every HTTP endpoint, every MQTT
message it sent, and a config error about such a URL.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from edge_agent import camera_urls
from tests.support.agent_process import ROOT, AgentProcess, agent_config
from tests.support.broker import Broker, free_port
from tests.support.mqtt_recorder import Recorder
from tests.support.waiting import wait_until

NODE = "cam-node-1"
PASSWORDS = ("Sup3r%40S3cret", "Sup3r@S3cret", "QueryS3cret")


def _leaks(text: str | bytes) -> list[str]:
    data = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [p for p in PASSWORDS if p in data]


def test_camera_passwords_appear_in_no_log_metric_api_or_message(
    tmp_path: Path, models_dir: Path, broker: Broker, topic_prefix: str,
) -> None:
    dead = free_port()
    cameras = [
        {"name": "door", "model": "tiny-classifier", "open_timeout_s": 0.5,
         "reconnect_min_s": 0.05, "reconnect_max_s": 0.2,
         "url": f"rtsp://admin:{PASSWORDS[0]}@127.0.0.1:{dead}/stream1"},
        {"name": "gate", "model": "tiny-classifier", "open_timeout_s": 0.5,
         "reconnect_min_s": 0.05, "reconnect_max_s": 0.2,
         "url": f"http://127.0.0.1:{dead}/video.mjpg?user=admin&password={PASSWORDS[2]}"},
    ]
    cfg = agent_config(
        tmp_path, models_dir, node=NODE, cameras=cameras,
        pipeline={"sink": "mqtt"},
        mqtt={**broker.settings(NODE), "topic_prefix": topic_prefix,
              "telemetry_interval_s": 0.2},
    )
    recorder = Recorder(broker, [f"{topic_prefix}/#"]).start()
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        def reconnects() -> list[int]:
            with urllib.request.urlopen(agent.url + "/v1/cameras", timeout=10) as r:
                return [c["reconnects"] for c in yaml.safe_load(r.read())["cameras"]]

        wait_until(lambda: min(reconnects()) >= 3, what="cameras failing and reconnecting")
        wait_until(lambda: {t.rsplit("/", 1)[-1] for t, _, _ in recorder.messages}
                   >= {"state", "telemetry"}, what="state and telemetry on MQTT")
        answers = {}
        for path in ("/v1/cameras", "/v1/models", "/metrics", "/healthz", "/readyz"):
            try:
                with urllib.request.urlopen(agent.url + path, timeout=10) as r:
                    answers[path] = r.read()
            except urllib.error.HTTPError as exc:  # /readyz: no camera delivers
                answers[path] = exc.read()
        cams = yaml.safe_load(answers["/v1/cameras"])["cameras"]
        assert {c["url"] for c in cams} == {
            f"rtsp://admin:***@127.0.0.1:{dead}/stream1",
            f"http://127.0.0.1:{dead}/video.mjpg?user=admin&password=***"}
        assert all(c["last_error"] for c in cams)  # the errors are there, without secrets
    finally:
        assert agent.stop() == 0, agent.log_text()[-3000:]
        recorder.stop()
    log = agent.log_text()
    assert "camera_state" in log and _leaks(log) == [], _leaks(log)
    for path, body in answers.items():
        assert _leaks(body) == [], path
    assert recorder.messages and all(_leaks(p) == [] for _, p, _ in recorder.messages)


def test_a_config_error_does_not_print_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"cameras": [
        {"name": "door", "model": "m", "url": f"rtsp://admin:{PASSWORDS[1]}@/no-host"}]}))
    r = subprocess.run([sys.executable, "-m", "edge_agent", "validate-config", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "cameras.0.url" in r.stderr, r.stderr
    assert "rtsp://admin:***@/no-host" in r.stderr
    assert _leaks(r.stdout + r.stderr) == []


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:s3cr%40t@10.0.0.5:554/s1", "rtsp://admin:***@10.0.0.5:554/s1"),
    ("rtsp://10.0.0.5/s1?user=a&password=hunter2&ch=1",
     "rtsp://10.0.0.5/s1?user=a&password=***&ch=1"),
    ("http://cam/x.mjpg?token=abc&pwd=def", "http://cam/x.mjpg?token=***&pwd=***"),
    ("rtsp://:onlypass@cam/s", "rtsp://***@cam/s"),
    ("rtsp://a:b:c@cam/s", "rtsp://a:***@cam/s"),  # a colon inside the password
    ("rtsp://user@cam/s", "rtsp://user@cam/s"),  # a user alone is no secret
    ("/videos/dock.mp4", "/videos/dock.mp4"),
    ("test://pattern?width=64", "test://pattern?width=64"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert camera_urls.redact_url(url) == shown
    for secret in camera_urls.url_secrets(url):
        text = camera_urls.redact_text(f"cannot open {url}: refused",
                                       camera_urls.url_secrets(url))
        assert secret not in text
