"""Progress of long work: a tqdm bar on a terminal, JSON lines for the Slicer module and scripts.

Every long job (phantom, registration, training, synthesis, atlas, experiment) reports
through a :class:`Progress`. With ``mode="json"`` each update is one JSON object on its own
line of stdout, flushed at once, so a reader of the pipe sees it immediately::

    {"event": "progress", "task": "train", "step": 12, "total": 200, "seconds_left": 31.5, "loss_G": 0.82}
    {"event": "log", "message": "Registered S3_1: TRE 0.04 mm"}
    {"event": "result", "outputs": {"microct": "..."}}
    {"event": "error", "message": "The image 'x.nrrd' does not exist: check the path."}

Keys other than ``event``, ``task``, ``step``, ``total``, ``seconds_left`` are the job's own
fields (losses, epoch, ...). Plain-text logs go to stderr in ``bar`` mode.
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

    def __init__(self, total: int | None = None, task: str = "", mode: str = "bar", unit: str = "step"):
        if mode not in MODES:
            raise ValueError(f"Progress mode must be one of {', '.join(MODES)}, not {mode!r}.")
        self.total, self.task, self.mode, self.unit = total, task, mode, unit
        self.step = 0
        self.start = time.monotonic()
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

    def update(self, n: int = 1, **fields) -> None:
        self.step += n
        if self.mode == "json":
            left = self.seconds_left
            emit_json(
                "progress", task=self.task, step=self.step, total=self.total,
                seconds_left=None if left is None else round(left, 1), **fields,
            )
        elif self._bar is not None:
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


def log(message: str, mode: str = "bar", bar=None) -> None:
    """A line for the user: JSON ``log`` event in json mode, else stderr (above any bar)."""
    if mode == "json":
        emit_json("log", message=message)
    elif mode == "bar":
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
