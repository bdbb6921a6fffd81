"""Background jobs: run the command line in a separate process and read its JSON lines.

Training, synthesis and atlas runs take minutes to hours; the Slicer window must not freeze
and a crash of the job must not take the scene with it. So they run as
``python -m MicroCTSynthLib <command> ... --progress json`` (inside Slicer the module passes
PythonSlicer as ``python``) in a process of their own::

    job = Job(engine_command("train", "--data", D, ...), on_event=print).start()
    while job.poll():          # the Slicer module calls poll() from a QTimer on the GUI thread
        ...
    job.wait()                 # or block: console scripts and tests

A reader thread parses each stdout line (one JSON object, see :mod:`progress`) into a queue;
:meth:`Job.poll` drains it on the caller's thread, so callbacks may touch the MRML scene.
:meth:`Job.cancel` kills the whole process tree (the job's own process group on POSIX,
``taskkill /T`` on Windows), so workers a job started die with it.

States: ``idle`` -> ``running`` -> ``importing`` (the caller's ``on_result`` loads outputs)
-> ``done``; ``failed`` with :attr:`Job.error`, the job's own ``error`` sentence when it gave
one; ``cancelling`` -> ``cancelled``. A callback of the caller that raises fails the job with
its sentence (:meth:`Job.fail`), so the user sees that error rather than "cancelled". Plain
Python: no Slicer, no Qt.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .errors import MicroCTSynthError

#: The folder holding the ``MicroCTSynthLib`` package, put on the job's ``PYTHONPATH`` so that
#: a module loaded from a source folder runs the same engine as it imports.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

_EOF = object()


class JobState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    IMPORTING = "importing"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"
    DONE = "done"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def engine_command(command: str, *args: str, python: str | None = None, progress: bool = True) -> list[str]:
    """``[python, -m, MicroCTSynthLib, command, *args, --progress, json]``."""
    cmd = [python or sys.executable, "-m", "MicroCTSynthLib", command, *[str(a) for a in args]]
    if progress:
        cmd += ["--progress", "json"]
    return cmd


def engine_environment(base: dict | None = None, threads: int | None = None) -> dict:
    """The job's environment: ``PYTHONPATH`` led by :data:`PACKAGE_ROOT`, unbuffered output."""
    env = dict(os.environ if base is None else base)
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def parse_line(line: str) -> dict:
    """A stdout line as an event: the JSON object, or ``{"event": "log", "message": line}``."""
    text = line.strip()
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "event" in record:
            return record
    return {"event": "log", "message": text}


_CLI_ERROR = re.compile(r"^microctsynth [\w-]+: error: (.+)$")


def error_from_stderr(lines, returncode: int | None) -> str:
    """The sentence of a job that ended without a JSON ``error`` event.

    The command line prints ``microctsynth <command>: error: <sentence>`` before exiting with
    status 2; that sentence is the message. Otherwise the last line of stderr (a traceback's
    last line names the exception) with the exit status.
    """
    lines = [ln for ln in lines if ln.strip()]
    for line in reversed(lines):
        match = _CLI_ERROR.match(line.strip())
        if match:
            return match.group(1)
    tail = lines[-1].strip() if lines else ""
    return f"The job stopped with exit status {returncode}" + (f": {tail}" if tail else ".")


