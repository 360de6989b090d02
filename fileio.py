"""Atomic file writes: a crash, a full disk or Ctrl-C leaves the previous file or the new one, never half of one.

Every file a later run reads back (checkpoints, latents, sample PNGs, configs, caches, reports) is written
through `atomic_write`. The bytes go to `{path}.tmp.{pid}` in the same folder, so the final rename stays on
one filesystem and is atomic, and reach the disk before that rename, so a power cut cannot leave a renamed
but empty file. The temporary name never ends like the real one (a folder of `.png` or `.npy` files is
read without seeing it), and a process killed outright leaves only names matching `*.tmp.*`, which
train.py clears on resume and .gitignore ignores.
"""
import os
from typing import BinaryIO, Callable


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a binary file that becomes `path` only once it is complete and on disk.

    On any failure, KeyboardInterrupt included, the temporary file is removed and the error propagates;
    whatever was at `path` before is untouched.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path) -> None:
    """torch.save(obj) to `path` through atomic_write: a crash never leaves half a checkpoint."""
    # Imported here: config.py writes through this module and should not pay for importing torch.
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock (`hold_folder`)."""


def hold_folder(folder, what: str = "folder"):
    """Take `folder/.lock` for this process: an open file with an exclusive advisory lock (POSIX flock), released
    when the file is closed or the process exits, however it exits (a killed process leaves no stale lock).

    Two processes writing one run folder interleave their checkpoints and logs: a resumed run and the original
    would each overwrite the other's checkpoints. The second one is refused with the holder's pid.
    """
    import fcntl
    path = os.path.join(os.fspath(folder), ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FolderInUse(f"{what} {folder} is in use by another process (pid {holder}); stop it or wait for it "
                          "to finish before starting another here") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
