"""The simulator's progress bar over rounds (``flkit.sim.progress.RunDisplay``): drawn only on an
interactive terminal, and only while no site draws a live display of its own; otherwise, and in
tests and CI (no terminal), a line per event as before. The terminal here is a rich Console forced
to be one, writing into a StringIO."""

from __future__ import annotations

import contextvars
import io
import sys
import threading

import pytest
import rich
import torch
from rich.console import Console
from rich.progress import Progress

from flkit.job import FedAvgJob, ScriptRunner
from flkit.runner import site_console, thread_io
from flkit.server.controller import RoundRecord
from flkit.sim.progress import LIVE_DISPLAY, BarStream, RunDisplay, draws_bar
from flkit.sim.simulator import simulate


class FakeTTY(io.StringIO):
    """A terminal as far as isatty() tells."""

    def isatty(self) -> bool:
        return True


def terminal() -> tuple[Console, FakeTTY]:
    out = FakeTTY()
    return Console(file=out, force_terminal=True, force_interactive=True, width=120, color_system=None), out


def _events(display: RunDisplay, round_num: int, score: float, best: bool, failed: str | None = None) -> None:
    display({"type": "round_started", "round": round_num, "task": "train", "sites": ["site-1", "site-2"],
             "total_rounds": 3, "first_round": 0})
    display({"type": "result", "site": "site-1", "metrics": {"accuracy": score}})
    if failed:
        display({"type": "site_failed", "site": "site-2", "reason": failed})
    else:
        display({"type": "result", "site": "site-2", "metrics": {"accuracy": score}})
    record = RoundRecord(round=round_num, task="train", sites=["site-1", "site-2"],
                         metrics={"site-1": {"accuracy": score}}, score=score, best=best, seconds=0.25)
    display({"type": "round_finished", "round": round_num, "task": "train", "record": record,
             "key_metric": "accuracy"})


@pytest.fixture
def own_streams():
    """sys.stdout/sys.stderr of this test alone (the bar replaces and restores them). Set in the
    test's own phase: pytest's capture puts its streams back between setup and call."""
    saved = sys.stdout, sys.stderr
    streams = FakeTTY(), FakeTTY()

    def use() -> tuple[FakeTTY, FakeTTY]:
        sys.stdout, sys.stderr = streams
        return streams

    yield use
    sys.stdout, sys.stderr = saved


def test_the_choice_of_bar_or_lines():
    console, _ = terminal()
    assert draws_bar(console)
    assert not draws_bar(console, quiet=True)
    assert not draws_bar(Console(file=io.StringIO()))  # a file or a pipe: lines
    assert not draws_bar(Console(file=FakeTTY(), force_terminal=True, force_interactive=False))  # TERM=dumb etc.


def test_no_terminal_prints_lines_as_before(own_streams):
    own_streams = own_streams()
    out = io.StringIO()
    display = RunDisplay(Console(file=out, width=120, color_system=None))
    assert not display.drawing
    display.start()
    _events(display, 0, 0.5, True)
    display.stop()
    text = out.getvalue()
    assert "round 0 (1/3): train on 2 site(s)" in text and "site-1: accuracy=0.5" in text
    assert "done in 0.2 s: accuracy=0.5000 new best" in text
    assert sys.stdout is own_streams[0]


def test_a_terminal_gets_a_bar_with_the_best_score_and_prints_above_it(own_streams):
    own_streams = own_streams()
    console, out = terminal()
    display = RunDisplay(console)
    assert display.drawing
    display.start()
    try:
        assert isinstance(sys.stdout, BarStream) and isinstance(sys.stderr, BarStream)
        _events(display, 0, 0.5, True)
        print("a line a site printed")
        print("a warning", file=sys.stderr)
        _events(display, 1, 0.8, True, failed="deliberate <failure> [bold]")
        _events(display, 2, 0.7, False)
    finally:
        display.stop()
    assert sys.stdout is own_streams[0] and sys.stderr is own_streams[1]
    text = out.getvalue()
    assert "round 2: train" in text and "3/3" in text and "best accuracy=0.8000 (round 1)" in text
    assert "a line a site printed" in text and "a warning" in text  # above the bar, not into it
    assert "site-2 failed: deliberate <failure> [bold]" in text
    assert "round 0 (1/3)" not in text  # no event lines under the bar
    assert own_streams[0].getvalue() == "" and own_streams[1].getvalue() == ""
    assert not display.gave_way


