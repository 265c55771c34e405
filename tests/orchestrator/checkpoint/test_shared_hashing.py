"""Each rank hashes the checkpoint files it writes, while writing them, and verifies the files it
will read (orchestrator/checkpoint/digests.py): rank 0 no longer reads every shard back.

1. Unit level, one process: the hashing DCP writer writes dcp.save's files and their SHA-256s;
   the hashing DeepSpeed engine writes torch.save's bytes; `verify` with a share of the files.
2. FSDP2 on 2 processes (gloo; this file run as a script by Fabric's launcher): which process
   hashed which file at save (sync and async) and at resume, the manifest's contents, and a
   damaged shard of rank 1 found by rank 1 and passed over on both ranks.
"""

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. one process ------------------------------------------------------------------------------


def test_reading_rank_is_the_writer_of_a_shard_else_rank_0():
    from orchestrator.checkpoint.digests import reading_rank

    assert reading_rank("state/__1_0.distcp", 2) == 1
    assert reading_rank("state/__0_0.distcp", 2) == 0
    assert reading_rank("state/__5_0.distcp", 4) == 1  # a larger world's shard spreads
    assert reading_rank("state/checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    # DeepSpeed's optimizer shards under bf16 (the largest files: fp32 master and moments).
    assert reading_rank("state/checkpoint/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    for name in ("state/.metadata", "state/meta.pt", "config.yaml", "state", "state/latest"):
        assert reading_rank(name, 2) == 0


def test_hashing_dcp_writer_writes_dcp_files_and_their_sha256(tmp_path):
    import torch.distributed.checkpoint as dcp

    from orchestrator.checkpoint.digests import HashingFileSystemWriter

    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 7)}
    dcp.save(state, checkpoint_id=tmp_path / "plain")
    writer = HashingFileSystemWriter(tmp_path / "hashed")
    dcp.save(state, checkpoint_id=tmp_path / "hashed", storage_writer=writer)
    plain = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(writer.digests) == plain == [".metadata", "__0_0.distcp"]
    assert (tmp_path / "plain" / "__0_0.distcp").read_bytes() == (
        tmp_path / "hashed" / "__0_0.distcp"
    ).read_bytes()
    for name, sha in writer.digests.items():
        assert sha == _sha(tmp_path / "hashed" / name), name
    assert writer.relative_digests("state") == {f"state/{n}": s for n, s in writer.digests.items()}
    loaded = {"w": torch.zeros(1000), "b": torch.zeros(3, 7)}
    dcp.load(loaded, checkpoint_id=tmp_path / "hashed")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("zipfile", [False, True])
def test_hashing_deepspeed_engine_writes_what_torch_save_writes(tmp_path, zipfile):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from orchestrator.checkpoint.digests import hashing_deepspeed_engine

    engine = TorchCheckpointEngine()
    engine.zipfile_serialization = zipfile
    model = SimpleNamespace(checkpoint_engine=engine)
    sd = {"w": torch.arange(100, dtype=torch.float32), "step": 3}
    root = tmp_path / "ckpt"
    (root / "state").mkdir(parents=True)
    with hashing_deepspeed_engine({"model": model, "step": 3}, root) as digests:
        model.checkpoint_engine.save(sd, str(root / "state" / "zero_pp_rank_0_optim.pt"))
        model.checkpoint_engine.commit(None)  # everything else is DeepSpeed's own engine
    assert model.checkpoint_engine is engine  # restored
    torch.save(sd, tmp_path / "plain.pt", _use_new_zipfile_serialization=zipfile)
    written = root / "state" / "zero_pp_rank_0_optim.pt"
    if not zipfile:  # byte for byte
        assert written.read_bytes() == (tmp_path / "plain.pt").read_bytes()
    # (zip: the same records, under the archive name of a stream, "archive/", not the file's)
    loaded = torch.load(written, weights_only=True)
    assert torch.equal(loaded["w"], sd["w"]) and loaded["step"] == 3
    assert digests == {"state/zero_pp_rank_0_optim.pt": _sha(written)}


