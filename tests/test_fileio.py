"""fileio.py: a write that fails leaves the previous file and no temporary file; one that succeeds replaces it.
A folder held by one process is refused to a second one until the first lets go or exits."""
import os
import subprocess
import sys

import pytest
import torch

from fileio import FolderInUse, atomic_save, atomic_write, hold_folder


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "latent.npy"
    path.write_bytes(b"old")
    seen = []

    def write(f):
        f.write(b"half of the new")
        seen.extend(os.listdir(tmp_path))
        raise error

    with pytest.raises(type(error)):
        atomic_write(str(path), write)
    assert sorted(seen) == ["latent.npy", f"latent.npy.tmp.{os.getpid()}"]  # the name train.py's cleanup globs
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["latent.npy"]


def test_successful_write_replaces_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3} and os.listdir(tmp_path) == ["ckpt.pt"]
    atomic_write(str(tmp_path / "new.txt"), lambda f: f.write(b"text"))
    assert (tmp_path / "new.txt").read_bytes() == b"text"


def test_a_held_folder_is_refused_to_a_second_holder_until_released(tmp_path):
    first = hold_folder(tmp_path, "run folder")
    held_by_me = f"run folder {tmp_path} is in use by another process \\(pid {os.getpid()}\\)"
    with pytest.raises(FolderInUse, match=held_by_me):
        hold_folder(tmp_path, "run folder")
    first.close()
    hold_folder(tmp_path).close()  # released: free again


def test_a_process_that_dies_holding_a_folder_leaves_no_stale_lock(tmp_path):
    code = f"import os; from fileio import hold_folder; hold_folder({str(tmp_path)!r}); os._exit(1)"  # no cleanup
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    assert (tmp_path / ".lock").exists()
    hold_folder(tmp_path).close()
