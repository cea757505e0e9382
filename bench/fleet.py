"""Benchmark: the hub's rollout side at fleet scale, against bare paho in the same run.

5,000 simulated nodes (``--nodes``) live in a child process that speaks the wire contract over
one MQTT connection: each node has a retained state, reports its new version active when it
gets a desired message, and sends telemetry once every 10 s (500 messages/s for the fleet). The
fake Kubernetes API server (``tests/support/fake_k8s.py``) runs in another child with one Node
object
per simulated node; the hub (``ControlPlane``: the real kubernetes client, paho, SQLite) runs in
this process. A real mosquitto broker carries everything, configured as in production (TLS with
client certificates, the production ACL): the hub logs in as the hub, and so do the baselines'
clients with identities of their own. The one shortcut: the simulator's single connection
speaks for every simulated node, so it logs in as ``bench:fleet``, a bench-only identity that
may read and write every topic (a real node may publish under its own topics only).

Measured:

- **wave dispatch**: a rollout whose single wave covers every node; from ``create`` until the
  last node received its desired message with the new version (label patches through the
  Kubernetes API, database writes, desired messages through the broker). Baseline: a bare paho
  client publishing the same desired payloads (retained, QoS 1) to the same simulated nodes.
- **ingest lag**: while that rollout bakes (gates evaluated over all nodes every tick, latency
  sketches merged per node and over the wave), receipt-minus-sent time of every telemetry
  message, p99, at one message per node every 10 s. Baseline: a bare paho subscriber in this
  process timing the same messages.
- **telemetry size**: bytes of one node's telemetry message as agents sent it before the
  mergeable sketches (percentiles only) and now (latency sketch of 100 frames, output
  statistics with a score sketch and a class histogram); the simulator sends the new form
  (``--legacy-telemetry``: the old one).

The database (``--database``): ``sqlite`` (default; the SQLite files in ``storage.data_dir``),
``postgresql`` (a real PostgreSQL server this bench starts from ``tests/support/postgres.py``,
a fresh database per fleet, the password in a file as a deployment hands it over), or ``both``:
one fleet on each, one after the other, in the same run. ``--repeat N`` runs each N times,
interleaved (sqlite, postgresql, sqlite, …), and reports medians with the range. Every fleet is
set up from scratch (broker, Kubernetes API, simulator, hub), and the hub must lead (immediately
on SQLite; on PostgreSQL once it holds the advisory lock) before the rollout starts. The server
runs durable as in production (``fsync``, ``synchronous_commit``, ``full_page_writes`` on; SQLite
runs with ``synchronous=FULL``); ``--pg-durability test`` keeps the test fixture's all-off.

Figures go to ``bench/out/fleet.json`` (every run, then medians per database); the last line is
``nodes=… wave_dispatch_s=… ingest_lag_p99_s=…`` (SQLite's medians) followed by the baselines
and ratios, with ``both`` also ``pg_wave_dispatch_s=… pg_ingest_lag_p99_s=…`` and
``wave_dispatch_pg_over_sqlite=… ingest_lag_pg_over_sqlite=…`` (ratios of the medians; with
only ``postgresql`` the ``pg_`` figures alone). ``--quick`` (≤ 60 s) measures ingest for 15 s
instead of 45 s (5 s per fleet with ``both``); the fleet is the same size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet_sim import (  # noqa: E402  (a sibling module of this script)
    FLEET,
    MODEL,
    LagProbe,
    bare_publish,
    node_name,
    percentile,
    run_fake_kube,
    run_simulator,
    telemetry_sizes,
)

from edge_agent.common.logs import configure_logging  # noqa: E402
from edge_agent.contract import protocol  # noqa: E402
from hub.config import HubSettings  # noqa: E402
from hub.registry.service import Registry  # noqa: E402
from hub.rollouts.model import RolloutSpec  # noqa: E402
from hub.server.control import ControlPlane  # noqa: E402
from tests.support import postgres  # noqa: E402
from tests.support.broker import HUB, Broker, free_port  # noqa: E402
from tests.support.fake_k8s import FakeKube  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402


# ------------------------------------------------------------------------------ the hub side
def wait_for(conn: Any, kind: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(0.05):
            msg = conn.recv()
            if msg[0] == kind:
                return msg[1]
    raise TimeoutError(f"no {kind} within {timeout}s")


async def async_wait_for(conn: Any, kind: str, timeout: float) -> Any:
    return await asyncio.to_thread(wait_for, conn, kind, timeout)


def hub_settings(tmp: Path, broker: Broker, kube: FakeKube, prefix: str,
                 storage: dict[str, Any]) -> HubSettings:
    """The hub under test: the fake Kubernetes API, the bench broker, long bake and windows;
    ``storage`` adds the PostgreSQL database (nothing: SQLite files)."""
    return HubSettings(
        storage={"data_dir": tmp / "data", **storage},
        api={"public_url": "https://hub.bench:8081"},
        mqtt={**broker.settings(HUB), "topic_prefix": prefix},
        cluster={"backend": "kubernetes", "api_timeout_s": 10,
                 "kubeconfig": kube.write_kubeconfig(tmp / "kubeconfig"),
                 "watch_timeout_s": 300},
        telemetry={"window_s": 300, "offline_after_s": 120},
        rollouts={"tick_s": 1.0, "startup_grace_s": 1.0},
    )


async def push_versions(reg: Registry) -> None:
    """Versions 1.0 and 2.0 of the tiny classifier, the rollout's baseline and candidate."""
    for version in ("1.0", "2.0"):
        folder = ROOT / "models" / "out" / "tiny-classifier"
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["name"], manifest["version"] = MODEL, version
        staged = await reg.stage()
        await staged.write((folder / manifest["file"]).read_bytes())
        await staged.finish()
        await reg.push(MODEL, version, manifest_bytes=json.dumps(manifest).encode(),
                       staged=staged)