@pytest.mark.parametrize("written", ["\r 50%|#####     | 5/10", "\x1b[?25l", "\x1b[2K\x1b[1A"])
def test_a_live_display_written_by_a_site_switches_to_lines(own_streams, written):
    own_streams = own_streams()
    console, out = terminal()
    display = RunDisplay(console)
    display.start()
    try:
        _events(display, 0, 0.5, True)
        display({"type": "round_started", "round": 1, "task": "train", "sites": ["site-1", "site-2"],
                 "total_rounds": 3, "first_round": 0})
        site = threading.Thread(target=lambda: sys.stderr.write(written))
        site.start()
        site.join()
        assert display.gave_way and not display.drawing
        display({"type": "result", "site": "site-1", "metrics": {"accuracy": 0.75}})
    finally:
        display.stop()
    text = out.getvalue()
    assert "a site draws its own progress display: the simulator prints lines from here on" in text
    assert "round 1 (2/3): train on 2 site(s)" in text  # the round in progress, again as a line
    assert "site-1: accuracy=0.75" in text
    assert own_streams[1].getvalue() == written  # the site's display itself went straight through
    assert sys.stdout is own_streams[0] and sys.stderr is own_streams[1]


def test_plain_lines_and_colours_are_no_live_display():
    for text in ("epoch 1 loss 0.3\n", "windows line\r\n", "\x1b[31mred\x1b[0m\n", "[site-1] done\n"):
        assert not LIVE_DISPLAY.search(text), text


def test_a_thread_site_with_its_own_rich_live_display_switches_to_lines(own_streams):
    """The path of a threads-backend site: its output goes through thread_io's prefixing stream,
    and rich.get_console() is its own Console (site_console); Lightning's RichProgressBar is a rich
    Progress on that console."""
    own_streams = own_streams()
    console, out = terminal()
    display = RunDisplay(console)
    display.start()
    seen = {}

    def site() -> None:
        thread_io.set_site_io(["train.py"], "[site-1] ")
        site_console.use_own_console()
        own = rich.get_console()
        seen["terminal"] = own.is_terminal
        with Progress(console=own, transient=True) as progress:
            progress.add_task("Epoch 0", total=3)
        print("after the site's bar")

    thread_io.install()
    site_console.install()
    try:
        thread = threading.Thread(target=contextvars.Context().run, args=(site,))
        thread.start()
        thread.join(30)
    finally:
        site_console.uninstall()
        thread_io.uninstall()
        display.stop()
    assert seen["terminal"], "the site's console should see the terminal through the bar's stream"
    assert display.gave_way
    written = own_streams[0].getvalue()  # the site's display and its print, straight through, prefixed
    assert written.startswith("[site-1] \x1b[?25l") and written.endswith("after the site's bar\n")
    assert "a site draws its own progress display" in out.getvalue()
    assert sys.stdout is own_streams[0] and sys.stderr is own_streams[1]


# -- through the simulator -------------------------------------------------------------------

PRINTING_SITE = """
import flkit as flare
flare.init()
while flare.is_running():
    model = flare.receive()
    print(f"hello from {flare.get_site_name()} in round {model.current_round}")
    if LIVE and model.current_round == 1:
        print("\\r 50%|#####     |", end="", flush=True)
        print("\\r100%|##########|")
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5 + 0.1 * model.current_round},
                             meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def _simulate(tmp_path, backend: str, live: bool) -> str:
    script = tmp_path / "code" / "site.py"
    script.parent.mkdir(parents=True)
    script.write_text(f"LIVE = {live}\n" + PRINTING_SITE)
    job = FedAvgJob(name="bar", initial_model=torch.nn.Linear(3, 2), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(script)))
    console, out = terminal()
    result = simulate(job.export_job(tmp_path / "jobs"), tmp_path / "ws", threads=2, backend=backend,
                      console=console)
    assert result.ok, result.reason
    return out.getvalue()


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_the_simulator_draws_the_bar_with_the_sites_lines_above_it(tmp_path, backend, own_streams):
    own_streams = own_streams()
    text = _simulate(tmp_path, backend, live=False)
    # The workers' output (processes backend) comes through this process, above the bar.
    for site in ("site-1", "site-2"):
        for round_num in range(3):
            assert f"[{site}] hello from {site} in round {round_num}" in text
    assert "best accuracy=0.7000 (round 2)" in text and "3/3" in text
    assert "round 0 (1/3): train on 2 site(s)" not in text
    assert "flkit job summary" in text and "job completed" in text
    assert sys.stdout is own_streams[0] and sys.stderr is own_streams[1]


def test_a_site_drawing_its_own_bar_makes_the_simulator_print_lines(tmp_path, own_streams):
    own_streams = own_streams()
    text = _simulate(tmp_path, "threads", live=True)
    assert "a site draws its own progress display: the simulator prints lines from here on" in text
    assert "round 2 (3/3): train on 2 site(s)" in text  # after the switch: lines
    assert "round 0 (1/3)" not in text  # before it: the bar
    assert "100%|##########|" in own_streams[0].getvalue()  # the site's own display, straight through
    assert sys.stdout is own_streams[0] and sys.stderr is own_streams[1]
