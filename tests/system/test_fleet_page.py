"""The fleet page in a real browser: Debian's headless Chromium, driven through chromedriver by
selenium, against ``edge-hub serve`` in a child process with a fake Kubernetes API, a real
broker and simulated agents (tests/support/rollout_env.py, as the rollout CLI tests use).

What a person would check: the page asks for the token, then shows the nodes and the versions
they run; a rollout started from outside moves through its waves on the open page without a
reload; a rollout whose canary is too slow shows that it rolled back, why, and the gate value
that failed against its limit; at 390 px the page is one column with no sideways scrolling.
Screenshots (desktop and 390 px) go to ``$EDGE_TEST_ARTIFACTS/fleet_page`` (CI uploads that
folder) or to pytest's temporary folder; the path is printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hub.registry.service import Registry
from tests.support.broker import Broker, free_port
from tests.support.fake_k8s import FakeKube
from tests.support.hub_client import write_secret
from tests.support.rollout_env import (
    TOKEN,
    Fleet,
    HubProc,
    add_camera_nodes,
    hub_settings,
    push_version,
    write_hub_config,
)
from tests.support.sim_agents import Behaviour
from tests.support.waiting import wait_until

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NODES = ["cam-a0", "cam-a1", "cam-a2", "cam-a3"]
#: p99 of each version as the simulated agents report it: 3.0 is a bad release, 5x slower.
LATENCY = {"1.0": 20.0, "2.0": 21.0, "3.0": 100.0}


@dataclass
class Env:
    hub: HubProc
    fleet: Fleet
    url: str

    def api(self, method: str, path: str, body: Any = None, token: str | None = TOKEN
            ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None
                                     else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)

    def rollout(self, rid: int) -> dict[str, Any]:
        status, body, _ = self.api("GET", f"/v1/rollouts/{rid}")
        assert status == 200, body
        return body["rollout"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, broker: Broker,
        models_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fleet_page")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    kube = FakeKube(hang_s=10).start()
    add_camera_nodes(kube, NODES, site="a")
    data_dir = tmp / "data"

    async def prepare() -> None:
        reg = Registry(hub_settings(data_dir, broker=None, prefix="x", inventory=tmp))
        for v in LATENCY:
            await push_version(reg, models_dir, v)
        await reg.aclose()

    asyncio.run(prepare())
    port = free_port()
    config = write_hub_config(tmp / "hub.yaml", data_dir=data_dir, port=port,
                              token_file=write_secret(tmp / "token", TOKEN), broker=broker,
                              prefix=prefix, kubeconfig=kube.write_kubeconfig(tmp / "kubeconfig"))
    # plain HTTP on loopback: the browser then needs no test CA (TLS is the API tests' job)
    cfg = yaml.safe_load(config.read_text())
    for key in ("tls_cert_file", "tls_key_file", "client_ca_file"):
        cfg["api"].pop(key, None)
    cfg["api"]["plain_http"] = True
    config.write_text(yaml.safe_dump(cfg))
    hub = HubProc(config, port, tmp / "hub.log").start()
    fleet = Fleet(broker, prefix)
    for name in NODES:
        # the first node's camera tracks objects (publish: events): its figures are shown
        tracking = {"active_tracks": 3, "events_per_s": 0.4} if name == NODES[0] else {}
        fleet.add(name, behaviour=Behaviour(latency_ms=dict(LATENCY), **tracking),
                  interval_s=0.1)
    e = Env(hub, fleet, f"http://127.0.0.1:{port}")

    def all_online() -> bool:
        nodes = e.api("GET", "/v1/nodes")[1]["nodes"]
        return len(nodes) == len(NODES) and all(n["online"] for n in nodes)

    wait_until(all_online, 30, "every simulated node online")
    try:
        yield e
    finally:
        fleet.stop()
        rc = hub.stop()
        kube.stop()
        log = hub.log_text()
        assert rc == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = os.environ.get("EDGE_TEST_ARTIFACTS")
    out = (Path(base) if base else tmp_path_factory.getbasetemp() / "artifacts") / "fleet_page"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nfleet page screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are missing: run scripts/setup.sh")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, css: str) -> str:
    """The visible text of the first element matching ``css`` ("" when there is none)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return str(found[0].text) if found else ""
    except StaleElementReferenceException:  # re-rendered between find and read
        return ""


def attr_of(driver: Any, css: str, name: str) -> str | None:
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].get_attribute(name) if found else None
    except StaleElementReferenceException:
        return None