class Job:
    """One background process speaking the JSON-lines protocol.

    ``command``: the argument list (see :func:`engine_command`). ``on_event(event)``: called
    from :meth:`poll` for each event, in order. ``on_result(job)``: called once the process
    exited with status 0 (state ``importing``); its return value becomes :attr:`result`, and an
    exception it raises fails the job with that sentence. ``on_finish(job)``: called once the
    job has ended in any state (done, failed, cancelled), e.g. to tidy up temporary files.
    """

    #: stderr lines kept for the error message of a job that failed without an ``error`` event
    STDERR_LINES = 50
    #: events kept in :attr:`events` (the latest ones): a training of hours must not fill memory
    EVENTS_KEPT = 1000

    def __init__(self, command: list[str], on_event: Callable[[dict], None] | None = None,
                 on_result: Callable[["Job"], object] | None = None, cwd=None, env: dict | None = None,
                 on_finish: Callable[["Job"], None] | None = None):
        self.command = [str(c) for c in command]
        self.on_event = on_event
        self.on_result = on_result
        self.on_finish = on_finish
        self.cwd = cwd
        self.env = engine_environment() if env is None else env
        self.state = JobState.IDLE
        self.events: deque[dict] = deque(maxlen=self.EVENTS_KEPT)
        self.progress: dict = {}
        self.outputs: dict = {}
        self.error: str | None = None
        #: the job's warnings (``log`` events of level ``warning``): doubtful inputs, locks taken over
        self.warnings: list[str] = []
        self.result = None
        self.returncode: int | None = None
        self.stderr: deque[str] = deque(maxlen=self.STDERR_LINES)
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stdout_done = False
        self._failure: str | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "Job":
        if self.state != JobState.IDLE:
            raise MicroCTSynthError("This job has already been started.")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            # Its own session and process group: cancel() kills the job and every child it made.
            kwargs["start_new_session"] = True
        try:
            self._process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.env, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        except OSError as exc:
            self.state = JobState.FAILED
            self.error = f"The job could not start ({self.command[0]}): {exc.strerror or exc}."
            if self.on_finish is not None:
                self.on_finish(self)
            raise MicroCTSynthError(self.error) from None
        self.started_at = time.monotonic()
        self.state = JobState.RUNNING
        for target, stream in ((self._read_stdout, self._process.stdout), (self._read_stderr, self._process.stderr)):
            thread = threading.Thread(target=target, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read_stdout(self, stream) -> None:
        try:
            for line in stream:
                if line.strip():
                    self._queue.put(parse_line(line))
        finally:
            self._queue.put(_EOF)

    def _read_stderr(self, stream) -> None:
        for line in stream:
            line = line.rstrip()
            if line:
                self.stderr.append(line)

    @property
    def running(self) -> bool:
        return self.state in (JobState.RUNNING, JobState.CANCELLING, JobState.IMPORTING)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    # -- events -----------------------------------------------------------------------------
    def poll(self) -> bool:
        """Handle the queued events (callbacks run here); ``True`` while the job is not finished."""
        if self.state == JobState.IDLE:
            return False  # not started: nothing to handle
        while not self.state.finished:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._stdout_done = True
                continue
            try:
                self._handle(item)
            except Exception as exc:  # the caller's on_event failed: the job fails with its sentence
                self.fail(str(exc) if isinstance(exc, MicroCTSynthError)
                          else f"Showing the job's progress failed: {type(exc).__name__}: {exc}")
        if not self.state.finished and self._stdout_done and self._process.poll() is not None:
            self._finish()
        return not self.state.finished

    def _handle(self, event: dict) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind == "progress":
            self.progress = event
        elif kind == "result":
            self.outputs.update(event.get("outputs") or {})
        elif kind == "error":
            self.error = str(event.get("message") or "The job failed.")
        elif kind == "log" and event.get("level") == "warning":
            self.warnings.append(str(event.get("message") or ""))
        if self.on_event is not None and self.state != JobState.CANCELLING:
            self.on_event(event)

    def _finish(self) -> None:
        try:
            self._conclude()
        finally:
            if self.on_finish is not None:
                self.on_finish(self)

    def _conclude(self) -> None:
        for thread in self._threads:
            thread.join(timeout=1.0)
        self.returncode = self._process.returncode
        self.ended_at = time.monotonic()
        if self.state == JobState.CANCELLING:
            if self._failure is not None:
                self.state, self.error = JobState.FAILED, self._failure
            else:
                self.state = JobState.CANCELLED
            return
        if self.returncode != 0:
            self.state = JobState.FAILED
            if not self.error:
                self.error = error_from_stderr(self.stderr, self.returncode)
            return
        self.state = JobState.IMPORTING
        try:
            if self.on_result is not None:
                self.result = self.on_result(self)
        except Exception as exc:  # the sentence reaches the caller; the job is not done
            self.state = JobState.FAILED
            self.error = str(exc) if isinstance(exc, MicroCTSynthError) else f"Loading the results failed: {type(exc).__name__}: {exc}"
            return
        self.state = JobState.DONE

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobState:
        """Poll until the job has finished (or ``timeout`` seconds, then cancel it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self.error = f"The job did not finish within {timeout:g} s and was cancelled."
            time.sleep(interval)
        return self.state

    # -- cancel -----------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """End the job as failed with ``message`` (e.g. a callback of the caller raised): the
        process tree is stopped as by :meth:`cancel` and no result is loaded."""
        if self._process is None or self.state.finished:
            self.state, self.error = JobState.FAILED, message
            return
        self._failure = message
        self.cancel()

    def cancel(self, grace: float = 2.0) -> None:
        """Stop the job and every process it started; no result is loaded."""
        if self._process is None or self.state.finished:
            return
        self.state = JobState.CANCELLING
        if self._process.poll() is None:
            kill_process_tree(self._process, grace)
        # Drain what is left so that wait()/poll() finish promptly.
        self.poll()


def kill_process_tree(process: subprocess.Popen, grace: float = 2.0) -> None:
    """Terminate ``process`` and its descendants: politely, then for good after ``grace`` s."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
        return
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            # The leader is gone; grandchildren in the group may linger, so finish them too.
            os.killpg(group, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        break
