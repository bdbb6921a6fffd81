"""The background job runner with real subprocesses: order of events, cancel, errors."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from MicroCTSynthLib.process import Job, JobState, engine_command, engine_environment, error_from_stderr, parse_line


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return path


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_progress_arrives_in_order_and_result_is_imported(tmp_path):
    child = _script(tmp_path, """
        import json, sys, time
        print("plain text is a log line", flush=True)
        for step in range(1, 8):
            print(json.dumps({"event": "progress", "task": "train", "step": step, "total": 7,
                              "seconds_left": 7 - step, "G_L1": 1.0 / step}), flush=True)
            time.sleep(0.01)
        print("warning on stderr", file=sys.stderr, flush=True)
        print(json.dumps({"event": "result", "outputs": {"best": "run/best.pt"}}), flush=True)
    """)
    seen = []
    job = Job([sys.executable, str(child)], on_event=seen.append, on_result=lambda j: ("loaded", j.outputs["best"]))
    assert job.state == JobState.IDLE
    job.start()
    assert job.state == JobState.RUNNING
    assert job.wait(timeout=60) == JobState.DONE
    steps = [e["step"] for e in seen if e["event"] == "progress"]
    assert steps == list(range(1, 8))
    assert seen[0] == {"event": "log", "message": "plain text is a log line"}
    assert seen[-1]["event"] == "result"
    assert job.progress["seconds_left"] == 0 and job.progress["G_L1"] == pytest.approx(1 / 7)
    assert job.result == ("loaded", "run/best.pt")
    assert job.returncode == 0 and job.error is None
    assert "warning on stderr" in job.stderr


def test_engine_warnings_are_kept_apart_from_log_lines(tmp_path):
    """``progress.warn`` in a job (``--progress json``) is a log event of level warning: the job
    keeps its sentence in ``warnings`` for the panel; plain log lines stay out of it."""
    child = _script(tmp_path, """
        from MicroCTSynthLib.progress import log, warn
        log("Synthesis: 27 windows.", "json")
        warn("The CT's voxels are up to 0.70 mm.", "json")
    """)
    seen = []
    job = Job([sys.executable, str(child)], on_event=seen.append)
    job.start()
    assert job.wait(timeout=60) == JobState.DONE
    assert job.warnings == ["The CT's voxels are up to 0.70 mm."]
    assert seen == [{"event": "log", "message": "Synthesis: 27 windows."},
                    {"event": "log", "message": "The CT's voxels are up to 0.70 mm.", "level": "warning"}]


def test_poll_drives_the_job_without_blocking(tmp_path):
    child = _script(tmp_path, """
        import json, time
        for step in range(3):
            print(json.dumps({"event": "progress", "step": step + 1, "total": 3}), flush=True)
            time.sleep(0.2)
    """)
    job = Job([sys.executable, str(child)]).start()
    polls = 0
    while job.poll():
        polls += 1
        time.sleep(0.02)
    assert polls > 3  # poll() returned at once, many times, while the child worked
    assert job.state == JobState.DONE and [e["step"] for e in job.events] == [1, 2, 3]


def test_cancel_kills_the_child_and_its_grandchild(tmp_path):
    child = _script(tmp_path, """
        import json, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(json.dumps({"event": "log", "message": "started", "grandchild": grandchild.pid}), flush=True)
        time.sleep(120)
        print(json.dumps({"event": "result", "outputs": {}}), flush=True)
    """)
    imported = []
    job = Job([sys.executable, str(child)], on_result=imported.append).start()
    deadline = time.monotonic() + 30
    while not any(e.get("grandchild") for e in job.events):
        assert time.monotonic() < deadline, "the child never reported"
        job.poll()
        time.sleep(0.02)
    grandchild = next(e["grandchild"] for e in job.events if e.get("grandchild"))
    assert _alive(job.pid) and _alive(grandchild)
    job.cancel()
    assert job.wait(timeout=30) == JobState.CANCELLED
    deadline = time.monotonic() + 10
    while (_alive(job.pid) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(job.pid) and not _alive(grandchild)
    assert imported == [] and job.result is None  # a cancelled job loads nothing


def test_error_event_sentence_reaches_the_caller(tmp_path):
    child = _script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "progress", "step": 1, "total": 2}), flush=True)
        print(json.dumps({"event": "error", "message": "The CT has no voxels inside the region of interest."}), flush=True)
        sys.exit(2)
    """)
    imported = []
    job = Job([sys.executable, str(child)], on_result=imported.append).start()
    assert job.wait(timeout=60) == JobState.FAILED
    assert job.error == "The CT has no voxels inside the region of interest."
    assert job.returncode == 2 and imported == []


