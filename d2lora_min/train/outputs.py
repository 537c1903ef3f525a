"""What a command writes: the check of every output path before any work, and the lock that keeps a second writer
out of an output folder while a command runs.

    check_paths(out_dir, files=[out_dir / "results.md"], folders=[out_dir / "runs"])
    with output_lock(out_dir):
        ...  # every write into out_dir

Both are usage errors (exit status 2, one line) raised before any work.
"""

import os
import stat
from contextlib import contextmanager
from pathlib import Path

from .cli import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is not locked there (docs/DESIGN.md, Limits)
    fcntl = None

LOCK_FILE = ".lock"  # in each output folder, held for the whole command


def _kind(mode):
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"


def check_paths(out_dir, files=(), folders=(), hint="choose another --out"):
    """Before any work: below out_dir, nothing but real folders (or nothing) on the way to each output, nothing but a
    regular file (or nothing) at each of `files` and a real folder (or nothing) at each of `folders`. A symbolic link
    is refused, never followed: a folder linked elsewhere would take the writes outside out_dir (an adapter written
    into a user's folder), and the rename of an atomic write would replace a link to a file by a file. out_dir itself
    may be a link: it is the folder the user named. Anything else would fail after the training, and this project
    never deletes what it did not write."""
    out_dir = Path(out_dir)
    wanted = [(Path(p), stat.S_ISREG) for p in files] + [(Path(p), stat.S_ISDIR) for p in folders]
    for path, leaf_ok in wanted:
        on_the_way = [p for p in reversed(path.parents) if out_dir in p.parents]  # below out_dir, from the top down
        for p, ok in [(p, stat.S_ISDIR) for p in on_the_way] + [(path, leaf_ok)]:
            try:
                mode = os.lstat(p).st_mode  # the entry itself: a link is not followed
            except FileNotFoundError:
                break  # nothing there, so nothing below it either: it will be made
            except NotADirectoryError:
                break  # out_dir itself is not a folder (only entries below it are checked): check_writable says so
            if not ok(mode):
                want = "a folder" if ok is stat.S_ISDIR else "a file"
                what = ("a symbolic link: nothing is written through one" if stat.S_ISLNK(mode)
                        else f"{_kind(mode)} where {want} belongs")  # fmt: skip
                raise UsageError(f"{p} is in the way of a run's output ({what}): remove it, or {hint}")


@contextmanager
def output_lock(folder, hold=True, hint="choose another --out"):
    """Hold folder/.lock, an exclusive lock, for the body of the `with`: a second command writing into the same folder
    at the same time is refused at once (its run results and adapter files would interleave with this one's). The
    lock goes with the process (closing the file, or any exit, releases it); the empty file stays. hold=False (the
    processes of torchrun other than rank 0, which write nothing) takes no lock."""
    if not hold or fcntl is None:
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_FILE
    check_paths(folder, files=[path], hint=hint)
    # O_NOFOLLOW: a link put there since the check is not followed; O_NONBLOCK: a FIFO does not wait for a writer
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o666)
    try:
        mode = os.fstat(fd).st_mode  # what was opened, in case something replaced the file since the check
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path} is in the way of a run's output ({_kind(mode)} where a file belongs): remove it, or {hint}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder} is in use: another command is writing into it (it holds {path}); wait until it "
                             f"has finished, or {hint}") from None  # fmt: skip
        yield
    finally:
        os.close(fd)  # releases the lock