async def wait_leading(cp: ControlPlane) -> None:
    """Until this hub leads (at once on SQLite; on PostgreSQL within a quarter lease)."""
    deadline = time.monotonic() + 60
    while not cp.leadership.leading:
        if time.monotonic() > deadline:
            raise TimeoutError("the hub did not become the leader")
        await asyncio.sleep(0.05)
    await cp.controller.ready.wait()


async def wait_online(cp: ControlPlane, n: int) -> None:
    """Until the hub sees every simulated node online."""
    deadline = time.monotonic() + 60
    while sum(cp.fleet.online(node_name(i)) for i in range(n)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("not every node is online at the hub")
        await asyncio.sleep(0.2)


class DbClock:
    """Times the rollout store's transactions (``Database.run``, queueing included): how many,
    and the wall time during which at least one was in flight."""

    def __init__(self, db: Any) -> None:
        self.db, self.run = db, db.run
        self.calls, self.busy_s, self.inflight, self.since = 0, 0.0, 0, 0.0
        #: Per store method (``save_desired``, ``save``…): [transactions, seconds awaited].
        self.by_call: dict[str, list[float]] = {}

    async def timed(self, fn: Any, **kwargs: Any) -> Any:
        if self.inflight == 0:
            self.since = time.perf_counter()
        self.inflight += 1
        self.calls += 1
        t = time.perf_counter()
        try:
            return await self.run(fn, **kwargs)
        finally:
            self.inflight -= 1
            name = getattr(fn, "__qualname__", "?").split(".<locals>")[0].split(".")[-1]
            entry = self.by_call.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            if self.inflight == 0:
                self.busy_s += time.perf_counter() - self.since

    def __enter__(self) -> DbClock:
        self.db.run = self.timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.run = self.run


async def measure_dispatch(cp: ControlPlane, parent: Connection, broker: Broker,
                           base_prefix: str, n: int) -> dict[str, Any]:
    """A 100 % wave to every node through the hub, then the same payloads by bare paho."""
    figures: dict[str, Any] = {}
    spec = RolloutSpec(model=MODEL, version="2.0", selector="site=bench", canary=0,
                       waves=[100], bake_s=3600, gates=["p99_ms<=1000", "error_rate<=0.01"],
                       deadline_s=600)
    with DbClock(cp.store.db) as clock:
        t0 = time.time()
        await cp.controller.create(spec)
        t_done = await async_wait_for(parent, "wave_done", 600)
    figures["wave_dispatch_s"] = round(t_done - t0, 3)
    figures["wave_db_s"] = round(clock.busy_s, 3)
    figures["wave_db_calls"] = clock.calls
    figures["wave_db_by_call"] = {k: [int(c), round(t, 3)] for k, (c, t) in
                                  sorted(clock.by_call.items())}
    print(f"wave: {n} nodes sent 2.0 in {figures['wave_dispatch_s']}s ({clock.calls} "
          f"transactions, {figures['wave_db_s']}s in the database)", flush=True)
    payloads = []
    for i in range(n):
        row = cp.dispatcher.desired(node_name(i))
        assert row is not None
        payloads.append((node_name(i), protocol.encode_dict(
            {"v": 1, "node": node_name(i), "generation": row.generation,
             "models": row.models})))
    t0 = time.time()
    await asyncio.to_thread(bare_publish, broker, base_prefix, payloads)
    t_base = await async_wait_for(parent, "baseline_done", 120)
    figures["baseline_dispatch_s"] = round(t_base - t0, 3)
    figures["dispatch_ratio"] = round(figures["wave_dispatch_s"]
                                      / figures["baseline_dispatch_s"], 2)
    return figures


async def measure_ingest(cp: ControlPlane, parent: Connection, broker: Broker, prefix: str,
                         ingest_s: float) -> dict[str, Any]:
    """Telemetry from every node while the rollout bakes: hub ingest lag vs a bare subscriber."""
    rid = max(cp.controller.rollouts)
    deadline = time.monotonic() + 120
    while cp.controller.rollouts[rid].state != "baking":
        if time.monotonic() > deadline:
            raise TimeoutError("the rollout did not reach baking")
        await asyncio.sleep(0.2)
    # time the controller's steps while it judges every node (the loop's biggest job)
    ticks: list[float] = []
    tick = cp.controller.tick

    async def timed_tick() -> None:
        t = time.perf_counter()
        await tick()
        ticks.append(time.perf_counter() - t)

    cp.controller.tick = timed_tick  # type: ignore[method-assign]
    probe = LagProbe(broker, prefix)
    cp.fleet.lags.clear()
    parent.send(("telemetry", ingest_s))
    sent = await async_wait_for(parent, "telemetry_done", ingest_s + 60)
    await asyncio.sleep(1.0)  # the last messages in flight
    probe.close()
    hub_lags = list(cp.fleet.lags)
    figures: dict[str, Any] = {
        "telemetry_sent": sent, "telemetry_ingested": len(hub_lags),
        "telemetry_rate_per_s": round(sent / ingest_s, 1),
        "ingest_lag_p50_s": round(percentile(hub_lags, 0.5), 4),
        "ingest_lag_p99_s": round(percentile(hub_lags, 0.99), 4),
        "baseline_lag_p50_s": round(percentile(probe.lags, 0.5), 4),
        "baseline_lag_p99_s": round(percentile(probe.lags, 0.99), 4),
        "rollout_state": cp.controller.rollouts[rid].state,
        "tick_ms_p50": round(percentile(ticks, 0.5) * 1000, 1),
        "tick_ms_max": round(max(ticks, default=0.0) * 1000, 1),
    }
    figures["lag_ratio"] = round(figures["ingest_lag_p99_s"]
                                 / max(figures["baseline_lag_p99_s"], 1e-4), 2)
    return figures


async def bench(args: argparse.Namespace, tmp: Path, database: str,
                pg: PostgresServer | None) -> dict[str, Any]:
    """One fleet from scratch on ``database``; its figures."""
    n = args.nodes
    ctx = mp.get_context("spawn")
    (tmp / "broker").mkdir()
    broker = Broker(tmp / "broker", persistence=False,
                    extra_users={FLEET: [("readwrite", "#")]})
    broker.start()
    kport = free_port()
    kready, kstop = ctx.Event(), ctx.Event()
    kproc = ctx.Process(target=run_fake_kube, args=(kport, n, kready, kstop), daemon=True)
    kproc.start()
    prefix, base_prefix = "bench", "bare"
    parent, child = ctx.Pipe()
    sim_conn = {k: str(v) if isinstance(v, Path) else v
                for k, v in broker.settings(FLEET).items()}
    sproc = ctx.Process(target=run_simulator,
                        args=(sim_conn, prefix, base_prefix, n, child, args.legacy_telemetry),
                        daemon=True)
    figures: dict[str, Any] = {"database": database, "nodes": n,
                               "telemetry_form": "v1 percentiles only"
                               if args.legacy_telemetry else "sketches + output statistics"}
    storage: dict[str, Any] = {}
    if database == "postgresql":
        assert pg is not None
        storage = {"database_url": pg.new_database(),
                   "database_password_file": str(pg.password_file(tmp))}
    cp: ControlPlane | None = None
    reg: Registry | None = None
    try:
        sproc.start()
        await async_wait_for(parent, "states_sent", 60)
        if not await asyncio.to_thread(kready.wait, 120):
            raise TimeoutError("fake Kubernetes API did not start")
        settings = hub_settings(tmp, broker, FakeKube(port=kport), prefix, storage)
        reg = Registry(settings)
        await push_versions(reg)
        t0 = time.time()
        cp = ControlPlane(settings, reg)
        await cp.start()
        await async_wait_for(parent, "initial_done", 120)
        figures["startup_s"] = round(time.time() - t0, 3)
        await wait_leading(cp)
        await wait_online(cp, n)
        print(f"setup ({database}): {n} nodes online, initial desired sent in "
              f"{figures['startup_s']}s", flush=True)
        figures.update(await measure_dispatch(cp, parent, broker, base_prefix, n))
        figures.update(await measure_ingest(cp, parent, broker, prefix, args.ingest_s))
        parent.send(("stop",))
    finally:
        if cp is not None:
            await cp.aclose()
        if reg is not None:
            await reg.aclose()
        kstop.set()
        for p in (sproc, kproc):
            p.join(10)
            if p.is_alive():
                p.kill()
        broker.stop()
    return figures


#: Figures compared between the databases: (name in a run, name of PostgreSQL's, ratio's name).
COMPARED = (("wave_dispatch_s", "pg_wave_dispatch_s", "wave_dispatch_pg_over_sqlite"),
            ("ingest_lag_p99_s", "pg_ingest_lag_p99_s", "ingest_lag_pg_over_sqlite"))


def durable(pg: PostgresServer) -> None:
    """Turn the test fixture's server durable, as a production one (SQLite here commits with
    ``synchronous=FULL``): fsync, synchronous commit and full page writes (all reloadable)."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(pg.url("postgres"), password=pg.password, autocommit=True) as conn:
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {name} = on")
        conn.execute("SELECT pg_reload_conf()")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of every numeric figure over ``runs`` (of one database)."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            out[key] = round(statistics.median(values), 4)
            if min(values) != max(values):
                out[key + "_range"] = [min(values), max(values)]
    return out


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run, the medians per database; SQLite's medians under the figures' own names,
    PostgreSQL's with ``pg_``, and PostgreSQL over SQLite where both ran."""
    first = {k: runs[0][k] for k in ("nodes", "telemetry_form", "telemetry_bytes_before",
                                     "telemetry_bytes_after", "telemetry_bytes_ratio")}
    out: dict[str, Any] = {**first, "runs": runs}
    by_db = {db: [r for r in runs if r["database"] == db] for db in ("sqlite", "postgresql")}
    for db, prefix in (("sqlite", ""), ("postgresql", "pg_")):
        if by_db[db]:
            out[db] = summary(by_db[db])
            for key in ("wave_dispatch_s", "ingest_lag_p99_s", "baseline_dispatch_s",
                        "dispatch_ratio", "baseline_lag_p99_s", "lag_ratio"):
                out[prefix + key] = out[db][key]
    if by_db["sqlite"] and by_db["postgresql"]:
        pairs = list(zip(by_db["sqlite"], by_db["postgresql"], strict=False))
        for key, pg_key, ratio in COMPARED:
            out[ratio] = round(out[pg_key] / out[key], 2)
            # each PostgreSQL run against the SQLite run just before it (the spread)
            out[ratio + "_pairs"] = [round(p[key] / s[key], 2) for s, p in pairs]
    return out


def last_line(out: dict[str, Any], load: list[str]) -> str:
    """The ``name=value`` figures: SQLite's (existing names), then PostgreSQL's and ratios."""
    names = ["nodes"]
    if "sqlite" in out:
        names += ["wave_dispatch_s", "ingest_lag_p99_s", "baseline_dispatch_s",
                  "dispatch_ratio", "baseline_lag_p99_s", "lag_ratio"]
    if "postgresql" in out:
        names += ["pg_wave_dispatch_s", "pg_ingest_lag_p99_s"]
        if "sqlite" not in out:
            names += ["pg_baseline_dispatch_s", "pg_dispatch_ratio", "pg_baseline_lag_p99_s",
                      "pg_lag_ratio"]
    names += [ratio for *_, ratio in COMPARED if ratio in out]
    names += ["telemetry_bytes_before", "telemetry_bytes_after"]
    return " ".join(f"{k}={out[k]}" for k in names) + f" loadavg={'/'.join(load)}"


async def bench_all(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every fleet of the run, interleaved between the databases."""
    dbs = {"sqlite": ["sqlite"], "postgresql-only": ["postgresql"]}.get(
        args.database, ["sqlite", "postgresql"])
    pg: PostgresServer | None = None
    runs: list[dict[str, Any]] = []
    try:
        if "postgresql" in dbs:
            pg = await asyncio.to_thread(PostgresServer().start)
            if args.pg_durability == "full":
                await asyncio.to_thread(durable, pg)
        for i in range(args.repeat):
            for db in dbs:
                folder = tmp / f"{db}-{i}"
                folder.mkdir()
                figures = await bench(args, folder, db, pg)
                figures.update(telemetry_sizes())
                runs.append(figures)
                print(f"run {len(runs)} ({db}): wave_dispatch_s={figures['wave_dispatch_s']} "
                      f"ingest_lag_p99_s={figures['ingest_lag_p99_s']}", flush=True)
    finally:
        if pg is not None:
            await asyncio.to_thread(pg.stop)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--ingest-s", type=float, default=None,
                    help="seconds of telemetry to measure per fleet (default 45; --quick: 15, "
                         "5 with --database both)")
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--database", choices=("sqlite", "postgresql", "both", "postgresql-only"),
                    default="sqlite",
                    help="the hub's database: SQLite files (default); postgresql (= both): a "
                         "PostgreSQL server this bench starts, measured beside SQLite in the "
                         "same run, interleaved (prints PostgreSQL over SQLite); "
                         "postgresql-only: without the SQLite baseline")
    ap.add_argument("--repeat", type=int, default=1,
                    help="fleets per database, interleaved between databases (medians and "
                         "ranges reported)")
    ap.add_argument("--pg-durability", choices=("full", "test"), default="full",
                    help="full (default): fsync, synchronous_commit and full_page_writes on, "
                         "as in production; test: all off, as the test fixture runs it")
    ap.add_argument("--legacy-telemetry", action="store_true",
                    help="simulate agents that send percentiles only (no sketches, no output "
                         "statistics), as before the mergeable sketches")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.ingest_s is None:
        two = args.database in ("postgresql", "both")
        args.ingest_s = (5.0 if two else 15.0) if args.quick else 45.0
    if not (ROOT / "models" / "out" / "tiny-classifier" / "manifest.json").exists():
        print("models are not built: run `python models/build.py` first", file=sys.stderr)
        return 2
    if args.database != "sqlite" and not postgres.available():
        print("PostgreSQL is not installed: run scripts/setup.sh first", file=sys.stderr)
        return 2
    configure_logging("warning", json=False)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        runs = asyncio.run(bench_all(args, Path(tmp)))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() \
        else []
    out = report(runs)
    out.update({"quick": args.quick, "ingest_s": args.ingest_s, "database": args.database,
                "repeat": args.repeat, "pg_durability": args.pg_durability,
                "cores": os.cpu_count(), "loadavg": load,
                "total_s": round(time.monotonic() - started, 1)})
    folder = ROOT / "bench" / "out"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fleet.json").write_text(json.dumps(out, indent=1) + "\n")
    print(last_line(out, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
