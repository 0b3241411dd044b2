"""Load driver: many sites in one process, each with its own Session, gRPC channel and TLS connection.

Used by tests/test_load_tls.py and bench/load_tls.py to put hundreds of sites against one
``flkit server`` without hundreds of Python processes. Every site runs in its own thread with its
own :class:`~flkit.client.session.Session` (``transport="grpc"``: its own channel; with its own
startup kit ``KITS/<site>``: its own certificate, so its own TLS handshake and connection) and the
plain Client API loop::

    while session.is_running():
        model = session.receive()
        session.send(FLModel(params={k: v + 1 ...}, metrics=..., meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    session.close()

When the last of this process's sites has received its first task (all of them are connected and
none has left, since the round cannot end before each answers), the driver counts this process's
ESTABLISHED TCP connections to the server's port with psutil, and the distinct local ports they
use: one per site when every channel has its own connection.

At the end it prints one JSON line (``{"driver": "load_sites", ...}``: per-site outcome, the
errors with their text, the connection count, timings) and exits 1 if any site had an error.

    python tests/scripts/load_sites.py --server 127.0.0.1:8002 --kits kits/ --range 1:50 --job-id job
    python tests/scripts/load_sites.py --server 127.0.0.1:8002 --kits kits/ --sites site-1,site-7 --job-id job
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from flkit.client.session import Session
from flkit.client.settings import SiteSettings
from flkit.model import FLModel


def site_names(args: argparse.Namespace) -> list[str]:
    names = [s.strip() for s in (args.sites or "").split(",") if s.strip()]
    if args.range:
        first, _, last = args.range.partition(":")
        names += [f"{args.prefix}{i}" for i in range(int(first), int(last or first) + 1)]
    if not names:
        raise SystemExit("give the sites with --sites a,b,c and/or --range FIRST:LAST")
    if len(set(names)) != len(names):
        raise SystemExit("a site is named twice")
    return names


def server_connections(port: int) -> list[Any]:
    """This process's established TCP connections to ``port`` (the server's)."""
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]


class Driver:
    def __init__(self, args: argparse.Namespace, names: list[str]) -> None:
        self.args = args
        self.names = names
        self.port = int(args.server.rsplit(":", 1)[1])
        self.start = time.monotonic()
        self.results: dict[str, dict[str, Any]] = {name: {"ok": False, "error": "did not finish"} for name in names}
        self.lock = threading.Lock()
        self.received_first = 0
        self.snapshot: dict[str, Any] | None = None
        self.workspace = Path(args.workspace or tempfile.mkdtemp(prefix="load_sites_"))

    def _first_task(self) -> None:
        """Called once per site on its first task; the last one counts the connections."""
        with self.lock:
            self.received_first += 1
            last = self.received_first == len(self.names)
        if last:
            conns = server_connections(self.port)
            self.snapshot = {"established": len(conns), "local_ports": len({c.laddr.port for c in conns}),
                             "at_s": round(time.monotonic() - self.start, 3)}

    def run_site(self, name: str) -> None:
        began = time.monotonic()
        out: dict[str, Any] = {"ok": False, "tasks": 0, "error": None}
        settings = SiteSettings(server=self.args.server, site_name=name, job_id=self.args.job_id, token="",
                                kit=str(Path(self.args.kits) / name), workspace=str(self.workspace / name),
                                transport="grpc", connect_timeout_s=self.args.connect_timeout,
                                receive_timeout_s=self.args.timeout)
        session: Session | None = None
        failure: str | None = None
        try:
            Path(settings.workspace).mkdir(parents=True, exist_ok=True)
            session = Session(settings)
            while session.is_running():
                model = session.receive()
                if model is None:
                    break
                if out["tasks"] == 0:
                    out["first_task_s"] = round(time.monotonic() - self.start, 3)
                    self._first_task()
                out["tasks"] += 1
                if session.task_name == "train":
                    params = {k: v + 1 for k, v in (model.params or {}).items()}
                    session.send(FLModel(params=params, metrics={"accuracy": 1.0},
                                         meta={"NUM_STEPS_CURRENT_ROUND": 1}))
                else:  # validate (final_validation) or any other task: metrics only
                    session.send(FLModel(metrics={"accuracy": 1.0}))
            if not session.state.ended:
                failure = f"no task and no end of the job within {self.args.timeout} s"
            elif session.state.job_failed:
                out["error"] = f"the job failed: {session.state.end_reason}"
            out["end_reason"] = session.state.end_reason
        except BaseException as exc:  # every error of a site is reported, none is lost
            failure = f"{type(exc).__name__}: {exc}"
            if self.args.traceback:
                failure += "\n" + traceback.format_exc()
        finally:
            if session is not None:
                try:
                    session.close(failure=failure)
                except Exception as exc:
                    failure = failure or f"close: {type(exc).__name__}: {exc}"
        out["error"] = failure or out["error"]
        out["ok"] = out["error"] is None
        out["seconds"] = round(time.monotonic() - began, 3)
        self.results[name] = out

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.run_site, args=(name,), name=f"load-{name}", daemon=True)
                   for name in self.names]
        for t in threads:
            t.start()
        deadline = self.start + self.args.deadline
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name.removeprefix("load-") for t in threads if t.is_alive()]
        for name in stuck:
            self.results[name] = {"ok": False, "error": f"still running after {self.args.deadline} s"}
        errors = {name: r["error"] for name, r in self.results.items() if not r["ok"]}
        return {"driver": "load_sites", "pid": os.getpid(), "server": self.args.server, "sites": len(self.names),
                "ok": len(self.names) - len(errors), "errors": errors, "connections": self.snapshot,
                "seconds": round(time.monotonic() - self.start, 3), "stuck": len(stuck), "per_site": self.results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="host:port of the flkit server")
    parser.add_argument("--kits", required=True, help="the provisioned kits folder (one kit folder per site)")
    parser.add_argument("--sites", default=None, help="comma-separated site names")
    parser.add_argument("--range", default=None, help="FIRST:LAST: sites PREFIX<FIRST> .. PREFIX<LAST>")
    parser.add_argument("--prefix", default="site-", help="site name prefix for --range (default site-)")
    parser.add_argument("--job-id", required=True, help="the job id the server serves")
    parser.add_argument("--workspace", default=None, help="folder for the sites' workspaces (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=120.0, help="each site's receive timeout (s)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="each site's connect timeout (s)")
    parser.add_argument("--deadline", type=float, default=300.0, help="give up on sites still running after (s)")
    parser.add_argument("--traceback", action="store_true", help="add tracebacks to the errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    driver = Driver(args, site_names(args))
    report = driver.run()
    print(json.dumps(report), flush=True)
    code = 1 if report["errors"] else 0
    if report["stuck"]:
        sys.stderr.flush()
        os._exit(code)  # a stuck site's thread must not keep the process alive
    return code


if __name__ == "__main__":
    sys.exit(main())