def test_verify_hashes_only_the_share_it_is_given(tmp_path, monkeypatch):
    import orchestrator.checkpoint.manifest as manifest_mod
    from orchestrator.checkpoint.manifest import verify, write_manifest
    from tests.orchestrator.checkpoint.helpers import flip_middle_byte, truncate

    ckpt = tmp_path / "ckpt"
    (ckpt / "state").mkdir(parents=True)
    for i in range(3):
        (ckpt / "state" / f"__{i}_0.distcp").write_bytes(bytes([i]) * 1000)
    write_manifest(ckpt, {"step": 1})
    hashed = []
    real = manifest_mod.file_sha256
    monkeypatch.setattr(
        manifest_mod, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p)
    )
    mine = lambda name: name.endswith("__1_0.distcp")  # noqa: E731
    assert verify(ckpt, hash_only=mine) is None and hashed == ["__1_0.distcp"]
    hashed.clear()
    assert verify(ckpt) is None and sorted(hashed) == [f"__{i}_0.distcp" for i in range(3)]
    flip_middle_byte(ckpt / "state" / "__2_0.distcp")
    assert verify(ckpt, hash_only=mine) is None  # not this process's share
    assert "state/__2_0.distcp does not match its SHA-256" in verify(ckpt)
    truncate(ckpt / "state" / "__0_0.distcp")  # sizes: every process checks every file
    assert "state/__0_0.distcp is 500 bytes" in verify(ckpt, hash_only=mine)


# -- 2. FSDP2, 2 processes -----------------------------------------------------------------------


def hashing_checks(root: Path) -> dict:
    """Run on every rank (launched by Fabric); returns what this rank saw."""
    import data.util
    import orchestrator.checkpoint.digests as digests_mod
    import orchestrator.checkpoint.manifest as manifest_mod
    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.checkpoint.layout import MANIFEST_NAME
    from tests.orchestrator.checkpoint.helpers import fsdp2_config, fsdp2_trained

    def config(name: str, async_save: bool):
        return fsdp2_config(root, name, async_save)

    cfg = config("sync", False)
    fabric, model, optimizer, _ = fsdp2_trained(cfg)
    state = {"model": model, "optimizer": optimizer, "progress": {"step": 1, "tokens_seen": 16}}
    out: dict = {"rank": fabric.global_rank}

    # Who reads which file back to hash it: every read-back hash goes through file_sha256.
    read_back: list[str] = []
    real = data.util.file_sha256

    def recording(path, *args, **kwargs):
        read_back.append(Path(path).name)
        return real(path, *args, **kwargs)

    manifest_mod.file_sha256 = recording
    # Who hashed which file while writing it.
    written: list[str] = []
    real_create = digests_mod._HashingFileSystem.create_stream

    def create_stream(self, path, mode):
        if "w" in mode:
            written.append(Path(path).name)
        return real_create(self, path, mode)

    digests_mod._HashingFileSystem.create_stream = create_stream

    def manifest_files(path: Path) -> dict:
        return json.loads((path / MANIFEST_NAME).read_text())["files"]

    def recomputed(path: Path) -> dict:  # the manifest as rank 0 alone made it before
        return {
            p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": real(p)}
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }

    sync = Checkpointer(fabric, cfg)
    reports = [sync.save(state, 1, tokens_seen=16)]
    out["sync_read_back"], out["sync_written"] = sorted(read_back), sorted(written)
    read_back.clear(), written.clear()
    state["progress"]["step"] = 2
    reports.append(sync.save(state, 2, tokens_seen=32))
    read_back.clear(), written.clear()

    background = Checkpointer(fabric, config("async", True))
    pending = background.save(state, 2, tokens_seen=32)
    background.wait()
    fabric.barrier()
    out["async_read_back"], out["async_written"] = sorted(read_back), sorted(written)
    read_back.clear(), written.clear()
    if fabric.is_global_zero:
        out["manifests_match"] = [
            manifest_files(p) == recomputed(p) for p in (reports[0].path, pending.path)
        ]
        out["manifest_names"] = sorted(manifest_files(reports[0].path))

    # Resume: each rank verifies its share; the same verdict and choice everywhere.
    out["verified"] = sync.verify(reports[1].path)
    out["verify_read_back"] = sorted(read_back)
    read_back.clear()
    chosen, skipped = sync.choose_resume()
    out["chosen"], out["skipped"] = str(chosen), [[str(p), r] for p, r in skipped]
    fabric.barrier()
    if fabric.global_rank == 1:  # damage rank 1's shard of the newest checkpoint
        shard = reports[1].path / "state" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    fabric.barrier()
    read_back.clear()
    chosen, skipped = sync.choose_resume()
    out["damaged_chosen"], out["damaged_skipped"] = str(chosen), [[str(p), r] for p, r in skipped]
    out["damaged_read_back"] = sorted(read_back)
    sync.load(chosen, state)
    out["loaded_step"] = state["progress"]["step"]
    return out


