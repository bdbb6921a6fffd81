"""What keeps a job from losing or overwriting work: folder locks, output checks, leftovers of dead writers.

* :class:`FolderLock` - one lock file per run folder, experiment folder or dataset being
  prepared. A second job on the same folder is refused with a sentence; a lock left by a process
  that no longer runs (killed, crashed machine) is taken over, and the user is told.
* :func:`check_outputs` - an output path that equals an input (or another output), or names a
  folder, is refused before any work starts.
* :func:`clean_stale_parts` - the temporary ``.NAME.PID@HOST-XXXX.part`` files an atomic write leaves
  when its process is killed mid-write are removed once that process is gone (on this machine).
* :func:`write_error` - an ``OSError`` of a write (full disk, read-only file system, no
  permission) as the user's sentence.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from .errors import MicroCTSynthError

LOCK_NAME = ".microctsynth.lock"

#: ``.<name>.<pid>@<host>-<random>.part<suffix>``: the temporary file of an atomic write (volume.AtomicWrite).
PART_PATTERN = re.compile(r"^\..+\.(\d+)@([0-9a-f]{8})-[A-Za-z0-9_]+\.part(\.[A-Za-z0-9.]+)?$")


def part_tag() -> str:
    """``<pid>@<host>``: who writes a ``.part`` file (a shared folder may be written from several machines)."""
    import hashlib

    return f"{os.getpid()}@{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}"

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (a pid we may not signal still runs)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_error(exc: OSError, path) -> MicroCTSynthError:
    """The sentence for a failed write of ``path``."""
    code = getattr(exc, "errno", None)
    if code in _FULL:
        why = "the disk is full (or the file size limit is reached); free some space or write elsewhere"
    elif code == errno.EROFS:
        why = "the file system is read-only; write elsewhere"
    elif code in _READ_ONLY:
        why = "there is no permission to write there; write elsewhere or change the folder's permissions"
    elif code == errno.EISDIR:
        why = "it is a folder; give a file name"
    else:
        why = (exc.strerror or str(exc)).rstrip(".")
    return MicroCTSynthError(f"Cannot write '{path}': {why}.")


# -- leftovers of killed writers ---------------------------------------------------------------------
def clean_stale_parts(folder) -> list[Path]:
    """Remove the ``.part`` files in ``folder`` whose writing process has died; returns them."""
    removed = []
    host = part_tag().split("@")[1]
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = PART_PATTERN.match(entry.name)
        if match is None or match.group(2) != host:
            continue  # not ours to judge: another machine's writer
        if int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


# -- locks -------------------------------------------------------------------------------------------
class FolderLock:
    """``with FolderLock(folder, "run folder", log=...):`` - this process alone works in ``folder``.

    The lock file holds the owner's pid, host and command. A live owner makes the second job
    fail with a sentence; a dead one's lock is taken over (``log`` says so) and its ``.part``
    files are removed. The lock file is removed when the block ends, however it ends.
    """

    def __init__(self, folder, what: str = "folder", log=None):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.owned = False

    def __enter__(self) -> "FolderLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise MicroCTSynthError(f"The {self.what} '{self.folder}' exists and is not a folder: choose another --out.")
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.folder) from None
        try:
            return self._acquire()
        except BaseException:
            self._drop_created_folder()
            raise

    def _acquire(self) -> "FolderLock":
        for _ in range(3):
            if self._create():
                clean_stale_parts(self.folder)
                return self
            owner = self._owner()
            if owner is None:
                continue  # removed between our two looks: try again
            if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0))):
                self.log(f"Took over the lock of the {self.what} '{self.folder}' left by process {owner.get('pid')}, "
                         "which no longer runs.")
                self._remove()
                continue
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("time", 0)))
            raise MicroCTSynthError(
                f"The {self.what} '{self.folder}' is in use by another microctsynth job (process {owner.get('pid')} on "
                f"{owner.get('host')}, since {since}); wait for it to end, or stop it, then try again.")
        raise MicroCTSynthError(f"Could not lock the {self.what} '{self.folder}': another job keeps taking it.")

    def _create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "command": sys.argv[1:3]}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise write_error(exc, self.path) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
        except OSError as exc:  # a full disk: no half-written lock left behind
            self.path.unlink(missing_ok=True)
            raise write_error(exc, self.path) from None
        self.owned = True
        return True

    def _owner(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            # A lock file cut short by a kill between its creation and its write: its writer is gone.
            return {"pid": 0, "host": socket.gethostname()}
        return data

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        if self.owned:
            self._remove()
            self.owned = False
            self._drop_created_folder()

    def _drop_created_folder(self) -> None:
        if self.created:
            try:
                self.folder.rmdir()  # only if the job left it empty (it failed before writing anything)
            except OSError:
                pass


def is_locked(folder) -> bool:
    """Whether a live job holds ``folder``'s lock."""
    path = Path(folder) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and pid_alive(int(owner.get("pid", 0) or 0)) and owner.get("host") == socket.gethostname()


# -- outputs against inputs ------------------------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output on a read-only file system or a disk without a free block."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if hasattr(os, "statvfs"):
        st = os.statvfs(folder)
        if st.f_flag & os.ST_RDONLY:
            raise write_error(OSError(errno.EROFS, "Read-only file system"), path)
        if st.f_bavail == 0 and st.f_blocks > 0:
            raise write_error(OSError(errno.ENOSPC, "No space left on device"), path)
    if not os.access(folder, os.W_OK):
        raise write_error(OSError(errno.EACCES, "Permission denied"), path)


def check_outputs(inputs: dict, outputs: dict) -> None:
    """Refuse an output that is an input, another output, a folder, or cannot be written there
    (``{option: path}``, None skipped)."""
    ins = {k: Path(v) for k, v in inputs.items() if v}
    outs = {k: Path(v) for k, v in outputs.items() if v}
    seen: dict[str, Path] = {}
    for name, path in outs.items():
        if path.is_dir():
            raise MicroCTSynthError(f"{name} '{path}' is a folder; give the name of the file to write.")
        for other, given in ins.items():
            if _same(path, given):
                raise MicroCTSynthError(f"{name} '{path}' is the same file as {other}: it would overwrite the input; "
                                        "write the result elsewhere.")
        for other, taken in seen.items():
            if _same(path, taken):
                raise MicroCTSynthError(f"{name} and {other} name the same file '{path}': one would overwrite the other.")
        seen[name] = path
    for path in outs.values():
        check_writable(path)
