"""Safe file I/O, shared by nn/ and train/: atomic writes, and bounded reads of JSON files.

Writes go to a temporary file in the same folder, which is then renamed into place. os.replace is atomic on POSIX and
Windows, so a reader (or a run restarted after a kill) sees either the old file or the new one, never half of one.
Reads of the project's JSON files (run results, tuned learning rates, base.json) accept a regular file of bounded size
only: a FIFO would block the reader forever and /dev/zero would fill its memory.
"""

import json
import os
import stat
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success renames it onto `path`, on error deletes it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result ordinary permissions
    try:
        yield tmp
        with open(tmp, "rb") as f:  # flush the new bytes to disk before they take the old file's name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable(folder):
    """Create `folder` if needed and prove it takes files now, not after hours of training."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output folder {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"output folder {folder!r} is not writable: {e.strerror}") from None


MAX_JSON_BYTES = 256 * 2**20  # far above any JSON file this project writes


def read_json(path, limit=MAX_JSON_BYTES):
    """The JSON value in the regular file `path`. FileNotFoundError when there is none (other OSErrors as they come); a
    ValueError naming the file for anything else that is not this project's JSON: a folder, a FIFO or a device, more
    than `limit` bytes, text that is not UTF-8 JSON, nesting too deep to parse."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    mode = os.fstat(fd).st_mode  # what was opened (a symlink followed), not what the name held a moment before
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ValueError(f"{path} is {kind}, not a JSON file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} holds more than {limit} bytes: not a JSON file of this project")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {detail})") from None