@pytest.mark.slow
def test_fsdp_ranks_hash_their_own_shards_at_save_and_resume(tmp_path):
    from tests.orchestrator.parallel.test_strategies import run

    run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    zero, one = ranks
    # Saving: each rank hashed its own shard while writing it (rank 0 also DCP's .metadata);
    # rank 0 read back only the small files it wrote itself, never a shard.
    for key in ("sync", "async"):
        assert zero[f"{key}_written"] == [".metadata.tmp", "__0_0.distcp"], zero
        assert one[f"{key}_written"] == ["__1_0.distcp"], one
        assert zero[f"{key}_read_back"] == ["config.yaml", "meta.pt"], zero
        assert one[f"{key}_read_back"] == [], one
    # The manifest lists what rank 0 alone used to hash, with the same sizes and SHA-256s.
    assert zero["manifests_match"] == [True, True]
    assert zero["manifest_names"] == [
        "config.yaml", "state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp",
        "state/meta.pt",
    ]  # fmt: skip
    # Resume: each rank hashed the files it will read (rank 0 the rest), and they agree.
    assert zero["verify_read_back"] == [".metadata", "__0_0.distcp", "config.yaml", "meta.pt"]
    assert one["verify_read_back"] == ["__1_0.distcp"]
    newest = str(tmp_path / "sync" / "checkpoints" / "step-00000002")
    older = str(tmp_path / "sync" / "checkpoints" / "step-00000001")
    for r in ranks:
        assert r["verified"] is None and r["chosen"] == newest and r["skipped"] == []
        # Rank 1's damaged shard, found by rank 1 alone, passed over by both: the older one.
        assert r["damaged_chosen"] == older, r
        [(path, reason)] = r["damaged_skipped"]
        assert path == newest and "state/__1_0.distcp does not match its SHA-256" in reason
        assert r["loaded_step"] == 1
    assert "__1_0.distcp" not in zero["damaged_read_back"]
    assert one["damaged_read_back"] == ["__1_0.distcp", "__1_0.distcp"]  # step 2, then step 1


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_deepspeed_loads_are_memory_mapped(tmp_path):
    """At resume DeepSpeed's engine reads each shard whole into new memory beside the live state
    (at 1.1B the kernel killed a ZeRO-3 rank for it); inside mapped_deepspeed_loads the file is
    memory-mapped instead, with the same contents."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from orchestrator.checkpoint.digests import mapped_deepspeed_loads

    engine = TorchCheckpointEngine()
    model = SimpleNamespace(checkpoint_engine=engine)
    sd = {"w": torch.arange(1 << 16, dtype=torch.float32), "step": 3}
    mapped, read = tmp_path / "zero_pp_rank_0_optim_states.pt", tmp_path / "plain.pt"
    for path in (mapped, read):
        torch.save(sd, path)
    with mapped_deepspeed_loads({"model": model}):
        loaded = model.checkpoint_engine.load(str(mapped), map_location="cpu")
    assert model.checkpoint_engine is engine  # restored
    plain = engine.load(str(read), map_location="cpu")
    maps = Path("/proc/self/maps").read_text()
    assert str(mapped) in maps and str(read) not in maps
    assert torch.equal(loaded["w"], sd["w"]) and loaded["step"] == 3
    assert torch.equal(plain["w"], sd["w"])


if __name__ == "__main__":
    from tests.orchestrator.checkpoint.helpers import write_rank_checks

    sys.exit(write_rank_checks(hashing_checks, sys.argv[1]))
