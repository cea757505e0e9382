"""What the engine hands back to the kernel: the arena a measurement grew, and glibc's heaps.

Memory figures are read in a fresh interpreter (``/proc/self/smaps_rollup``), so nothing the
test runner allocated before blurs them; each check has a control that shows it can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
YOLO = ROOT / "models" / "out" / "yolov8n-like" / "manifest.json"

# grows the CPU arena with batches of 4 on two threads, then shrinks it (or only trims)
ARENA = """
import json, sys, threading
import numpy as np
from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel, release_freed_heap

def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024

m = LoadedModel.load(sys.argv[1], EngineSettings(providers=["cpu"], warmup_runs=1))
x = m.preprocess(np.full((720, 1280, 3), 90, np.uint8))[0]
before = m.run(x)[0]
four = np.concatenate([x] * 4)
threads = [threading.Thread(target=lambda: [m.run(four) for _ in range(3)]) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
release_freed_heap()
grown = anon()
if sys.argv[2] == "shrink":
    m.shrink_arena()
else:
    release_freed_heap()
after = anon()
same = bool(np.array_equal(m.run(x)[0], before))
print(json.dumps({"freed_mb": grown - after, "same": same}))
"""

# threads that allocate and keep a little each, then count glibc's heaps (malloc_info)
HEAPS = """
import ctypes, sys, threading
from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel

LoadedModel.load(sys.argv[1], EngineSettings(providers=["cpu"], warmup_runs=1))
libc = ctypes.CDLL(None)
kept, barrier = [], threading.Barrier(8)
def work():
    barrier.wait()  # all at once, so that glibc sees contention and spreads them
    for _ in range(2000):
        kept.append(ctypes.create_string_buffer(512))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
f = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(sys.argv[2]).read().count("<heap nr="))
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
def test_shrink_arena_hands_back_what_bigger_batches_grew() -> None:
    shrunk = json.loads(python(ARENA, str(YOLO), "shrink"))
    trimmed = json.loads(python(ARENA, str(YOLO), "trim"))
    # batches of 4 on two threads grew the arena by tens of MB: shrinking frees most of it,
    # trimming the heap alone frees nothing of it; the model's answers do not change
    assert shrunk["freed_mb"] > 10, shrunk
    assert trimmed["freed_mb"] < 3, trimmed
    assert shrunk["same"] and trimmed["same"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_model_load_caps_the_heaps_threads_spread_over(tmp_path: Path) -> None:
    from edge_agent.inference.engine import HEAP_ARENAS

    tiny = ROOT / "models" / "out" / "tiny-classifier" / "manifest.json"
    capped = int(python(HEAPS, str(tiny), str(tmp_path / "a.xml")))
    # the operator's MALLOC_ARENA_MAX wins: with a higher one, the same threads spread wider
    wide = int(python(HEAPS, str(tiny), str(tmp_path / "b.xml"), env={"MALLOC_ARENA_MAX": "8"}))
    assert capped <= HEAP_ARENAS < wide, (capped, wide)


# the start-up measurement with batches of 1, 2 and 4 on two workers, as for four cameras
MEASURE = """
import json, sys
from edge_agent.config import EngineSettings
from edge_agent.inference.engine import LoadedModel, release_freed_heap
from edge_agent.streaming import calibration

def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024

if sys.argv[2] == "without":
    del LoadedModel.shrink_arena  # an engine that cannot shrink: calibration skips it
m = LoadedModel.load(sys.argv[1], EngineSettings(providers=["cpu"], warmup_runs=1))
loaded = anon()
key = calibration.Key("x", ("cpu",), 2, None, (1, 2), (1, 2, 4))
calibration.measure(m, key, seconds=0.05, max_s=0.5)
release_freed_heap()
print(json.dumps({"grown_mb": anon() - loaded}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_measurement_leaves_the_arena_as_it_found_it() -> None:
    kept = json.loads(python(MEASURE, str(YOLO), "with"))["grown_mb"]
    grown = json.loads(python(MEASURE, str(YOLO), "without"))["grown_mb"]
    assert kept < 5 < grown, (kept, grown)
