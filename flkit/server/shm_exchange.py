"""The server's shared-memory folder: params for sites on this host go through files, not the socket.

One folder per job, ``/dev/shm/flkit-<pid>-<random>`` (mode 0700), with a probe file a site
must be able to read (same host, same user) before it uses the folder, and a lock file the server
holds an ``flock`` on for as long as it lives: a folder whose lock can be taken belongs to a server
that is gone, whatever process ids say (they repeat, and differ between PID namespaces).

Global models are files of this folder from the start: the controller keeps them here
(flkit.shared_model, ``Controller.keep_models_in``), so a task's params are already a file the
sites can map, and the strategy wrote them there; nothing is copied to give them out. Such a file
is written again (two rounds later) only once every site it was given to has said, with its next
request for a task, that it let go of its mapping; a site that never says so (it died, it keeps
the params) keeps that file from reuse for good, and a new one is made instead. Params that are
not such a file (a model loaded for cross-site evaluation, or when the folder filled up) are
written to a file once per task, whatever the number of sites that map it. A site's result is
mapped and folded in before the server answers, and the site reuses the file's memory for its
next result. The folder goes at job end; a folder left by a server that was killed is removed by
the next server that starts on this host.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path

from flkit.errors import ValidationError
from flkit.messages import Task
from flkit.pids import alive
from flkit.shared_model import SharedModel, shared_model_of
from flkit.wire import shm_files
from flkit.wire.codec import Params

log = logging.getLogger("flkit.server")

LOCK_FILE = "lock"
# Files a site may say it let go of in one request (it maps one or two at a time).
MAX_RELEASED = 64
# Room kept free in /dev/shm beyond the files a round needs.
MARGIN_BYTES = 16 * 1024 * 1024


def _abandoned(folder: Path, pid: int) -> bool:
    """True when no live server holds the folder's lock (or, for a folder without one, its pid is gone)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return not alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live server holds it
    finally:
        os.close(fd)  # closing releases the lock taken here
    return True


