"""orchestrator/checkpoint/manifest.py: the manifest written last, and verification against it."""

import hashlib
import json

import pytest

from data.util import file_sha256
from orchestrator.checkpoint import manifest as manifest_mod
from orchestrator.checkpoint.layout import MANIFEST_NAME, STATE_NAME
from orchestrator.checkpoint.manifest import (
    MANIFEST_VERSION,
    check_matches_manifest,
    config_hash,
    manifest_step,
    read_manifest,
    verify,
    write_manifest,
)
from tests.orchestrator.checkpoint.helpers import (
    flip_middle_byte,
    make_checkpoint,
    make_config,
    truncate,
)


def fill(path, files):
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)


# -- write_manifest --------------------------------------------------------------------------


def test_write_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    files = {
        f"{STATE_NAME}/shard-0.pt": b"zero" * 100,
        f"{STATE_NAME}/sub/shard-1.pt": b"one" * 7,
        "config.yaml": b"model: {}\n",
        "empty": b"",
    }
    fill(tmp_path, files)
    written = write_manifest(tmp_path, {"step": 7, "tokens_seen": 112, "strategy": "fsdp"})

    on_disk = read_manifest(tmp_path)
    assert on_disk == written
    assert on_disk["version"] == MANIFEST_VERSION
    assert on_disk["step"] == 7 and on_disk["tokens_seen"] == 112 and on_disk["strategy"] == "fsdp"
    assert set(on_disk["files"]) == set(files)  # every file, nested ones too, not the manifest
    for name, data in files.items():
        entry = on_disk["files"][name]
        assert entry["size"] == len(data)
        assert entry["sha256"] == file_sha256(tmp_path / name) == hashlib.sha256(data).hexdigest()
    # Published by a rename: nothing but the payload and the manifest is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [MANIFEST_NAME, STATE_NAME, "config.yaml", "empty"]
    )
    assert verify(tmp_path) is None


def test_write_manifest_trusts_known_digests(tmp_path):
    fill(tmp_path, {STATE_NAME: b"payload", "other": b"x"})
    known = {STATE_NAME: "ab" * 32}
    written = write_manifest(tmp_path, {"step": 1}, known)
    assert written["files"][STATE_NAME]["sha256"] == "ab" * 32  # not re-read
    assert written["files"]["other"]["sha256"] == hashlib.sha256(b"x").hexdigest()


def test_interrupted_manifest_write_leaves_no_manifest(tmp_path, monkeypatch):
    """The manifest is complete or absent: a crash while writing it never publishes half of one."""
    fill(tmp_path, {STATE_NAME: b"payload"})

    def dump_then_die(obj, f, **kwargs):
        f.write(json.dumps(obj)[:10])
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(manifest_mod.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path, {"step": 1})
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert verify(tmp_path) == "no manifest (the save was interrupted)"


def test_write_manifest_ignores_a_stale_tmp(tmp_path):
    fill(tmp_path, {STATE_NAME: b"payload", MANIFEST_NAME + ".tmp": b'{"vers'})
    written = write_manifest(tmp_path, {"step": 1})
    assert set(written["files"]) == {STATE_NAME}
    assert verify(tmp_path) is None


# -- verify ----------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    return make_checkpoint(tmp_path, 5, make_config(tmp_path / "run"))


def test_verify_accepts_a_good_checkpoint(good):
    assert verify(good) is None
    assert verify(good, checksums=False) is None


def test_verify_not_a_directory(tmp_path):
    assert verify(tmp_path / "nothing") == "not a directory"


def test_verify_no_manifest(good):
    (good / MANIFEST_NAME).unlink()
    assert "no manifest" in verify(good)


@pytest.mark.parametrize("text", ["{not json", "", '{"version": 1, "step": 3}', "\xff\xfe"])
def test_verify_unreadable_manifest(good, text):
    (good / MANIFEST_NAME).write_bytes(text.encode("latin-1"))
    assert verify(good).startswith("unreadable manifest")


def test_verify_manifest_without_state(good):
    manifest = read_manifest(good)
    del manifest["files"][STATE_NAME]
    (good / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify(good) == "manifest lists no state"


def test_verify_state_directory_counts_as_state(tmp_path):
    fill(tmp_path, {f"{STATE_NAME}/.metadata": b"m", f"{STATE_NAME}/__0_0.distcp": b"d"})
    write_manifest(tmp_path, {"step": 1})
    assert verify(tmp_path) is None
    # A file merely starting with "state" is not the state.
    fill(tmp_path / "other", {"statement": b"s"})
    write_manifest(tmp_path / "other", {"step": 1})
    assert verify(tmp_path / "other") == "manifest lists no state"


def test_verify_missing_file(good):
    (good / "config.yaml").unlink()
    assert verify(good) == "missing file config.yaml"


def test_verify_truncated_file(good):
    size = (good / STATE_NAME).stat().st_size
    truncate(good / STATE_NAME)
    reason = verify(good, checksums=False)  # the size check needs no checksums
    assert reason is not None and STATE_NAME in reason
    assert f"manifest says {size}" in reason and "truncated" in reason


def test_verify_same_size_corruption_needs_checksums(good):
    flip_middle_byte(good / STATE_NAME)
    reason = verify(good)
    assert reason is not None and "SHA-256" in reason and STATE_NAME in reason
    assert verify(good, checksums=False) is None  # same size: only the checksum can tell


@pytest.mark.parametrize(
    "manifest",
    [[], {"files": [STATE_NAME]}, {"files": {STATE_NAME: {"size": 0}}}],
    ids=["list", "files-list", "no-sha256"],
)
def test_verify_malformed_manifest_gives_a_reason(good, manifest):
    (good / STATE_NAME).write_bytes(b"")
    (good / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify(good) is not None


# -- check_matches_manifest / manifest_step / config_hash -----------------------------------


def test_check_matches_manifest(good):
    check_matches_manifest(good)  # a good one passes
    flip_middle_byte(good / STATE_NAME)
    check_matches_manifest(good, checksums=False)  # same size: passes without checksums
    with pytest.raises(ValueError, match="does not match its manifest") as info:
        check_matches_manifest(good)
    assert str(good) in str(info.value) and "SHA-256" in str(info.value)


def test_check_matches_manifest_takes_a_dir_without_manifest_as_is(good):
    (good / MANIFEST_NAME).unlink()
    truncate(good / STATE_NAME)
    check_matches_manifest(good)  # e.g. a file made elsewhere: nothing to compare against


def test_manifest_step(good, tmp_path):
    assert manifest_step(good) == 5
    manifest = read_manifest(good)
    manifest["step"] = 42
    (good / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert manifest_step(good) == 42  # read from the manifest, not the directory name
    (good / MANIFEST_NAME).write_text("{broken")
    assert manifest_step(good) is None
    assert manifest_step(tmp_path / "missing") is None


def test_config_hash(tmp_path):
    a = make_config(tmp_path)
    b = make_config(tmp_path)
    c = make_config(tmp_path, "--model.n_layers", "2")
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    assert config_hash(a) != config_hash(c)


def test_verify_an_unreadable_file_is_damage_not_a_crash(good, monkeypatch):
    """An I/O error while hashing (EIO on a failing disk: root reads through any file mode, so
    the error is injected) makes the checkpoint damaged, to be passed over like a bad checksum."""

    def failing(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(manifest_mod, "file_sha256", failing)
    assert "does not match its SHA-256" in verify(good)
    assert verify(good, checksums=False) is None  # sizes alone still read fine
