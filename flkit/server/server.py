"""FLServer: one job's gRPC endpoint plus the Controller thread that runs its rounds."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from flkit.errors import CommunicationError, ConfigError
from flkit.messages import JobEnd
from flkit.report.tracking import TrackingHub
from flkit.server.config import EVALUATE, WorkflowConfig, check_site_name
from flkit.server.controller import Controller, Event
from flkit.server.job_service import JobService
from flkit.server.listing import site_list
from flkit.server.persistor import Persistor, load_saved_run
from flkit.server.service import FLKitService, add_to_server
from flkit.server.shm_exchange import ShmExchange
from flkit.server.sites import SiteRegistry
from flkit.strategy.base import Strategy
from flkit.strategy.fedavg import FedAvg
from flkit.transport import memory
from flkit.wire.codec import Params, to_cpu_params
from flkit.wire.grpc_options import OPTIONS, PROTOCOL_VERSION

if TYPE_CHECKING:  # a server with a kit loads the certificate machinery (cryptography) when it starts
    from flkit.deploy.kit import Kit
    from flkit.server.identity import KitWatcher, Participants

log = logging.getLogger("flkit.server")

DEFAULT_UPLOAD_STALL_S = 300.0


class FLServer:
    """Serves one job on ``address`` ("host:port"; port 0 picks a free one).

    ``kit``: the server's startup kit (``flkit provision``): sites connect over mutual TLS and are
    who their certificates say (``flkit.server.identity``); no token then. Without a kit, ``token``
    authenticates sites over plain gRPC (one is generated when not given).
    ``resume``: go on after the last round completed in ``output_dir`` (``flkit server --resume``):
    its global model, best score, strategy state and records, with the same task ids.
    ``upload_stall_s``: a result upload that receives nothing for this long is cut off (default:
    the larger of 300 s and the heartbeat timeout).
    ``vouched_sites`` (with a kit): sites that need no certificate of their own, because the
    simulator's worker pool opens their sessions in this process (a worker's certificate then acts
    for them).
    ``accept_new_sites`` (with a kit): a site added to the project while the job runs
    (``flkit provision --add-site``) becomes a site of the job, as for jobs whose sites all run
    the same script (``to_clients``);
    ``on_event`` receives progress events (dicts) from the controller thread;
    ``concurrent_sites``: at most this many sites' results are in shared memory at once (the
    simulator's worker pool says how many it runs at once), which sizes the shared-memory folder
    the server needs (default: every site's).
    ``model_source``: where ``initial_params`` came from (``{"path", "sha256"}``); an evaluate-only
    job (workflow mode "evaluate") names it in ``evaluation.json``.
    """

    def __init__(
        self,
        workflow: WorkflowConfig,
        sites: list[str],
        initial_params: Params,
        output_dir: Path,
        job_id: str,
        address: str = "127.0.0.1:0",
        token: str | None = None,
        strategy: Strategy | None = None,
        on_event: Callable[[Event], None] | None = None,
        job_name: str | None = None,
        shared_memory: bool = True,
        concurrent_sites: int | None = None,
        kit: Kit | None = None,
        accept_new_sites: bool = False,
        vouched_sites: frozenset[str] = frozenset(),
        resume: bool = False,
        upload_stall_s: float | None = None,
        model_source: dict[str, str] | None = None,
    ) -> None:
        if not sites:
            raise ConfigError("a job needs at least one site")
        for site in sites:  # names become folders and log lines: only plain, bounded ones
            check_site_name(site)
        if workflow.min_clients > len(sites):
            raise ConfigError(f"min_clients={workflow.min_clients} is more than the job's {len(sites)} site(s)")
        unknown = [s for s in workflow.mandatory_clients if s not in sites]
        if unknown:
            raise ConfigError(f"mandatory_clients {unknown} are not sites of this job ({len(sites)} sites: "
                              f"{site_list(sites)})")
        if workflow.clients_per_round is not None and workflow.clients_per_round > len(sites):
            raise ConfigError(f"{workflow.clients_per_round} clients per round (the recipe's min_clients) is more "
                              f"than the job's {len(sites)} site(s)")
        self.workflow = workflow
        self.job_id = job_id
        # A result upload that receives no message (4 MiB) for this long is cut off, giving its
        # buffer back: at least 300 s (a link of 14 KB/s still gets through), and never less than
        # the heartbeat timeout.
        self.upload_stall_s = upload_stall_s or max(DEFAULT_UPLOAD_STALL_S, workflow.heartbeat_timeout_s)
        self.kit = kit
        self._accept_new_sites = accept_new_sites
        self._participants: Participants | None = None
        if kit is not None:
            if kit.role != "server":
                raise ConfigError(f"the kit at {kit.path} is a {kit.role}'s kit, not the server's")
            from flkit.server.identity import Participants

            self._participants = Participants(kit.path)
            revoked = [s for s in sites if s in self._participants.revoked_names]
            if revoked:
                raise ConfigError(f"site(s) {site_list(revoked)} of the job are revoked in project {kit.project}; "
                                  "leave them out of the job (-c/--clients), or provision sites with new names")
            strangers = [s for s in sites if s not in self._participants.sites and s not in vouched_sites]
            if strangers:
                raise ConfigError(f"site(s) {site_list(strangers)} of the job have no certificate in project "
                                  f"{kit.project} (provisioned sites: {site_list(sorted(self._participants.sites))}); "
                                  "add them with `flkit provision --add-site NAME`")
        self.token = None if kit is not None else (token or secrets.token_urlsafe(24))
        self._watcher: KitWatcher | None = None
        self._servicer: FLKitService | None = None
        self._bind = address
        self._concurrent_sites = concurrent_sites
        self.registry = SiteRegistry(
            job_id=job_id,
            sites=list(sites),
            token=self.token,
            heartbeat_timeout_s=workflow.heartbeat_timeout_s,
            client_config={
                "job_id": job_id,
                "num_sites": len(sites),
                "total_rounds": workflow.last_round + 1,  # as every task says (start_round + num_rounds)
                "params_transfer_type": workflow.params_transfer_type,
                "key_metric": workflow.key_metric,
                "tracking": bool(workflow.tracking),
                "dry_run": workflow.dry_run,  # flare.is_dry_run()
            },
        )
        if resume and workflow.mode == EVALUATE:
            log.info("an evaluate-only job has no rounds to go on from: it runs its evaluation again")
            resume = False
        saved = load_saved_run(output_dir) if resume else None
        if saved is not None and saved.state.get("status") == "completed":
            raise ConfigError(f"the job in {output_dir} already completed ({saved.state.get('reason')}); nothing to "
                              "resume")
        self.persistor = Persistor(output_dir)
        self.controller = Controller(
            workflow,
            self.registry,
            strategy or FedAvg(),
            self.persistor,
            to_cpu_params(initial_params),
            on_event,
            model_source,
        )
        self.resumed_after: int | None = None  # the round a resumed job went on after
        if saved is not None:
            self.controller.resume(saved)
            self.resumed_after = saved.round
        elif resume:
            log.info("nothing to resume in %s: the job starts at its first round", output_dir)
        # Built last (it starts a thread), and now: a missing tracking library fails before any site starts.
        self.tracking = TrackingHub(workflow.tracking, self.persistor.directory, job_name or job_id)
        self.registry.on_site_failed = self.controller.site_failed
        self.service = JobService(self.registry, self.controller, self.tracking, PROTOCOL_VERSION)
        self._shared_memory = shared_memory
        self.shm: ShmExchange | None = None
        self._grpc: grpc.Server | None = None
        self._thread: threading.Thread | None = None
        self.outcome: JobEnd | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        host = self._bind.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> str:
        """Bind, serve, and start the round loop; returns the "host:port" sites should dial."""
        workers = max(16, 2 * len(self.registry.sites) + 8)
        interceptor = None
        if self._participants is not None:
            from flkit.server.identity import IdentityInterceptor

            interceptor = IdentityInterceptor(self._participants)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTIONS,
                                 interceptors=[interceptor] if interceptor is not None else None)
        if self._shared_memory:  # sites on this host may take params through /dev/shm files
            self.shm = ShmExchange.create(self.controller.model_bytes,
                                          self._concurrent_sites or len(self.registry.sites))
            if self.shm is not None:
                self.service.offers.update(self.shm.offers)
                self.controller.keep_models_in(self.shm.folder)  # sites on this host map them by name
        self._servicer = FLKitService(self.service, self.shm, stall_s=self.upload_stall_s,
                                     journal_dir=self.persistor.directory / ".uploads")
        add_to_server(self._servicer, self._grpc)
        try:
            if self.kit is not None:
                from flkit.transport.tls import server_credentials

                self.port = self._grpc.add_secure_port(self._bind, server_credentials(self.kit))
            else:
                self.port = self._grpc.add_insecure_port(self._bind)
        except RuntimeError as exc:
            self._release()
            raise CommunicationError(f"cannot listen on {self._bind}: {exc}") from exc
        if not self.port:
            self._release()
            raise CommunicationError(f"cannot listen on {self._bind} (address in use?)")
        self._grpc.start()
        if interceptor is not None and self._participants is not None:
            from flkit.server.identity import KitWatcher

            self._watcher = KitWatcher(self._participants, interceptor, self._site_added, self.registry.revoke)
            self._watcher.start()
        memory.register(self.address, self.service)  # sites in this process reach it without the network
        self._thread = threading.Thread(target=self._run, name=f"flkit-controller-{self.job_id}", daemon=True)
        self._thread.start()
        log.info("job %s served on %s (%s)", self.job_id, self.address,
                 "mutual TLS" if self.kit is not None else "plain text")
        return self.address

    def _site_added(self, site: str) -> None:
        try:
            check_site_name(site)
        except ConfigError as exc:
            log.error("the server kit lists a site that cannot be admitted: %s", exc)
            return
        if self._accept_new_sites and self.registry.add_site(site):
            log.info("site %s is now a site of job %s", site, self.job_id)

    def _release(self) -> None:
        """What a server that could not start must not leave behind."""
        self.tracking.close()
        if self.shm is not None:
            self.shm.close()

    def _run(self) -> None:
        self.outcome = self.controller.run()

    def wait(self, timeout: float | None = None) -> JobEnd | None:
        """Block until the job ends (or timeout); returns the outcome, None if still running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.outcome

    def drain(self, timeout: float | None = None) -> bool:
        """After the job ended, keep serving until every site has been told and left.

        A site busy training when the job ended learns it from its next heartbeat or
        from the answer to its result, then leaves. Default wait: two heartbeats and a bit.
        Returns True if all sites left in time.
        """
        if timeout is None:
            timeout = 2 * self.workflow.heartbeat_interval_s + 5.0
        return self.registry.wait_all_gone(timeout)

    def stop(self, grace: float = 2.0) -> None:
        """End the job (if still running) and stop serving."""
        self.registry.finish(True, "server stopped")
        if self._watcher is not None:
            self._watcher.stop()
        if self._servicer is not None:
            self._servicer.stalls.close()
        if self.port is not None:
            memory.unregister(self.address, self.service)
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + 1)
        if self._thread is not None:
            self._thread.join(grace + 5)
        self.tracking.close()
        if self.shm is not None:
            self.shm.close()
        try:
            self.persistor.close(timeout=60.0)
        except OSError as exc:  # already reported as the job's failure
            log.debug("persistor: %s", exc)
        self.registry.on_site_failed = None  # break the registry <-> controller cycle so memory frees now

    def __enter__(self) -> FLServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
