"""The one-command local demo: a broker, the hub and three agents on one machine, and a rollout.

``bash scripts/demo.sh`` sets the project up and runs this. It drives the project only from the
outside, the way an operator would: ``mosquitto``, ``edge-hub serve`` and three ``edge-agent run``
as child processes, the ``edge-hub`` client verbs to push models and start the rollout, the hub's
REST API to follow it, and MQTT (``hub.client.results``, the consumer API) to watch the results. It
imports nothing from the agent but the wire contract, so it shows what a user gets.

Secure as on a site (docs/security.md): first a CA and a certificate per party (``edge-hub pki
init`` / ``issue``: the broker, the hub's HTTPS and MQTT identities, a consumer, three nodes) and
a release key (``edge-hub keygen``); the broker takes TLS with client certificates and the K3s
ACL, the hub serves HTTPS with a token and requires signed models, agents download with their
certificates and check signatures.

The story: the hub starts with a static inventory of three camera nodes (``edge-1..3``, no
Kubernetes); each agent plays the sample video in a loop as its camera; two versions of an
ImageNet classifier are pushed (v1: efficientnet-lite0 as built by ``models/build.py``; v2: the
same network re-exported with ONNX Runtime's graph optimizations baked in, so different bytes and
digest, identical outputs); every node is assigned v1 by a label in the inventory; then v2 is
rolled out canary -> all with health gates and a short bake. Progress and per-node latency show
live, a summary closes it, and everything keeps running (results flowing on MQTT for
``edge-hub results tail``) until Ctrl-C. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):  # run as a file (python demo/run.py): make ``demo`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import layout
from demo.layout import CAMERA, LABEL_PREFIX, MODEL, NODES, VIDEO
from demo.options import DEFAULT_GATES, parse_args, workdir
from demo.procs import (
    Child,
    DemoError,
    broker_child,
    free_port,
    port_open,
    run_cli,
    stop_all,
)
from demo.view import Display, NodeRow, Snapshot, cause_text, summary_text
from demo.watch import HubApi, NodeFigures, ResultsWatcher
from hub.client.results import ResultsUnavailableError

TERMINAL = ("succeeded", "rolled_back", "aborted")
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ROLLED_OUT, EXIT_INTERRUPTED = 1, 2, 4, 130


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


class Demo:
    """One run of the demo in ``workdir``; ``run()`` returns the summary."""

    def __init__(self, args: argparse.Namespace, out: Display, workdir: Path) -> None:
        self.args, self.out, self.wd = args, out, workdir
        self.t0 = time.monotonic()
        self.broker: Child | None = None
        self.hub: Child | None = None
        self.agents: list[Child] = []
        self.watcher: ResultsWatcher | None = None
        self.pki = workdir / "pki"
        self.ca_file = self.pki / "ca" / "ca.crt"
        self.release_key = workdir / "keys" / "release"
        self.token_file = workdir / "hub" / "token"
        self.pick_ports()
        self.inventory = workdir / "hub" / "inventory.yaml"
        self.phase = "starting"
        self.nodes: dict[str, dict[str, Any]] = {}
        self.rollout: dict[str, Any] | None = None
        self._polled = 0.0
        # the children get a clean environment: EDGE_AGENT_*/EDGE_HUB_* of the caller's shell
        # would override the demo's config files
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("EDGE_AGENT_", "EDGE_HUB_"))}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.bindir = Path(sys.executable).parent

    # ------------------------------------------------------------------------------ helpers

    def pick_ports(self) -> None:
        """Free loopback ports for the broker, the hub and each agent's HTTP. Picked again right
        before the configs name them: a port is free when picked, not for ever after."""
        self.broker_port = free_port()
        self.hub_port = free_port()
        self.hub_url = f"https://127.0.0.1:{self.hub_port}"
        self.api = HubApi(self.hub_url, ca_file=self.ca_file, token_file=self.token_file)
        self.agent_ports = {name: free_port() for name in NODES}

    def tool(self, name: str) -> list[str]:
        """argv of a console script of this environment (``edge-hub``, ``edge-agent``)."""
        exe = self.bindir / name
        if exe.is_file():
            return [str(exe)]
        return [sys.executable, "-m", {"edge-hub": "hub", "edge-agent": "edge_agent"}[name]]

    def children(self) -> list[Child]:
        """Every long-lived child started so far."""
        return [c for c in (*self.agents, self.hub, self.broker) if c is not None]

    def check_children(self) -> None:
        """DemoError (with its log tail) when a child has died."""
        for c in self.children():
            c.check_alive()

    def refresh(self) -> None:
        """Poll the hub (at most twice a second) and redraw."""
        now = time.monotonic()
        if now - self._polled >= 0.5 and self.hub is not None:
            self._polled = now
            try:
                self.nodes = self.api.nodes()
                if self.rollout is not None:
                    self.rollout = self.api.rollout(self.rollout["id"])
            except DemoError:
                pass  # a slow answer under load: keep the last view, the waits time out
        self.out.show(self.snapshot())

    def snapshot(self) -> Snapshot:
        rows = []
        for name in NODES:
            n = self.nodes.get(name, {})
            m = n.get("models", {}).get(MODEL, {})
            figures = (self.watcher.figures(name) if self.watcher is not None
                       else NodeFigures(name))
            rows.append(NodeRow(name, bool(n.get("online")), m.get("version"), m.get("status"),
                                m.get("target_version"), figures))
        return Snapshot(self.phase, rows, self.rollout)

    def wait(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        """Refresh until ``cond()`` holds; DemoError after ``timeout`` s or if a child dies."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_children()
            self.refresh()
            if cond():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(8)}"
                                  for c in self.children())
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}", tails)
            time.sleep(0.25)

    def cli(self, *argv: str) -> str:
        """Run an ``edge-hub`` client verb against the demo's hub (shown); its stdout."""
        return self.local(*argv, "--hub", self.hub_url, "--token-file", str(self.token_file),
                          "--ca-file", str(self.ca_file), shown=len(argv))

    def local(self, *argv: str, shown: int | None = None) -> str:
        """Run ``edge-hub ARGV`` (its first ``shown`` arguments printed); its stdout."""
        full = [*self.tool("edge-hub"), *argv]
        self.out.step("$ edge-hub " + shlex.join(argv[:shown]), bold=True)
        proc = run_cli(full, env=self.env, timeout=120)
        if proc.returncode != 0:
            raise DemoError(f"edge-hub {' '.join(argv[:3])} exited {proc.returncode}",
                            (proc.stderr or proc.stdout)[-2000:])
        return proc.stdout

    # ------------------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """The hub's token, config and inventory, and the agents' configs."""
        self.pick_ports()
        hub_dir = self.wd / "hub"
        layout.write_token(self.token_file)
        layout.write_inventory(self.inventory, assigned=None)
        pub = self.release_key.with_suffix(".pub")
        layout.dump(hub_dir / "hub.yaml", layout.hub_config(
            hub_dir=hub_dir, port=self.hub_port, broker_port=self.broker_port,
            token_file=self.token_file, inventory=self.inventory, pki=self.pki,
            signing_key=pub))
        for name in NODES:
            adir = self.wd / "agents" / name
            adir.mkdir(parents=True)
            layout.dump(adir / "agent.yaml", layout.agent_config(
                name, agent_dir=adir, fps=self.args.fps, broker_port=self.broker_port,
                http_port=self.agent_ports[name], hub_url=self.hub_url, pki=self.pki,
                signing_key=pub))

    def credentials(self) -> None:
        """The CA, a certificate for every party, and the release key, with the CLI."""
        self.phase = "issuing certificates"
        ca_dir = str(self.pki / "ca")
        self.local("pki", "init", "--dir", ca_dir)
        for party in layout.parties():
            self.local("pki", "issue", party.name, "--role", party.role, *party.extra,
                       "--out", str(self.pki / party.dir), "--dir", ca_dir)
        self.release_key.parent.mkdir(parents=True, exist_ok=True)
        self.local("keygen", str(self.release_key))

    # ------------------------------------------------------------------------------ steps

    def start_services(self) -> None:
        """Broker, hub, then the three agents (all before any thread of ours exists)."""
        self.phase = "starting the broker, the hub and three agents"
        # all forked before the first wait (which starts the live view's thread); the hub and
        # the agents connect to the broker with retries, so the order here does not matter
        self.broker = broker_child(layout.broker_config(
            self.wd / "broker", self.broker_port, self.pki)).start()
        self.hub = Child("hub", [*self.tool("edge-hub"), "serve", "--config",
                                 str(self.wd / "hub" / "hub.yaml")],
                         self.wd / "hub" / "hub.log", self.env).start()
        for name in NODES:
            adir = self.wd / "agents" / name
            self.agents.append(Child(name, [*self.tool("edge-agent"), "run", "--config",
                                            str(adir / "agent.yaml")],
                                     adir / "agent.log", self.env).start())
        self.wait("the broker", lambda: port_open(self.broker_port), 15)
        self.out.step(f"broker: mosquitto on 127.0.0.1:{self.broker_port} (TLS, client "
                      "certificates, the K3s ACL)")
        self.wait("the hub to answer", self.api.ready, 60)
        self.out.step(f"hub: {self.hub_url} (static inventory: {', '.join(NODES)}; "
                      f"API token in {self.token_file})")
        self.out.step(f"agents: {', '.join(NODES)} starting, each with camera {CAMERA} = "
                      f"{VIDEO.name} looping at {self.args.fps:g} fps, no model yet")

    def start_watcher(self) -> None:
        """Subscribe to every node's results, as a downstream consumer would."""
        try:
            self.watcher = ResultsWatcher(self.broker_port,
                                          layout.WATCHER.files(self.pki)).start()
        except ResultsUnavailableError as exc:
            raise DemoError(f"cannot subscribe to the results: {exc}") from exc

    def push_models(self) -> None:
        """Push v1 and v2 of the model with the CLI."""
        self.phase = "pushing two versions of the model"
        files = layout.prepare_models(self.wd / "models")
        for version, notes in (("1", "efficientnet-lite0 as built"),
                               ("2", "efficientnet-lite0, ORT graph-optimized re-export")):
            path = files[version]
            out = self.cli("models", "push", str(path), "--name", MODEL, "--version", version,
                           "--notes", notes, "--sign", str(self.release_key.with_suffix(".key")))
            self.out.step("  " + out.strip().splitlines()[-1])
            self.refresh()

    def assign_v1(self) -> None:
        """Label every node with v1 and wait until all serve it."""
        self.phase = "waiting for the agents"
        self.wait("all agents online", lambda: all(
            self.nodes.get(n, {}).get("online") for n in NODES), 90)
        self.out.step(f"agents online: {', '.join(NODES)}")
        self.phase = f"assigning {MODEL} 1 to every node"
        self.out.step(f"assign {MODEL} 1: label {LABEL_PREFIX}/model.{MODEL}=1 on every node "
                      "in the hub's inventory",
                      f"(on K3s: kubectl label node --all {LABEL_PREFIX}/model.{MODEL}=1)")
        layout.write_inventory(self.inventory, assigned="1")
        self.wait(f"every node to serve {MODEL} 1", lambda: self.serving_everywhere("1"), 90)
        self.out.step(f"every node serves {MODEL} 1; results flowing")
        self.phase = f"{MODEL} 1 running: collecting baseline telemetry"
        self.wait("baseline telemetry", lambda: all(
            (self.nodes.get(n, {}).get("metrics", {}).get(f"{MODEL}@1") or {}).get(
                "samples", 0) >= 2 for n in NODES), 60)

    def serving_everywhere(self, version: str) -> bool:
        """Every node reports ``version`` active and its results carry it."""
        for n in NODES:
            m = self.nodes.get(n, {}).get("models", {}).get(MODEL, {})
            if m.get("version") != version or m.get("status") != "active":
                return False
            if self.watcher is None or self.watcher.figures(n).version != version:
                return False
        return True

    def roll_out_v2(self) -> None:
        """Start the rollout with the CLI and follow it to its end."""
        self.phase = f"rolling {MODEL} 2 out: canary, then all"
        gates: list[str] = []
        for g in self.args.gate or DEFAULT_GATES:
            gates += ["--gate", g]
        out = self.cli("rollout", "start", MODEL, "2", "--canary", "1", "--waves", "100",
                       "--bake", f"{self.args.bake:g}s", *gates, "--deadline", "60s",
                       "--min-samples", "2", "--json")
        self.rollout = json.loads(out)["rollout"]
        self.out.step(f"rollout {self.rollout['id']} started: {self.rollout['nodes_total']} "
                      f"nodes in {self.rollout['waves']} waves (canary, then all), bake "
                      f"{self.args.bake:g} s per wave")
        self._polled = 0.0
        self.wait("the rollout to finish", lambda: self.rollout is not None
                  and self.rollout["state"] in TERMINAL, self.args.rollout_timeout)
        r = self.rollout
        self.out.step(f"rollout {r['id']}: {r['state']}"
                      + (f" ({cause_text(r['cause'])})" if r.get("cause") else ""))

    def settle(self) -> None:
        """Let every node's results show the version it ended on (bounded, never fails)."""
        assert self.rollout is not None
        final = "2" if self.rollout["state"] == "succeeded" else "1"
        self.phase = f"{MODEL} {final} everywhere: settling"
        try:
            self.wait(f"results of {MODEL} {final} from every node", lambda: all(
                (f := self.watcher.figures(n)).version == final and f.version_span_s >= 2.0
                for n in NODES) if self.watcher else True, 20)
        except DemoError as exc:
            self.out.step(f"note: {exc}")

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary (``--json``) the text summary is made from."""
        assert self.rollout is not None and self.watcher is not None
        self.nodes = self.api.nodes()
        r = self.rollout
        nodes = []
        for name in NODES:
            n = self.nodes.get(name, {})
            m = n.get("models", {}).get(MODEL, {})
            f = self.watcher.figures(name)
            nodes.append({"node": name, "online": bool(n.get("online")),
                          "version": m.get("version"), "status": m.get("status"),
                          "results_version": f.version, "fps": round(f.fps, 2),
                          "p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "results": f.delivered})
        stats = self.watcher.stats()
        ended = r.get("finished_at") or time.time()
        return {
            "ok": r["state"] == "succeeded",
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "window_s": self.watcher.window_s,
            "rollout": {"id": r["id"], "model": r["model"], "from_version": "1",
                        "version": r["version"], "state": r["state"], "cause": r.get("cause"),
                        "waves": r["waves"], "gates": list(self.args.gate or DEFAULT_GATES),
                        "duration_s": round(ended - r["created_at"], 1)},
            "nodes": nodes,
            "results": {"delivered": stats["delivered"], "duplicates": stats["duplicates"],
                        "malformed": stats["malformed"], "gaps": stats["gaps"],
                        "missing": stats["missing"], "resets": stats["resets"]},
            "broker": {"host": "127.0.0.1", "port": self.broker_port},
            "hub": self.hub_url,
            "tail": self.tail_command(),
            "pki": str(self.pki),
            "workdir": str(self.wd),
            "pids": {c.name: c.pid for c in self.children()},
        }

    def tail_command(self, bin_prefix: str = "") -> str:
        """``edge-hub results tail`` as the operator's consumer identity."""
        files = layout.OPERATOR.files(self.pki)
        return shlex.join([f"{bin_prefix}edge-hub", "results", "tail", "--port",
                           str(self.broker_port), "--ca-file", str(files["ca_file"]),
                           "--cert-file", str(files["cert_file"]),
                           "--key-file", str(files["key_file"])])

    def run(self) -> dict[str, Any]:
        """Every step, in order; the summary."""
        self.out.step(f"work dir: {self.wd}")
        missing = layout.missing_inputs()
        if missing:
            raise DemoError(f"{missing[0]} is missing: run `bash scripts/setup.sh` first "
                            "(it builds models/out)")
        self.credentials()
        self.prepare()
        self.start_services()
        self.start_watcher()
        self.push_models()
        self.assign_v1()
        self.roll_out_v2()
        self.settle()
        return self.summary()

    def keep_running(self) -> None:
        """After the summary: keep everything up (results flowing) until Ctrl-C."""
        self.phase = "running: results keep flowing on MQTT (Ctrl-C stops everything)"
        self.out.plain_every_s = 30.0
        while True:
            self.check_children()
            self.refresh()
            time.sleep(0.5)

    def stop(self) -> dict[str, int | None]:
        """Stop everything: agents first (they flush their outboxes), then hub, then broker."""
        if self.watcher is not None:
            self.watcher.close()
        codes = stop_all(self.agents, 20.0)
        codes.update(stop_all([self.hub] if self.hub else [], 15.0))
        codes.update(stop_all([self.broker] if self.broker else [], 5.0))
        return codes


