"""Downloading a 100 MB artifact must not raise the hub's memory: it is streamed from disk.

The hub runs as an ``edge-hub serve`` child process; its RSS is sampled with psutil while a
client downloads the whole artifact (and a resumed range of it) and must stay within 20 MB
of the level measured just before.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.support.hub_client import AUTH, hub_process, requests_verify
from tests.support.hub_models import make_classifier, make_manifest

SIZE = 100 * 1024 * 1024
MAX_RSS_GROWTH = 20 * 1024 * 1024


class RssSampler:
    """The peak RSS of a process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_100mb_download_keeps_hub_rss_flat(tmp_path: Path) -> None:
    onnx = make_classifier(tmp_path / "big.onnx", pad_bytes=SIZE)
    manifest = make_manifest(onnx, name="big", version="1")
    sha = manifest["sha256"]
    with hub_process(tmp_path) as hub, requests.Session() as http:
        http.trust_env = False  # REQUESTS_CA_BUNDLE would win over the session's CA
        http.verify = requests_verify()
        http.headers.update(AUTH)
        url = f"{hub.url}/v1/models/big/versions/1"
        assert hub.proc is not None
        idle = psutil.Process(hub.proc.pid).memory_info().rss
        with onnx.open("rb") as f, RssSampler(hub.proc.pid) as up:
            # requests streams a file object from disk
            r = http.put(url, headers=AUTH, timeout=120, files={
                "manifest": ("manifest.json", json.dumps(manifest), "application/json"),
                "artifact": ("model.onnx", f, "application/octet-stream"),
            })
        assert r.status_code == 201, r.text
        assert r.json()["size"] >= SIZE
        # informational: the upload's peak includes onnxruntime loading the model to check it
        print(f"hub rss idle={idle / 2**20:.1f} MiB upload peak={up.peak / 2**20:.1f} MiB")

        def download(headers: dict[str, str] | None = None) -> tuple[str, int]:
            h = hashlib.sha256()
            n = 0
            with http.get(url + "/artifact", headers=headers, stream=True, timeout=60) as resp:
                assert resp.status_code in (200, 206)
                for chunk in resp.iter_content(1024 * 1024):
                    h.update(chunk)
                    n += len(chunk)
            return h.hexdigest(), n

        download({"Range": "bytes=0-1048575"})  # warm up the download path
        before = psutil.Process(hub.proc.pid).memory_info().rss
        with RssSampler(hub.proc.pid) as rss:
            t0 = time.monotonic()
            digest, n = download()
            took = time.monotonic() - t0
            _, tail = download({"Range": f"bytes={n // 2}-"})
        assert digest == sha and n == onnx.stat().st_size and tail == n - n // 2
        growth = rss.peak - before
        print(f"hub rss before={before / 2**20:.1f} MiB peak={rss.peak / 2**20:.1f} MiB "
              f"growth={growth / 2**20:.1f} MiB over {rss.samples} samples; "
              f"download {n / 2**20 / took:.0f} MiB/s")
        assert rss.samples > 10
        assert growth <= MAX_RSS_GROWTH, f"hub RSS grew by {growth / 2**20:.1f} MiB"
