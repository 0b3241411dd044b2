"""In-process sites share one sys.stdout: their output is prefixed, and ending a run never crashes.

The crash this guards against: CPython 3.11's print() holds a borrowed reference to sys.stdout while
it writes. When the last in-process site ended, flkit put the real stream back and dropped its
wrapper; a thread still printing through the wrapper (another site's teardown, a script's logging
thread) then wrote through a freed object and the whole process died with SIGSEGV.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

RACE = textwrap.dedent("""
    import io, sys, threading
    from flkit.runner import thread_io

    stop = threading.Event()

    def printer():
        while not stop.is_set():
            print("x", end="")

    sys.stdout = io.StringIO()
    thread_io.install()
    threads = [threading.Thread(target=printer) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(20000):  # each cycle puts the real stream back while the threads print
        thread_io.uninstall()
        thread_io.install()
    stop.set()
    for t in threads:
        t.join()
    thread_io.uninstall()
    sys.__stdout__.write("done\\n")
""")


def test_restoring_the_real_stream_while_threads_print_does_not_crash():
    proc = subprocess.run([sys.executable, "-c", RACE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode} (-11 is SIGSEGV)\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "done"


def test_output_of_a_site_thread_is_prefixed_and_other_threads_are_not(capsys):
    import threading

    from flkit.runner import thread_io

    thread_io.install()
    try:
        def site() -> None:
            thread_io.set_site_io(["script.py"], "[site-1] ")
            print("first\nsecond")

        worker = threading.Thread(target=site)
        worker.start()
        worker.join()
        print("from the main thread")
    finally:
        thread_io.uninstall()
    out = capsys.readouterr().out.splitlines()
    assert out == ["[site-1] first", "[site-1] second", "from the main thread"]
