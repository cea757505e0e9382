"""Attacks on the agent's ``POST /v1/infer``: a decompression bomb, a crowd of them, and uploads
from strangers. A real ``edge-agent run`` process; its peak memory is the kernel's (VmHWM).

The bomb is the one from issue 12: a PNG of 874 KB that claims 30000 x 30000 pixels (8-bit
grey, all zero; it inflates to 900 MB, and OpenCV decodes it to 2.7 GB of BGR). Without the
header check it took an agent from 196 MB to 5.46 GB.
"""

from __future__ import annotations

import concurrent.futures
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support.agent_process import AgentProcess, agent_config
from tests.support.hub_client import write_secret

SIDE = 30000
#: How much the agent's peak memory may grow while it refuses bombs.
MAX_GROWTH = 50 * 1024 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A valid PNG of SIDE x SIDE grey pixels in ~874 KB (a few seconds to compress)."""
    z = zlib.compressobj(9)
    rows = (b"\x00" * (SIDE + 1)) * 1000  # filter byte + a row, a thousand rows at a time
    idat = b"".join(z.compress(rows) for _ in range(SIDE // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) \
        + _chunk(b"IEND", b"")
    assert len(png) < 1024 * 1024
    return png


def _png(w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 127, np.uint8))
    assert ok
    return buf.tobytes()


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "image/png", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("infer-agent")
    a = AgentProcess(tmp, agent_config(tmp, models_dir)).start()
    yield a
    assert a.stop() == 0, a.log_text()[-3000:]


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_before_decoding(agent: AgentProcess,
                                                         bomb: bytes) -> None:
    url = agent.url + "/v1/infer"
    assert _post(url, _png())[0] == 200  # warm: the decode and inference paths are paged in
    before = agent.peak_rss()
    status, body = _post(url, bomb)
    assert status == 413 and b"too_many_pixels" in body and b"30000x30000" in body
    one = agent.peak_rss() - before
    # ten at once: four take a slot and are refused after reading the header, six get 429;
    # none is decoded
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: _post(url, bomb)[0], range(10)))
    assert set(answers) <= {413, 429} and 413 in answers, answers
    ten = agent.peak_rss() - before
    print(f"agent peak RSS before={before / 2**20:.1f} MiB, growth after one bomb "
          f"{one / 2**20:.1f} MiB, after ten at once {ten / 2**20:.1f} MiB")
    assert one < MAX_GROWTH and ten < MAX_GROWTH
    assert _post(url, _png())[0] == 200  # and the agent still serves


def test_infer_needs_a_token_beyond_loopback(tmp_path: Path, models_dir: Path) -> None:
    # listening on every address without a token: the endpoint is off
    cfg = agent_config(tmp_path, models_dir, http={"host": "0.0.0.0"})
    a = AgentProcess(tmp_path, cfg).start()
    try:
        status, body = _post(a.url + "/v1/infer", _png())
        assert status == 403 and b"infer_off" in body
        assert b'"status":"ok"' in urllib.request.urlopen(a.url + "/healthz").read()
    finally:
        assert a.stop() == 0
    # with a token: strangers get 401 before a byte of the image is read, the holder a result
    token = write_secret(tmp_path / "infer-token", "let-me-infer")
    cfg = agent_config(tmp_path, models_dir, http={"host": "0.0.0.0",
                                                    "token_file": str(token)})
    a = AgentProcess(tmp_path, cfg).start()
    try:
        assert _post(a.url + "/v1/infer", _png())[0] == 401
        assert _post(a.url + "/v1/infer", _png(), {"Authorization": "Bearer nope"})[0] == 401
        status, _ = _post(a.url + "/v1/infer", _png(), {"Authorization": "Bearer let-me-infer"})
        assert status == 200
    finally:
        assert a.stop() == 0


def test_an_infer_token_file_others_can_read_is_refused(tmp_path: Path,
                                                        models_dir: Path) -> None:
    token = tmp_path / "infer-token"
    token.write_text("let-me-infer\n")
    token.chmod(0o644)
    cfg = agent_config(tmp_path, models_dir, http={"token_file": str(token)})
    a = AgentProcess(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="did not start"):
        a.start(timeout=30)
    assert a.proc is not None and a.proc.returncode == 2
    assert "http.token_file" in a.log_text() and "readable by other users" in a.log_text()
