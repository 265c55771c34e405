"""orchestrator/checkpoint/files.py: state files hashed while written; loading without pickled code."""

import hashlib
from pathlib import Path

import pytest
import torch

from data.util import file_sha256
from orchestrator.checkpoint.files import (
    UnsafeCheckpointError,
    load_tensors,
    refuse_unsafe_pickles,
    write_state_file,
)
from orchestrator.checkpoint.layout import CheckpointError


class NotATensor:
    """An arbitrary object: loading it would mean importing and running this module's code."""

    def __init__(self):
        self.value = 3


def _touch(path):
    Path(path).touch()


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_write_state_file_returns_its_sha256(tmp_path):
    state = {
        "model": {"w": torch.randn(17, 5), "b": torch.zeros(5, dtype=torch.bfloat16)},
        "progress": {"step": 3, "tokens_seen": 48, "initial_val_loss": None},
        "rng": [("MT19937", [1, 2, 3], 0, 0, 0.0)],
    }
    path = tmp_path / "deep" / "dir" / "state"  # parents are created
    digest = write_state_file(state, path)
    assert digest == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    loaded = load_tensors(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["model"]["b"].dtype == torch.bfloat16
    assert loaded["progress"] == state["progress"]
    assert [tuple(r) for r in loaded["rng"]] == state["rng"]


def test_write_state_file_digest_changes_with_content(tmp_path):
    a = write_state_file({"w": torch.zeros(4)}, tmp_path / "a")
    b = write_state_file({"w": torch.ones(4)}, tmp_path / "b")
    assert a != b


def test_load_tensors_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "state"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_tensors(path)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, CheckpointError)
    assert "refusing to load" in str(err) and str(path) in str(err)
    assert "arbitrary code" in str(err)


def test_load_tensors_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "state"
    torch.save({"model": Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_tensors(path)
    assert not marker.exists()
    # The same file loaded unsafely does run the code: the test's payload is real.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_refuse_unsafe_pickles_passes_other_errors_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        with refuse_unsafe_pickles(tmp_path / "missing"):
            load_tensors(tmp_path / "missing")