def remove_stale_folders(root: Path = shm_files.SHM_ROOT) -> list[Path]:
    """Folders of this user whose server is gone (killed before it could clean up)."""
    removed: list[Path] = []
    try:
        entries = list(root.glob(f"{shm_files.FOLDER_PREFIX}*"))
    except OSError:
        return removed
    for folder in entries:
        parts = folder.name.split("-")
        try:
            pid = int(parts[1])
            owned = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except (IndexError, ValueError, OSError):
            continue
        if owned and _abandoned(folder, pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class ShmExchange:
    """A job's shared-memory folder on the server side."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.probe = secrets.token_hex(16)
        self._lock_fd = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # held until close(): the folder is in use
        shm_files.create_private(folder / shm_files.PROBE_FILE)
        (folder / shm_files.PROBE_FILE).write_text(self.probe)
        self._lock = threading.Lock()
        self._task_files: dict[str, tuple[str, int]] = {}
        self._spare: Path | None = None  # the next task file, allocated ahead (_prepare_spare)
        self._recent_tasks: list[str] = []  # the last two tasks given out: their result files stay
        # Global models given out as they are (files of this folder), by file name; the last two
        # tasks' are kept alive here, so their files stay for sites that have yet to open them.
        self._given: weakref.WeakValueDictionary[str, SharedModel] = weakref.WeakValueDictionary()
        self._kept: dict[str, SharedModel] = {}
        self._spare_maker: threading.Thread | None = None
        self._closed = False

    @classmethod
    def create(cls, model_bytes: int, n_sites: int, root: Path = shm_files.SHM_ROOT) -> ShmExchange | None:
        """The folder, or None (with the reason logged) when /dev/shm is missing or too small for
        a round: the current global model, the next one and one result per site."""
        if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
            log.info("no shared-memory transport: %s is missing or not writable", root)
            return None
        removed = remove_stale_folders(root)
        if removed:
            log.info("removed %d shared-memory folder(s) of servers that are gone", len(removed))
        need = model_bytes * (n_sites + 2) + MARGIN_BYTES  # two global models, a result per site
        free = shm_files.free_bytes(root)
        if free < need:
            log.warning("no shared-memory transport: %s has %.0f MiB free, a round needs %.0f MiB; sites on this "
                        "host use gRPC", root, free / 2**20, need / 2**20)
            return None
        folder = root / f"{shm_files.FOLDER_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            folder.mkdir(mode=0o700)
            return cls(folder)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("no shared-memory transport: cannot create %s: %s", folder, exc)
            return None

    @property
    def offers(self) -> dict[str, str]:
        return {"shm": str(self.folder), "shm_probe": self.probe}

    def task_file(self, task: Task, holder: str) -> tuple[str, int]:
        """The file holding ``task``'s params, for the site whose session is ``holder``: the params'
        own file when they are a global model kept in this folder, else a file written at the first
        request (older such files go)."""
        if task.params is None:
            raise ValueError("a task without params has no file")
        model = shared_model_of(task.params)
        with self._lock:
            if self._closed:
                raise OSError("the job's shared-memory folder is closed")
            if model is not None and model.path is not None and model.path.parent == self.folder:
                model.hold(holder)
                self._given[model.path.name] = model
                if task.task_id not in self._kept:
                    self._kept = {**dict(list(self._kept.items())[-1:]), task.task_id: model}
                    self._note_task(task.task_id)
                return model.path.name, model.size
            known = self._task_files.get(task.task_id)
            if known is not None:
                return known
            for old, _ in self._task_files.values():  # sites that mapped them keep their mapping
                (self.folder / old).unlink(missing_ok=True)
            self._task_files.clear()
            name = shm_files.task_file_name(task.task_id)
            spare = self._take_spare()
            size = shm_files.write_params_file(self.folder, name, task.params, reuse=spare)
            self._task_files[task.task_id] = (name, size)
            self._prepare_spare(size)
            self._note_task(task.task_id)
            return name, size

    def release(self, holder: str, names: Iterable[str]) -> None:
        """The site whose session is ``holder`` no longer maps these files (names of files it was
        given; anything else is ignored)."""
        with self._lock:
            for name in list(names)[:MAX_RELEASED]:
                model = self._given.get(name)
                if model is not None:
                    model.release(holder)

    def _note_task(self, task_id: str) -> None:
        """A task given out for the first time: result files of tasks before the last two go."""
        if task_id not in self._recent_tasks:
            self._recent_tasks = [*self._recent_tasks[-1:], task_id]
            self._remove_old_results()

    def _remove_old_results(self) -> None:
        """Result files of tasks before the last two: a site keeps its last result file to write
        the next one over, so only a site that died, left or joined again leaves one this old (a
        live site that finds its file gone simply writes a new one)."""
        for path in self.folder.glob("result-*.safetensors"):
            task_id = path.name[:-len(".safetensors")].rsplit("-", 1)[-1]
            if task_id not in self._recent_tasks:
                path.unlink(missing_ok=True)

    def _take_spare(self) -> Path | None:
        """The spare file made for this write, once its pages are in (None if there is none)."""
        maker, self._spare_maker = self._spare_maker, None
        if maker is None:
            return None
        maker.join()
        return self._spare if self._spare is not None and self._spare.exists() else None

    def _prepare_spare(self, size: int) -> None:
        """Allocate the next task's file now, in the background: a new tmpfs file's pages are zeroed
        by the kernel when first touched (about three times the cost of the copy), and the next
        round's sites wait for its task file; nobody maps a spare, so writing over it is safe."""
        name = shm_files.task_file_name(secrets.token_hex(8))
        path = self.folder / name

        def allocate() -> None:
            try:
                shm_files.create_private(path)
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
            except OSError as exc:  # /dev/shm tight: the next task file is written into new pages
                log.debug("no spare task file (%s)", exc)
                path.unlink(missing_ok=True)

        self._spare = path
        self._spare_maker = threading.Thread(target=allocate, name="flkit-shm-spare", daemon=True)
        self._spare_maker.start()

    def take_result(self, session_id: str, task_id: str, name: str, size: int) -> Params:
        """A site's result file, mapped copy-on-write (no copy). The file stays the site's: it writes
        its next result over it once the server has answered (the mapping is not used after that)."""
        return shm_files.map_params_file(self.result_path(session_id, task_id, name), size)

    def result_path(self, session_id: str, task_id: str, name: str) -> Path:
        """Where the site of ``session_id`` wrote its result for ``task_id`` (ValidationError if
        ``name`` is not that file's name)."""
        if name != shm_files.result_file_name(session_id, task_id):
            raise ValidationError(f"result file {name[:80]!r} is not this session's file for task {task_id}")
        return self.folder / shm_files.check_name(name)

    def close(self) -> None:
        """Remove the folder and every file in it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._task_files.clear()
            self._kept.clear()
            maker, self._spare_maker = self._spare_maker, None
        if maker is not None:
            maker.join()
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock_fd)
