"""Safe file I/O, shared by nn/ and train/: atomic writes, bounded reads of JSON files, SHA-256 of files, and what a
command checks before it writes (nothing but real folders and regular files in the way; one writer per folder).

Writes go to a temporary file in the same folder, flushed to disk and then renamed into place. os.replace is atomic
on POSIX and Windows, so a reader (or a run restarted after a kill) sees either the old file or the new one, never
half of one. Reads of the project's JSON files (run results, tuned learning rates, base.json) accept a regular file
of bounded size only: a FIFO would block the reader forever and /dev/zero would fill its memory.
"""

import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is not locked there (docs/DESIGN.md, Limits)
    fcntl = None


def repo_root():
    """The repository's root folder, where the shipped base and the published results live: the folder D2LORA_MIN_ROOT
    names, else the current folder or the checkout this package runs from, whichever holds base/base.json."""
    if os.environ.get("D2LORA_MIN_ROOT"):
        return Path(os.environ["D2LORA_MIN_ROOT"])
    for folder in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (folder / "base" / "base.json").is_file():
            return folder
    return Path.cwd()


class Refused(ValueError):
    """Input, or something in the way of an output, refused before any work (at the command line: a usage error)."""


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
        raise ValueError(f"{path} is {_kind(mode)}, not a JSON file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} holds more than {limit} bytes: not a JSON file of this project")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {detail})") from None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
                what = (
                    "a symbolic link: nothing is written through one"
                    if stat.S_ISLNK(mode)
                    else f"{_kind(mode)} where {want} belongs"
                )
                raise Refused(f"{p} is in the way of a run's output ({what}): remove it, or {hint}")


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
            raise Refused(
                f"{path} is in the way of a run's output ({_kind(mode)} where a file belongs): remove it, or {hint}"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(
                f"{folder} is in use: another command is writing into it (it holds {path}); wait until it "
                f"has finished, or {hint}"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


BASE_FILES = ("model.safetensors", "tokenizer.json")  # with the model config in base.json: all that changes behaviour


def base_fingerprint(folder, meta):
    """({file: SHA-256}, the base's SHA-256): one hash over the weights, the tokenizer and the model config, so
    that a change to any of them (a swapped token, an edited config) changes the base's identity."""
    folder = Path(folder)
    files = {}
    for name in BASE_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; {REBUILD_HINT}")
        files[name] = sha256_file(folder / name)
    blob = json.dumps({"files": files, "model_config": meta["config"]["model"]}, sort_keys=True)
    return files, hashlib.sha256(blob.encode()).hexdigest()


REBUILD_HINT = (
    "restore the shipped base with `git checkout -- base/`, or pretrain one with `make pretrain` "
    "(then `make pretrain ARGS='--out base --replace_shipped'` to replace the shipped one)"
)


def check_base_files(folder, meta):
    """A base folder's files against what its base.json records ({"files": {name: SHA-256}, "sha256"}): a ValueError
    naming the first file (or the model config) whose SHA-256 is not the recorded one."""
    folder = Path(folder)
    files, sha = base_fingerprint(folder, meta)
    for name, digest in files.items():
        if meta["files"].get(name) != digest:
            raise ValueError(f"{folder}/{name} does not match the SHA-256 recorded in base.json; {REBUILD_HINT}")
    if sha != meta["sha256"]:
        raise ValueError(f"{folder}/base.json: the model config does not match the recorded SHA-256; {REBUILD_HINT}")