def _log_to(path: Path) -> None:
    """Our own structlog output (hub.client.results' events) goes to a file, not the terminal."""
    import structlog  # noqa: PLC0415

    structlog.configure(
        processors=[structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(open(path, "a", encoding="utf-8")),  # noqa: SIM115
    )


def _print_after(out: Display, summary: dict[str, Any], args: argparse.Namespace,
                 demo: Demo) -> None:
    bin_hint = os.path.relpath(demo.bindir, Path.cwd())
    bin_hint = "" if bin_hint.startswith("..") or os.path.isabs(bin_hint) else bin_hint + "/"
    hub = shlex.join(["--hub", demo.hub_url, "--token-file", str(demo.token_file),
                      "--ca-file", str(demo.ca_file)])
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    else:
        out.console.print(summary_text(summary), highlight=False, markup=False)
    if args.exit_after_summary:
        out.step("stopping (--exit-after-summary)")
        return
    agents = "  ".join(f"{c.name} http://127.0.0.1:{demo.agent_ports[c.name]}"
                       for c in demo.agents)
    out.step("results keep flowing on MQTT; from another shell, watch them (--json: payloads):",
             demo.tail_command(bin_hint),
             "the fleet and the rollout, as the hub sees them:",
             f"{bin_hint}edge-hub nodes {hub}",
             f"{bin_hint}edge-hub rollout status {summary['rollout']['id']} {hub}",
             f"each agent's /healthz, /readyz, /metrics, /v1/models: {agents}",
             "Ctrl-C stops everything.")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the exit status (0 ok, 1 failed, 4 not rolled out, 130 interrupted)."""
    args = parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    out = Display(stream, live=stream.isatty())
    # Ctrl-C and SIGTERM stop the demo, even when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        wd, remove = workdir(args)
    except DemoError as exc:
        out.step(f"error: {exc}")
        return EXIT_USAGE
    _log_to(wd / "demo.log")
    demo = Demo(args, out, wd)
    status = EXIT_FAILED
    summarized = False
    try:
        summary = demo.run()
        summarized = True
        status = 0 if summary["ok"] else EXIT_NOT_ROLLED_OUT
        out.pause_live()
        _print_after(out, summary, args, demo)
        if not args.exit_after_summary:
            demo.keep_running()
    except KeyboardInterrupt:
        if not summarized:
            status = EXIT_INTERRUPTED
    except DemoError as exc:
        out.pause_live()
        out.step(f"error: {exc}")
        if exc.detail:
            stream.write(exc.detail.rstrip() + "\n")
        status = EXIT_FAILED
    finally:
        # stopping is bounded (about 25 s at worst); a second Ctrl-C must not cut it short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        out.close()
        out.step("stopping agents, hub and broker …")
        codes = demo.stop()
        out.step("stopped: " + ", ".join(f"{k} exit {v}" for k, v in codes.items()))
        if remove and status != EXIT_FAILED:
            shutil.rmtree(wd, ignore_errors=True)
        else:  # a failed run keeps its logs
            out.step(f"work dir kept: {wd} (configs, logs, databases)")
    return status


if __name__ == "__main__":
    sys.exit(main())