def browser_errors(driver: Any) -> list[str]:
    """Console errors of the page (a script error, a CSP violation, a failed load)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def start_rollout(env: Env, version: str, **spec: Any) -> int:
    body = {"model": "det", "version": version, "selector": "site=a", "canary": 1,
            "waves": [50, 100], "deadline_s": 20, "min_samples": 2, **spec}
    status, out, _ = env.api("POST", "/v1/rollouts", body)
    assert status == 201, out
    return int(out["rollout"]["id"])


def test_the_stream_refuses_callers_without_a_token(env: Env) -> None:
    """The page is public; its data is not: the change stream answers 401 JSON without a
    token, or with a wrong one, like every API read."""
    for token in (None, "not-the-token"):
        status, body, headers = env.api("GET", "/v1/stream", token=token)
        assert status == 401, body
        assert body["error"]["code"] == "unauthorized"
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    req = urllib.request.Request(env.url + "/")
    with urllib.request.urlopen(req, timeout=10) as resp:
        page = resp.read().decode()
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert TOKEN not in page


def test_page_shows_fleet_then_follows_rollouts_live(env: Env, browser: Any,
                                                      artifacts: Path) -> None:
    driver = browser
    driver.get(env.url + "/")
    wait_until(lambda: driver.find_element(By.ID, "login").is_displayed(), 10, "token form")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()

    # the fleet: every node, online, on 1.0
    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr"))
               == len(NODES), 15, "the node table")
    table = text_of(driver, "#nodes")
    for name in NODES:
        assert name in table
    assert table.count("online") >= len(NODES)
    wait_until(lambda: "4 nodes" in text_of(driver, "[data-model=det][data-version='1.0']"),
               10, "versions per model: 4 nodes on 1.0")
    assert text_of(driver, "#count-online") == "4"
    # each node's camera: connected, its rate; tracks and events only where it tracks
    tracker_cam = f"[data-node='{NODES[0]}'] [data-camera=cam0]"
    wait_until(lambda: "3 tracks" in text_of(driver, tracker_cam), 10, "the camera's tracks")
    assert "connected" in text_of(driver, tracker_cam)
    assert "0.4 ev/s" in text_of(driver, tracker_cam)
    plain_cam = text_of(driver, f"[data-node='{NODES[1]}'] [data-camera=cam0]")
    assert "fps" in plain_cam and "track" not in plain_cam
    assert "3.0" in text_of(driver, "#registry")
    assert text_of(driver, "#stream") == "live"
    driver.execute_script("window.__noReload = 'still here'")

    # a healthy rollout started elsewhere: its timeline advances on the open page
    good = start_rollout(env, "2.0", bake_s=2.5, gates=["p99_ms<=2x", "error_rate<=0.01"])
    wait_until(lambda: attr_of(driver, "#rollout", "data-state") == "baking"
               and attr_of(driver, "#rollout", "data-wave") == "0", 20, "canary baking")
    wait_until(lambda: "left" in text_of(driver, "#bake-clock"), 5, "the bake clock")
    driver.save_screenshot(str(artifacts / "desktop-baking.png"))
    wait_until(lambda: attr_of(driver, "#rollout", "data-wave") == "1", 30,
               "the second wave, without a reload")
    wait_until(lambda: attr_of(driver, "#rollout", "data-state") == "succeeded", 40,
               "the rollout succeeded on the page")
    assert env.rollout(good)["state"] == "succeeded"
    kinds = [e.get_attribute("data-kind") for e in
             driver.find_elements(By.CSS_SELECTOR, "#events li")]
    assert "wave_passed" in kinds and "succeeded" in kinds, kinds
    wait_until(lambda: "4 nodes" in text_of(driver, "[data-model=det][data-version='2.0']"),
               15, "the fleet on 2.0")

    # a bad release: the canary is 5x slower; the page says it rolled back, why, and the value
    bad = start_rollout(env, "3.0", bake_s=1.0, gates=["p99_ms<=2x"])
    wait_until(lambda: attr_of(driver, "#rollout", "data-state") == "rolled_back"
               and bool(text_of(driver, "#cause")), 40, "the rollback shown")
    cause = env.rollout(bad)["cause"]
    assert cause["reason"] == "gate" and cause["metric"] == "p99_ms", cause
    shown = text_of(driver, "#cause")
    assert "gate" in shown and "p99_ms" in shown, shown
    assert float(text_of(driver, "#cause-value")) == pytest.approx(cause["value"], rel=0.01)
    assert float(text_of(driver, "#cause-limit")) == pytest.approx(cause["limit"], rel=0.01)
    failed_row = text_of(driver, "#gates tr.failed")
    assert "p99_ms<=2x" in failed_row and "failed" in failed_row, failed_row
    assert float(text_of(driver, "#gates tr.failed .gate-value")) == pytest.approx(
        cause["value"], rel=0.01)
    assert cause["value"] > cause["limit"]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#rollout svg polyline")) >= 2
    assert driver.execute_script("return window.__noReload") == "still here"
    driver.save_screenshot(str(artifacts / "desktop-rolled-back.png"))

    # a phone: 390 px wide, one column, nothing wider than the screen
    driver.set_window_size(390, 844)
    wait_until(lambda: driver.execute_script("return window.innerWidth") <= 390, 5, "resize")
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px at 390 px"
    assert driver.find_element(By.ID, "cause").is_displayed()
    driver.save_screenshot(str(artifacts / "phone-390.png"))
    driver.set_window_size(1280, 1000)

    assert browser_errors(driver) == []  # no script error, CSP violation or failed load

    # the label selector goes to the API; a bad one is shown, not swallowed
    sel = driver.find_element(By.ID, "selector")
    sel.send_keys("site in (a")
    driver.find_element(By.CSS_SELECTOR, "#selector-form button").click()
    wait_until(lambda: "selector" in text_of(driver, "#nodes-error"), 10, "selector error")
    sel.clear()
    sel.send_keys("site=b")
    driver.find_element(By.CSS_SELECTOR, "#selector-form button").click()
    wait_until(lambda: "no node matches" in text_of(driver, "#fleet-nodes"), 10, "empty match")
    errors = browser_errors(driver)
    assert len(errors) == 1 and "400 (Bad Request)" in errors[0], errors  # the bad selector
