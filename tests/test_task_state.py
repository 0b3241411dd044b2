"""The client's one task state machine: the transitions the Client API relies on."""

from __future__ import annotations

import pytest

from flkit.client.task_state import Phase, TaskState
from flkit.errors import FLKitError
from flkit.messages import Task


def _task(i: int) -> Task:
    return Task(f"t{i}", "train", i, 3)


def test_a_task_goes_waiting_held_answered_and_the_loop_moves_on():
    state = TaskState()
    assert state.take() is None and state.phase == Phase.WAITING
    state.fetched(_task(0))
    assert state.phase == Phase.WAITING and state.pending is not None  # is_running() looked ahead
    assert state.take().task_id == "t0" and state.phase == Phase.HELD and state.holds_unanswered_task
    assert state.take().task_id == "t0"  # receive() again: the same task until it is answered
    state.answer(keep=False)
    assert state.phase == Phase.ANSWERED and state.task is None and state.answered == 1
    assert state.last_task_name == "train" and not state.holds_unanswered_task
    state.move_on()
    assert state.phase == Phase.WAITING


def test_send_with_clear_cache_false_keeps_the_task_for_receive_until_the_loop_moves_on():
    state = TaskState()
    state.fetched(_task(0))
    state.take()
    state.answer(keep=True)
    assert state.take().task_id == "t0"  # NVFlare's clear_cache=False
    state.move_on()
    assert state.take() is None


def test_a_refused_result_drops_the_task_and_send_without_a_task_is_an_error():
    state = TaskState()
    with pytest.raises(FLKitError, match="receive\\(\\) first"):
        state.answer(keep=False)
    state.fetched(_task(0))
    state.take()
    state.drop()
    assert state.phase == Phase.WAITING and state.task is None and state.answered == 0


def test_the_end_is_final_and_keeps_its_first_reason():
    state = TaskState()
    state.fetched(_task(0))
    state.end("completed 3 round(s)")
    state.end("a later reason", failed=True)
    state.fetched(_task(1))  # a late task after the end is ignored
    assert state.ended and state.pending is None and state.take() is None
    assert (state.end_reason, state.job_failed) == ("completed 3 round(s)", False)


def test_two_tasks_cannot_be_pending_at_once():
    state = TaskState()
    state.fetched(_task(0))
    with pytest.raises(FLKitError, match="still pending"):
        state.fetched(_task(1))
