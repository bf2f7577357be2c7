"""Run the watcher as a service: a Controller that runs only while this replica holds the Lease.

Non-leaders renew nothing and poll the Lease every ``renew_seconds``. A leader that fails to
renew for a whole lease duration (API unreachable), or finds another holder, stops its
Controller before anyone else can take over, so two controllers never enqueue at once for
longer than clock drift allows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from watcher import metrics
from watcher.lease import LeaderElector
from watcher.loop import CONNECTION_ERRORS, Controller

log = logging.getLogger(__name__)


class WatcherService:
    """Leader election around a Controller built fresh for each leadership term."""

    def __init__(
        self,
        *,
        elector: LeaderElector,
        make_controller: Callable[[], Controller],
        renew_seconds: float | None = None,
    ) -> None:
        self.elector = elector
        self.make_controller = make_controller
        self.renew_seconds = renew_seconds or max(elector.duration_seconds / 3, 0.2)
        self.controller: Controller | None = None
        self.stopped = threading.Event()
        self.leading = threading.Event()

    def run(self) -> None:
        """Elect, lead and step down until ``stop``; then release the Lease."""
        last_renewal = 0.0
        log.info("watcher %s waits for Lease %s", self.elector.identity, self.elector.display)
        try:
            while not self.stopped.is_set():
                leader = False
                try:
                    leader = self.elector.try_acquire_or_renew()
                    if leader:
                        last_renewal = time.monotonic()
                except (ApiException, *CONNECTION_ERRORS) as error:
                    log.warning("Lease %s: renewal failed: %s", self.elector.display, error)
                    # Keep leading through a short outage, never past the lease duration.
                    leader = self.controller is not None and (
                        time.monotonic() - last_renewal < self.elector.duration_seconds * 2 / 3
                    )
                if leader and self.controller is None:
                    log.info("watcher %s leads; starting the controller", self.elector.identity)
                    self.controller = self.make_controller()
                    self.controller.start()
                    self.leading.set()
                    metrics.LEADER.set(1)
                elif not leader and self.controller is not None:
                    log.warning("watcher %s lost Lease %s; stopping the controller",
                                self.elector.identity, self.elector.display)
                    self._step_down()
                self.stopped.wait(self.renew_seconds)
        finally:
            if self.controller is not None:
                self._step_down()
                self.elector.release()

    def stop(self) -> None:
        self.stopped.set()

    def _step_down(self) -> None:
        assert self.controller is not None
        self.controller.stop()
        self.controller = None
        self.leading.clear()
        metrics.LEADER.set(0)
