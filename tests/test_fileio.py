"""fileio.py: a write that fails leaves the previous file and no temporary file; one that succeeds replaces it."""
import os

import pytest
import torch

from fileio import atomic_save, atomic_write


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
