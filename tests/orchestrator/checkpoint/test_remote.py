"""orchestrator/checkpoint/remote.py (checkpoint.remote_dir) against a real S3-compatible server on
loopback (tests/s3_server.py): uploads (manifest last), remote retention, resuming from the store,
and the real trainer losing its run dir."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from lightning_fabric import Fabric

from data.storage import ObjectStore, StorageError
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.layout import (
    CONFIG_NAME,
    MANIFEST_NAME,
    STATE_NAME,
    CheckpointError,
    list_checkpoints,
    retention_victims,
)
from orchestrator.checkpoint.manifest import verify
from orchestrator.checkpoint.remote import (
    EXIT_STORE_UNAVAILABLE,
    EXIT_UPLOAD_FAILED,
    RemoteCheckpoints,
    StoreUnavailableError,
    Uploader,
    fetch_newer,
)
from orchestrator.checkpoint.resume import choose_resume
from orchestrator.train import main as train_main
from orchestrator.training.monitor import Monitor
from tests.orchestrator.checkpoint.helpers import flip_middle_byte, make_checkpoint, make_config
from tests.s3_faults import FaultProxy
from tests.training import TINY, data_args, step_records, train


@pytest.fixture
def faults(s3, monkeypatch):
    """A fault-injecting proxy in front of the server (tests/s3_faults.py); stores created from
    now on reach the server through it (the stores made before keep the direct route)."""
    proxy = FaultProxy(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.stop()


def remote_of(s3, bucket: str) -> tuple[str, RemoteCheckpoints]:
    s3.create_bucket(bucket)
    url = f"s3://{bucket}/runs/a"
    return url, RemoteCheckpoints(ObjectStore(url))


def sent_keys(store: ObjectStore) -> list[str]:
    """The keys of every PutObject the store's own client sends, in order (botocore's events)."""
    keys: list[str] = []
    store.client.meta.events.register(
        "provide-client-params.s3.PutObject", lambda params, **_: keys.append(params["Key"])
    )
    return keys


# -- upload -----------------------------------------------------------------------------------


def test_upload_sends_every_file_then_the_manifest(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-order")
    ckpt = make_checkpoint(tmp_path, 3, make_config(tmp_path))
    keys = sent_keys(remote.store)
    sent = remote.upload(ckpt)
    assert keys[-1] == "runs/a/step-00000003/manifest.json"
    assert sorted(keys[:-1]) == ["runs/a/step-00000003/config.yaml", "runs/a/step-00000003/state"]
    assert sent == sum(p.stat().st_size for p in ckpt.iterdir())
    assert remote.scan() == (["step-00000003"], [])
    assert remote.has_copy(ckpt)


def test_failed_manifest_upload_leaves_an_incomplete_copy(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-nomanifest")
    ckpt = make_checkpoint(tmp_path, 3, make_config(tmp_path))

    def refuse_manifest(params, **_):
        if params["Key"].endswith(MANIFEST_NAME):
            raise ConnectionError("the network went away")

    remote.store.client.meta.events.register("provide-client-params.s3.PutObject", refuse_manifest)
    with pytest.raises(StorageError, match=f"{url}/step-00000003/manifest.json"):
        remote.upload(ckpt)
    assert remote.store.list() == ["step-00000003/config.yaml", "step-00000003/state"]
    assert remote.scan() == ([], ["step-00000003"])  # never listed as a checkpoint


def test_failed_payload_upload_sends_no_manifest(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-nopayload")
    ckpt = make_checkpoint(tmp_path, 3, make_config(tmp_path))
    (ckpt / STATE_NAME).unlink()  # listed in the manifest, gone from the disk
    with pytest.raises(StorageError):
        remote.upload(ckpt)
    assert MANIFEST_NAME not in " ".join(remote.store.list())
    assert remote.complete() == []


def test_upload_of_the_same_step_again_replaces_it(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-again")
    ckpt = make_checkpoint(tmp_path / "a", 3)
    remote.upload(ckpt)
    remote.store.put_text("step-00000003/stale", "from the older copy")
    again = make_checkpoint(tmp_path / "b", 3, state={"model": {"w": torch.zeros(8)}})
    assert not remote.has_copy(again)
    remote.upload(again)
    assert remote.store.list() == ["step-00000003/manifest.json", "step-00000003/state"]
    assert remote.has_copy(again)


# -- retention --------------------------------------------------------------------------------


def test_retention_rule_is_the_local_one():
    names = [f"step-{s:08d}" for s in range(1, 8)]
    assert retention_victims(names, keep_last=2, keep_every=3) == [
        "step-00000001",
        "step-00000002",
        "step-00000004",
        "step-00000005",
    ]
    assert retention_victims(names, 2, protect="step-00000001")[0] == "step-00000002"
    assert retention_victims(names, 0) == []


def test_uploader_applies_retention_and_removes_leftovers(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-retention")
    remote.store.put_text("step-00000001/state", "an interrupted upload")  # older leftover
    remote.store.put_text("step-00000009/state", "newer than every complete one")
    uploader = Uploader(remote, keep_last=2, keep_every=3)
    for step in (2, 3, 4, 5, 6):
        uploader.submit(make_checkpoint(tmp_path, step))
    reports = uploader.finish()
    assert [r.step for r in reports] == [2, 3, 4, 5, 6]
    assert all(r.error is None and r.size_bytes > 0 and r.seconds > 0 for r in reports)
    assert remote.scan() == (
        ["step-00000003", "step-00000005", "step-00000006"],
        ["step-00000009"],
    )
    assert sum((r.removed for r in reports), []) == [
        "step-00000001",
        "step-00000002",
        "step-00000004",
    ]
    # The manifest goes first: what is left of a deleted checkpoint is never complete.
    assert not any(k.startswith(("step-00000002/", "step-00000004/")) for k in remote.store.list())
    uploader.close()


def test_failed_upload_is_retried_at_the_next_save(s3, tmp_path, capsys):
    uploader = Uploader(RemoteCheckpoints(ObjectStore("s3://ckpt-later/runs/a")), keep_last=0)
    first = make_checkpoint(tmp_path, 1)
    uploader.submit(first)
    (failed,) = uploader.finish()  # the bucket does not exist yet
    assert failed.step == 1 and "s3://ckpt-later/runs/a/step-00000001" in failed.error
    uploader.newest_missing()
    err = capsys.readouterr().err
    assert "error: the run's newest checkpoint step-00000001 was NOT copied" in err
    assert "the bucket 'ckpt-later' does not exist" in err

    s3.create_bucket("ckpt-later")
    uploader.submit(make_checkpoint(tmp_path, 2))
    reports = uploader.finish()
    assert [(r.step, r.error) for r in reports] == [(1, None), (2, None)]  # oldest first
    assert uploader.remote.complete() == ["step-00000001", "step-00000002"]
    uploader.newest_missing()
    assert "NOT copied" not in capsys.readouterr().err
    uploader.close()


def test_upload_that_gets_no_answer_is_a_warning(s3, faults, tmp_path, capsys):
    s3.create_bucket("ckpt-stalled")
    remote = RemoteCheckpoints(ObjectStore("s3://ckpt-stalled/runs/a"), upload_warn_s=0.3)
    uploader = Uploader(remote, keep_last=0)
    faults.hold("PUT", "/step-00000001/state")  # the store stops answering (not refusing)
    uploader.submit(make_checkpoint(tmp_path, 1))
    assert faults.held.acquire(timeout=10)
    deadline = time.monotonic() + 10
    err = ""
    while "no answer from the store" not in err and time.monotonic() < deadline:
        time.sleep(0.1)
        err += capsys.readouterr().err
    assert "uploading checkpoint step-00000001 to s3://ckpt-stalled/runs/a/step-00000001: no " \
        "answer from the store for 0s (checkpoint.upload_warn_s=0.3)" in err  # fmt: skip
    faults.release()  # it answers again: the upload goes through
    (report,) = uploader.finish()
    assert report.error is None and report.size_bytes > 0
    assert remote.complete() == ["step-00000001"]
    uploader.close()


def test_checkpoints_waiting_for_upload_are_kept_locally(s3, faults, tmp_path):
    s3.create_bucket("ckpt-waiting")
    url = "s3://ckpt-waiting/runs/a"
    fabric = Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Linear(4, 2)
    model = fabric.setup(model)
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url, "--checkpoint.keep_last", "1")
    ckpt, monitor = Checkpointer(fabric, cfg), Monitor(fabric, cfg, start_step=0)
    faults.hold("PUT", "/step-00000001/")  # the first upload is slow: the next ones queue up
    for step in (1, 2, 3):
        ckpt.save({"model": model, "progress": {"step": step}}, step, tokens_seen=16 * step)
    root = run_dir / "checkpoints"
    # keep_last 1, but 1 is being uploaded and 2 waits for its turn: neither is deleted.
    assert [p.name for p in list_checkpoints(root)] == [f"step-0000000{s}" for s in (1, 2, 3)]
    faults.release()
    reports = ckpt.uploader.finish()
    assert [(r.step, r.skipped, r.error) for r in reports] == [(s, None, None) for s in (1, 2, 3)]
    assert RemoteCheckpoints(ObjectStore(url)).complete() == ["step-00000003"]  # keep_last there
    ckpt.save({"model": model, "progress": {"step": 4}}, 4, tokens_seen=64)  # nothing waits now
    ckpt.uploader.finish()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004"]
    assert ckpt.finish_uploads(monitor) == 0
    ckpt.uploader.close()


def test_a_failed_upload_is_kept_locally_until_retried(s3, faults, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail at once: botocore's backoff is not tested
    s3.create_bucket("ckpt-failed")
    url = "s3://ckpt-failed/runs/a"
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(torch.nn.Linear(4, 2))
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url, "--checkpoint.keep_last", "1")
    ckpt = Checkpointer(fabric, cfg)
    faults.fail("PUT", "/step-00000001/")  # every attempt: the upload of step 1 fails
    ckpt.save({"model": model, "progress": {"step": 1}}, 1, tokens_seen=16)
    assert [r.error is not None for r in ckpt.uploader.finish()] == [True]
    ckpt.save({"model": model, "progress": {"step": 2}}, 2, tokens_seen=32)
    # keep_last 1, but step 1 has not reached the store: it stays until its retry succeeds.
    root = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    ckpt.uploader.close()


def test_checkpointer_uploads_what_it_publishes(s3, tmp_path):
    s3.create_bucket("ckpt-trainer")
    url = "s3://ckpt-trainer/runs/a"
    fabric = Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    for async_save in ("false", "true"):
        run_dir = tmp_path / async_save
        cfg = make_config(
            run_dir,
            "--checkpoint.remote_dir",
            f"{url}/{async_save}",
            "--checkpoint.keep_last",
            "1",
            "--checkpoint.async_save",
            async_save,
        )
        ckpt, monitor = Checkpointer(fabric, cfg), Monitor(fabric, cfg, start_step=0)
        state = {"model": model, "optimizer": optimizer, "progress": {"step": 0}}
        for step in (1, 2, 3):
            ckpt.save(state, step, tokens_seen=16 * step)
            ckpt.log_uploads(monitor)
        ckpt.wait()
        ckpt.finish_uploads(monitor)
        remote = RemoteCheckpoints(ObjectStore(f"{url}/{async_save}"))
        assert remote.scan() == (["step-00000003"], [])  # steps 1, 2: pruned (or never sent)
        assert remote.has_copy(list_checkpoints(run_dir / "checkpoints")[-1])
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert records[-1]["step"] == 3 and records[-1]["upload_bytes"] > 0
        assert records[-1]["remote_checkpoint"] == f"{url}/{async_save}/step-00000003"
        assert not any("upload_error" in r for r in records)
        ckpt.uploader.close()


# -- resume -----------------------------------------------------------------------------------


def test_download_verifies_and_publishes_the_newest(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-download")
    source = tmp_path / "source"
    for step in (2, 4):
        remote.upload(make_checkpoint(source, step, make_config(source)))
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url)
    path, skipped = choose_resume(cfg, remote=True)
    assert path == run_dir / "checkpoints" / "step-00000004" and skipped == []
    assert verify(path) is None
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, MANIFEST_NAME, STATE_NAME]
    assert (path / STATE_NAME).read_bytes() == (source / "step-00000004" / STATE_NAME).read_bytes()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]  # no .partial
    # Now the run dir is as new as the store: nothing more is downloaded, and without
    # `remote` (a rollback) the store is never asked.
    assert choose_resume(cfg, remote=True) == (path, [])
    assert choose_resume(cfg) == (path, [])


def test_newer_local_checkpoint_wins(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-localwins")
    remote.upload(make_checkpoint(tmp_path / "source", 2))
    run_dir = tmp_path / "run"
    local = make_checkpoint(run_dir / "checkpoints", 3)
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url)
    assert choose_resume(cfg, remote=True) == (local, [])
    assert not (run_dir / "checkpoints" / "step-00000002").exists()


def damage_remote(remote: RemoteCheckpoints, name: str, how: str) -> None:
    key = f"{name}/{STATE_NAME}"
    if how == "missing file":
        remote.store.delete(key)
    else:  # same size, other bytes: only the SHA-256 sees it
        data = bytearray(remote.store.read_bytes(key))
        data[len(data) // 2] ^= 0xFF
        remote.store.put_bytes(key, bytes(data))


@pytest.mark.parametrize("how", ["bad checksum", "missing file"])
def test_damaged_remote_checkpoint_is_passed_over(s3, tmp_path, capsys, how):
    url, remote = remote_of(s3, f"ckpt-damaged-{how.split()[0]}")
    for step in (2, 4):
        remote.upload(make_checkpoint(tmp_path / "source", step))
    damage_remote(remote, "step-00000004", how)
    root = tmp_path / "run" / "checkpoints"
    cfg = make_config(tmp_path / "run", "--checkpoint.remote_dir", url)
    path = fetch_newer(cfg, root, None)
    assert path == root / "step-00000002" and verify(path) is None
    err = capsys.readouterr().err
    assert f"skipping damaged remote checkpoint {url}/step-00000004" in err
    assert ("SHA-256" if how == "bad checksum" else "missing file") in err
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_no_good_remote_checkpoint_keeps_the_local_one(s3, tmp_path, capsys):
    url, remote = remote_of(s3, "ckpt-allbad")
    remote.upload(make_checkpoint(tmp_path / "source", 4))
    damage_remote(remote, "step-00000004", "bad checksum")
    run_dir = tmp_path / "run"
    local = make_checkpoint(run_dir / "checkpoints", 2)
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url)
    assert choose_resume(cfg, remote=True) == (local, [])
    assert f"resuming from the local {local}" in capsys.readouterr().err
    local.rename(local.with_name("elsewhere"))
    assert choose_resume(cfg, remote=True) == (None, [])
    assert "starting from scratch" in capsys.readouterr().err


class Opaque:
    """A pickled object other than tensors and plain containers: the safe load refuses it."""


def test_unsafe_remote_checkpoint_is_refused_before_it_is_published(s3, tmp_path, capsys):
    url, remote = remote_of(s3, "ckpt-unsafe")
    remote.upload(make_checkpoint(tmp_path / "source", 2))
    remote.upload(make_checkpoint(tmp_path / "source", 4, state={"model": Opaque()}))
    root = tmp_path / "run" / "checkpoints"
    cfg = make_config(tmp_path / "run", "--checkpoint.remote_dir", url)
    assert choose_resume(cfg, remote=True) == (root / "step-00000002", [])
    err = capsys.readouterr().err
    assert f"skipping unsafe remote checkpoint {url}/step-00000004 (refused before" in err
    assert f"refusing to load {url}/step-00000004/state: it contains pickled objects" in err
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # never published
    assert remote.complete() == ["step-00000002", "step-00000004"]  # the store is left as it is


def test_transient_store_failure_at_resume_is_retried(s3, faults, tmp_path, capsys):
    url, remote = remote_of(s3, "ckpt-flaky")
    for step in (2, 4):
        remote.upload(make_checkpoint(tmp_path / "source", step))
    # 503s for as many requests as the client's own attempts (4): the download fails once.
    faults.fail("HEAD", "/step-00000004/state", times=4)
    root = tmp_path / "run" / "checkpoints"
    cfg = make_config(tmp_path / "run", "--checkpoint.remote_dir", url)
    assert fetch_newer(cfg, root, None) == root / "step-00000004"
    assert [f[0] for f in faults.faults] == ["fail"] * 4
    err = capsys.readouterr().err
    assert f"Cannot read {url}/step-00000004/state: ClientError: An error occurred (503)" in err
    assert "retrying in" in err and "skipping" not in err
    assert verify(root / "step-00000004") is None


def test_store_failing_at_resume_stops_the_run_and_changes_nothing(s3, faults, tmp_path):
    url, remote = remote_of(s3, "ckpt-down")
    for step in (2, 4):
        remote.upload(make_checkpoint(tmp_path / "source", step))
    before = remote.store.list()
    run_dir = tmp_path / "run"
    local = make_checkpoint(run_dir / "checkpoints", 2)  # older than the store's newest
    faults.fail("HEAD", "/step-00000004/state")  # every time
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url, "--checkpoint.remote_retry_s", "0.5")
    with pytest.raises(StoreUnavailableError) as info:
        choose_resume(cfg, remote=True)
    message = str(info.value)
    assert info.value.exit_code == EXIT_STORE_UNAVAILABLE == 75
    assert message.startswith(f"Cannot read {url}/step-00000004/state: ClientError")
    assert "not a damaged checkpoint" in message and "remote_retry_s=0.5" in message
    assert "--checkpoint.remote_dir null" in message
    # Neither resumed from the older local one nor from scratch; nothing written anywhere.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [local.name]
    assert remote.store.list() == before


def test_remote_copy_replaces_a_damaged_local_one(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-replace")
    remote.upload(make_checkpoint(tmp_path / "source", 4))
    run_dir = tmp_path / "run"
    older = make_checkpoint(run_dir / "checkpoints", 2)
    damaged = make_checkpoint(run_dir / "checkpoints", 4)
    flip_middle_byte(damaged / STATE_NAME)
    path, skipped = choose_resume(make_config(run_dir, "--checkpoint.remote_dir", url), True)
    assert path == damaged and verify(path) is None and skipped == []
    assert choose_resume(make_config(run_dir)) == (damaged, [])
    assert older.is_dir()


def test_unreachable_store_stops_a_run_that_has_nothing_local(s3, tmp_path, monkeypatch, capsys):
    url, _ = remote_of(s3, "ckpt-unreachable")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, "--checkpoint.remote_dir", url, "--checkpoint.remote_retry_s", "0.1")
    with pytest.raises(
        StoreUnavailableError, match=r"cannot reach the object store.*remote_dir null"
    ):
        choose_resume(cfg, remote=True)
    local = make_checkpoint(run_dir / "checkpoints", 2)
    assert choose_resume(cfg, remote=True) == (local, [])
    assert "without looking for newer remote ones" in capsys.readouterr().err


def test_remote_checkpoint_of_another_model_is_refused(s3, tmp_path):
    url, remote = remote_of(s3, "ckpt-othermodel")
    source = tmp_path / "source"
    remote.upload(make_checkpoint(source, 2, make_config(source, "--model.n_layers", "3")))
    cfg = make_config(tmp_path / "run", "--checkpoint.remote_dir", url)
    with pytest.raises(CheckpointError, match="model.n_layers=3 there"):
        choose_resume(cfg, remote=True)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before downloading


# -- the real trainer -------------------------------------------------------------------------

# One process; the decay spans 6 steps whatever train.max_steps is (4 + 2 steps = 6 straight).
E2E = ["--strategy.devices", "1", "--train.global_batch_size", "4", "--schedule.decay_steps", "6",
       "--eval.interval", "0", "--eval.at_start", "false", "--checkpoint.interval", "2"]  # fmt: skip


def train_in_process(sample_data, run_dir, *extra: str) -> int:
    """`orchestrator train` in this process (strategy single: no process group; 2 steps), its
    exit code; the environment as it was before (Lightning sets variables in it)."""
    argv = [*TINY, *data_args(sample_data), *E2E, "--strategy.name", "single"]
    environ = dict(os.environ)
    try:
        return train_main([*argv, "--train.max_steps", "2", "--run.dir", str(run_dir), *extra])
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_run_whose_newest_checkpoint_is_not_in_the_store_exits_74(
    s3, faults, sample_data, tmp_path, capsys
):
    s3.create_bucket("ckpt-refusing")
    faults.fail("PUT", "/step-00000002/")  # every upload of the run's checkpoint fails
    run_dir = tmp_path / "run"
    code = train_in_process(sample_data, run_dir, "--checkpoint.remote_dir", "s3://ckpt-refusing/a")
    assert code == EXIT_UPLOAD_FAILED == 74
    err = capsys.readouterr().err
    assert "error: the run's newest checkpoint step-00000002 was NOT copied" in err
    assert "Exit code 74" in err
    assert json.loads((run_dir / "summary.json").read_text())["exit_code"] == 74


def test_run_stops_with_75_when_the_store_fails_at_its_start(
    s3, faults, sample_data, tmp_path, capsys
):
    url, remote = remote_of(s3, "ckpt-failing")
    remote.upload(make_checkpoint(tmp_path / "source", 4))
    faults.fail("HEAD", "/step-00000004/state")  # every time
    run_dir = tmp_path / "run"
    retry = ["--checkpoint.remote_retry_s", "0.2"]
    code = train_in_process(sample_data, run_dir, "--checkpoint.remote_dir", url, *retry)
    assert code == EXIT_STORE_UNAVAILABLE == 75
    err = capsys.readouterr().err
    assert f"error: Cannot read {url}/step-00000004/state" in err
    assert "Traceback" not in err
    assert not list((run_dir / "checkpoints").iterdir())  # nothing started, nothing written


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(run_dir)}


@pytest.mark.slow
def test_run_resumes_from_the_store_after_losing_its_run_dir(s3, sample_data, tmp_path):
    s3.create_bucket("ckpt-e2e")
    url = "s3://ckpt-e2e/runs/a"
    remote = RemoteCheckpoints(ObjectStore(url))
    straight = tmp_path / "straight"
    train(straight, sample_data, *E2E, "--train.max_steps", "6")

    run_dir = tmp_path / "run"
    with_remote = [*E2E, "--checkpoint.remote_dir", url]
    proc = train(
        run_dir, sample_data, *with_remote, "--train.max_steps", "4", "--checkpoint.keep_last", "1"
    )
    assert f"Uploaded checkpoint step-00000004 to {url}/step-00000004" in proc.stdout
    assert remote.scan() == (["step-00000004"], [])  # keep_last 1 there too, no leftovers
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    uploads = [r for r in records if "upload_seconds" in r]
    # Step 2 is either uploaded and then pruned there, or pruned locally (keep_last 1) before its
    # upload got to it: the steps take milliseconds here.
    assert [r["step"] for r in uploads] in ([2, 4], [4])
    assert all(r["upload_bytes"] > 0 and r["upload_seconds"] > 0 for r in uploads)
    if len(uploads) == 2:
        assert uploads[1]["remote_removed"] == ["step-00000002"]
    else:
        assert "Not uploading checkpoint" in proc.stdout

    shutil.rmtree(run_dir)  # the node's disk is gone
    proc = train(
        run_dir, sample_data, *with_remote, "--train.max_steps", "6", "--checkpoint.keep_last", "2"
    )
    assert f"Downloading checkpoint {url}/step-00000004" in proc.stdout
    assert f"Resumed from {run_dir / 'checkpoints' / 'step-00000004'} at step 4" in proc.stdout
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == [5, 6] and got == {s: want[s] for s in (5, 6)}  # bitwise
    assert remote.complete() == ["step-00000004", "step-00000006"]

    damage_remote(remote, "step-00000006", "bad checksum")
    fresh = tmp_path / "fresh"
    proc = train(
        fresh, sample_data, *with_remote, "--train.max_steps", "6", "--checkpoint.keep_last", "2"
    )
    assert f"skipping damaged remote checkpoint {url}/step-00000006" in proc.stderr
    assert f"Resumed from {fresh / 'checkpoints' / 'step-00000004'} at step 4" in proc.stdout
    assert losses(fresh) == {s: want[s] for s in (5, 6)}
    # Its own step 6 replaced the damaged copy in the store.
    assert remote.has_copy(fresh / "checkpoints" / "step-00000006")