def test_failing_engine_command_sentence_reaches_the_caller(tmp_path):
    missing = tmp_path / "missing.nrrd"
    command = engine_command("evaluate", "--reference", str(missing), "--prediction", str(tmp_path / "p.nrrd"),
                             progress=False)
    assert command[:3] == [sys.executable, "-m", "MicroCTSynthLib"]
    # Run from elsewhere: the job's PYTHONPATH must find the engine by itself.
    job = Job(command, cwd=tmp_path).start()
    assert job.wait(timeout=120) == JobState.FAILED
    assert job.returncode == 2
    assert job.error == f"The reference '{missing}' does not exist: check the path."


def test_failing_result_import_fails_the_job(tmp_path):
    child = _script(tmp_path, """
        import json
        print(json.dumps({"event": "result", "outputs": {"microct": "nowhere.nrrd"}}), flush=True)
    """)

    def load(job):
        from MicroCTSynthLib.errors import MicroCTSynthError
        raise MicroCTSynthError("The synthetic micro-CT file is missing.")

    job = Job([sys.executable, str(child)], on_result=load).start()
    assert job.wait(timeout=60) == JobState.FAILED
    assert job.error == "The synthetic micro-CT file is missing."


def test_crash_without_error_event_reports_the_last_stderr_line(tmp_path):
    child = _script(tmp_path, """
        raise RuntimeError("out of memory in the generator")
    """)
    job = Job([sys.executable, str(child)]).start()
    assert job.wait(timeout=60) == JobState.FAILED
    assert job.returncode == 1
    assert job.error == "The job stopped with exit status 1: RuntimeError: out of memory in the generator"


def test_a_program_that_does_not_exist_is_a_sentence(tmp_path):
    from MicroCTSynthLib.errors import MicroCTSynthError

    ended = []
    job = Job([str(tmp_path / "no-such-python"), "-m", "MicroCTSynthLib"], on_finish=ended.append)
    with pytest.raises(MicroCTSynthError, match="could not start"):
        job.start()
    assert job.state == JobState.FAILED and ended == [job]


def test_protocol_helpers():
    assert parse_line('{"event": "progress", "step": 3}\n') == {"event": "progress", "step": 3}
    assert parse_line("Epoch 3 done") == {"event": "log", "message": "Epoch 3 done"}
    assert parse_line('{"not": "an event"}') == {"event": "log", "message": '{"not": "an event"}'}
    assert error_from_stderr(["Traceback", "microctsynth train: error: Group 'Z' is not defined."], 2) == "Group 'Z' is not defined."
    env = engine_environment({"PYTHONPATH": "/elsewhere"}, threads=2)
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(first) / "MicroCTSynthLib" / "process.py").is_file()
    assert env["PYTHONPATH"].endswith("/elsewhere") and env["OMP_NUM_THREADS"] == "2"
    assert engine_command("train", "--data", "D")[-2:] == ["--progress", "json"]


@pytest.mark.parametrize("body, state", [
    ("import sys; sys.exit(0)", JobState.DONE),
    ("import sys; sys.exit(3)", JobState.FAILED),
    ("import time; time.sleep(60)", JobState.CANCELLED),
])
def test_on_finish_runs_once_whatever_the_end(tmp_path, body, state):
    ended = []
    job = Job([sys.executable, "-c", body], on_finish=lambda j: ended.append(j.state)).start()
    if state == JobState.CANCELLED:
        job.cancel()
    assert job.wait(timeout=60) == state
    job.poll()
    assert ended == [state]


def test_the_event_history_is_bounded(tmp_path):
    """A job that reports for hours keeps only its latest events; progress and outputs stay whole."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import json
        for i in range(1, 3001):
            print(json.dumps({"event": "progress", "step": i, "total": 3000}))
        print(json.dumps({"event": "result", "outputs": {"out": "x"}}))
    """))
    job = Job([sys.executable, str(child)]).start()
    assert job.wait(timeout=60) == JobState.DONE
    assert len(job.events) == Job.EVENTS_KEPT < 3001
    assert job.events[-1]["event"] == "result" and job.events[-2]["step"] == 3000
    assert job.progress["step"] == 3000 and job.outputs == {"out": "x"}


def test_a_failing_event_callback_fails_the_job_with_its_sentence(tmp_path):
    """The caller's on_event raising stops the job and every process it started, and the job
    ends failed with that error (a user must not read "cancelled"); on_finish runs once."""
    finished = []

    def on_event(event):
        raise ValueError("the chart is gone")

    child = "import json, time; print(json.dumps({'event': 'progress', 'step': 1}), flush=True); time.sleep(60)"
    job = Job([sys.executable, "-c", child], on_event=on_event, on_finish=finished.append).start()
    start = time.monotonic()
    assert job.wait(timeout=30) == JobState.FAILED and time.monotonic() - start < 30
    assert job.error == "Showing the job's progress failed: ValueError: the chart is gone"
    assert finished == [job] and job.returncode is not None
