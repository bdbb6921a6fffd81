"""Progress of long work: a tqdm bar on a terminal, JSON lines for the Slicer module and scripts.

Every long job (phantom, registration, training, synthesis, atlas, experiment) reports
through a :class:`Progress`. With ``mode="json"`` each update is one JSON object on its own
line of stdout, flushed at once, so a reader of the pipe sees it immediately::

    {"event": "progress", "task": "train", "step": 12, "total": 200, "seconds_left": 31.5, "loss_G": 0.82}
    {"event": "log", "message": "Registered S3_1: TRE 0.04 mm"}
    {"event": "result", "outputs": {"microct": "..."}, "message": "Wrote ..."}
    {"event": "error", "message": "The image 'x.nrrd' does not exist: check the path."}

Keys other than ``event``, ``task``, ``step``, ``total``, ``seconds_left`` are the job's own
fields (losses, epoch, ...). Plain-text logs go to stderr in ``bar`` mode.

JSON progress comes at a sane rate: an update is printed when at least
:attr:`Progress.min_interval` seconds (0.25) have passed since the last one printed, and
always for the first step, the last step and an update with ``force=True`` (a training's
epoch summary), so a reader never falls behind a job that counts fast steps for hours.
A job that has fields worth averaging over the skipped steps asks :meth:`Progress.due`
first (the training averages its losses over the iterations since the last line).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

MODES = ("bar", "json", "none")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit_json(event: str, stream=None, **fields) -> None:
    """Print one JSON line ``{"event": event, **fields}`` and flush."""
    stream = stream or sys.stdout
    record = {"event": event, **{k: _jsonable(v) for k, v in fields.items()}}
    stream.write(json.dumps(record, default=str) + "\n")
    stream.flush()


class Progress:
    """Reports steps of one task; ``with Progress(...) as p: p.update(loss=...)``."""

    #: Seconds between two JSON progress lines (first, last and forced updates excepted).
    min_interval = 0.25

    def __init__(self, total: int | None = None, task: str = "", mode: str = "bar", unit: str = "step",
                 min_interval: float | None = None):
        if mode not in MODES:
            raise ValueError(f"Progress mode must be one of {', '.join(MODES)}, not {mode!r}.")
        self.total, self.task, self.mode, self.unit = total, task, mode, unit
        if min_interval is not None:
            self.min_interval = float(min_interval)
        self.step = 0
        self.start = time.monotonic()
        self._last_emit: float | None = None
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=task, unit=unit, dynamic_ncols=True, file=sys.stderr)

    @property
    def seconds_left(self) -> float | None:
        if not self.total or self.step == 0:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed / self.step * max(self.total - self.step, 0)

    def due(self, n: int = 1) -> bool:
        """Whether an update by ``n`` steps now would be reported (always in ``bar`` mode)."""
        if self.mode != "json":
            return self.mode == "bar"
        if self._last_emit is None or (self.total and self.step + n >= self.total):
            return True
        return time.monotonic() - self._last_emit >= self.min_interval

    def update(self, n: int = 1, force: bool = False, **fields) -> None:
        """Count ``n`` steps; in ``json`` mode print them when :meth:`due` (or ``force``)."""
        if self.mode == "json":
            report = force or self.due(n)
            self.step += n
            if not report:
                return
            self._last_emit = time.monotonic()
            left = self.seconds_left
            emit_json(
                "progress", task=self.task, step=self.step, total=self.total,
                seconds_left=None if left is None else round(left, 1), **fields,
            )
        else:
            self.step += n
        if self._bar is not None:
            if fields:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}, refresh=False)
            self._bar.update(n)

    def log(self, message: str) -> None:
        log(message, self.mode, bar=self._bar)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def report_result(mode: str, message: str, outputs: dict | None = None, **fields) -> None:
    """A command's last word: with ``--progress json`` one ``result`` event holding the files it
    wrote (``outputs``, what the Slicer module loads), the ``message`` and any other ``fields``;
    otherwise the ``message`` on stdout."""
    if mode == "json":
        emit_json("result", outputs=outputs or {}, message=message, **fields)
    else:
        print(message, flush=True)


def warn(message: str, mode: str) -> None:
    """A line the user must see even with ``--progress none`` (a lock taken over, a doubtful input):
    a JSON ``log`` event with ``"level": "warning"`` with ``json`` (a job keeps it in
    ``Job.warnings``, the panel shows it when the job ends), else stderr."""
    if mode == "json":
        emit_json("log", message=message, level="warning")
    else:
        log(message, "bar")


def log(message: str, mode: str = "bar", bar=None) -> None:
    """A line for the user: JSON ``log`` event in json mode, else stderr (above any bar)."""
    if mode == "json":
        emit_json("log", message=message)
    elif mode == "bar":
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
