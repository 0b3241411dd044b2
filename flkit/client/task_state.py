"""Where a site is in its job: the one task state machine of the client side.

The Session (rank 0, or the only rank) owns it and moves it; everything else that needs to know
the site's task observes it instead of keeping its own copy: the DDP followers mirror rank 0's
states into one of these, the Lightning callback asks it whether the round's task is still
open, the runners ask it whether the script left a task unanswered.

    WAITING --fetched--> (a task pending) --taken--> HELD --answered--> ANSWERED
       ^                                                                  |
       +---------------------------- next task ---------------------------+
    any phase --job ended--> ENDED (final)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

from flkit.errors import FLKitError
from flkit.messages import Task


class Phase(str, Enum):
    WAITING = "waiting"  # no task held: the next receive() or is_running() asks for one
    HELD = "held"  # the script received a task and has not answered it
    ANSWERED = "answered"  # the held task was answered (kept for receive() by send(clear_cache=False))
    ENDED = "ended"  # the job is over for this site (or this launch did its share of tasks)


@dataclass
class TaskState:
    phase: Phase = Phase.WAITING
    task: Task | None = None  # the held (or answered and kept) task
    pending: Task | None = None  # fetched ahead by is_running(), not received yet
    answered: int = 0  # tasks this process answered
    end_reason: str = ""
    job_failed: bool = False
    last_task_name: str = ""
    # The heartbeat thread ends the job while the script's thread moves the task: one lock.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.phase == Phase.ENDED

    @property
    def holds_unanswered_task(self) -> bool:
        return self.phase == Phase.HELD

    def fetched(self, task: Task) -> None:
        """A task came from the server ahead of receive() (is_running() asks for it)."""
        with self.lock:
            if self.phase == Phase.ENDED:
                return
            if self.pending is not None:
                raise FLKitError(f"task {task.task_id} fetched while task {self.pending.task_id} is still pending")
            self.pending = task

    def take(self) -> Task | None:
        """receive(): the held task again, or the pending one, which becomes held."""
        with self.lock:
            if self.phase == Phase.HELD or (self.phase == Phase.ANSWERED and self.task is not None):
                return self.task
            if self.pending is None or self.phase == Phase.ENDED:
                return None
            self.task, self.pending = self.pending, None
            self.phase = Phase.HELD
            self.last_task_name = self.task.name
            return self.task

    def answer(self, keep: bool) -> None:
        """send() was accepted; with ``keep`` (send(clear_cache=False)) receive() still returns the task.
        After the end (the heartbeat learned it while the result was on its way) only the count moves."""
        with self.lock:
            if self.phase == Phase.ENDED:
                self.answered += 1
                return
            if self.phase not in (Phase.HELD, Phase.ANSWERED):
                raise FLKitError("send() without a task: call receive() first")
            self.answered += 1
            self.phase = Phase.ANSWERED
            if not keep:
                self.task = None

    def drop(self) -> None:
        """send() was refused: the task is no longer the site's (the server closed it)."""
        with self.lock:
            if self.phase in (Phase.HELD, Phase.ANSWERED):
                self.phase, self.task = Phase.WAITING, None

    def move_on(self) -> None:
        """is_running() after an answer: the loop goes to the next task."""
        with self.lock:
            if self.phase == Phase.ANSWERED:
                self.phase, self.task = Phase.WAITING, None

    def end(self, reason: str, failed: bool = False) -> None:
        """The job ended (or this launch answered its share); final."""
        with self.lock:
            if self.phase == Phase.ENDED:
                return
            self.phase, self.pending = Phase.ENDED, None
            self.end_reason, self.job_failed = reason, failed
