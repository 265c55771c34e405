"""Training data streamed from an object store: a real S3-compatible server on loopback
(tests/s3_server.py), prepared to with `orchestrator prepare`, trained from with 2 processes,
killed and resumed bitwise (single source and a mixture of two remote sources), and each bad
input refused before any process starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import loader
from orchestrator.checkpoint.layout import list_checkpoints
from orchestrator.config import load_config
from orchestrator.schema import ConfigError
from orchestrator.training.preflight import check_inputs
from tests.training import REPO_ROOT, TINY, step_records, train

pytestmark = pytest.mark.slow

ARGS = ["--train.max_steps", "6", "--eval.interval", "3", "--checkpoint.interval", "3",
        "--logging.batch_hashes", "sequence"]  # fmt: skip


@pytest.fixture(scope="module")
def remote_corpus(s3_server, sample_data):
    """The sample corpus prepared into two buckets of the loopback server (the same tokens)."""
    from data.prepare import PrepareOptions, prepare_dataset

    tokens, tokenizer = sample_data
    urls = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        for bucket in ("corpus-a", "corpus-b"):
            s3_server.create_bucket(bucket)
            url = f"s3://{bucket}/sample/tokens"
            prepare_dataset(PrepareOptions(tokens.parent / "raw", url, tokenizer, num_workers=1))
            urls.append(url)
    return urls


def by_step(run_dir):
    records = {}
    for r in step_records(run_dir):
        records[r["step"]] = r  # a resumed run logs its steps again: the last one counts
    return [records[k] for k in sorted(records)]


def kill_after_checkpoint(cmd, run_dir, step):
    """Start the job and SIGKILL all of it once the checkpoint of `step` is published."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    root = Path(run_dir) / "checkpoints"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if root.is_dir() and any(p.name == f"step-{step:08d}" for p in list_checkpoints(root)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before it was killed: " + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_same_run(got_dir, want_dir):
    got, want = by_step(got_dir), by_step(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert [r["batch_hashes"] for r in got] == [r["batch_hashes"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def remote_cmd(run_dir, tokenizer, *extra):
    return [sys.executable, "-m", "orchestrator", "train", *TINY, "--data.tokenizer", str(tokenizer),
            "--run.dir", str(run_dir), *ARGS, *extra]  # fmt: skip


def test_train_from_s3_kill_and_resume_bitwise(s3, remote_corpus, sample_data, tmp_path):
    """2 processes stream s3:// data; killed after step 3 and resumed on another cache
    directory (as on a fresh node), the run equals one over the same data read locally."""
    _, tokenizer = sample_data
    local = tmp_path / "local"
    train(local, sample_data, *ARGS)
    remote = tmp_path / "remote"
    cmd = remote_cmd(remote, tokenizer, "--data.dir", remote_corpus[0])
    kill_after_checkpoint([*cmd, "--data.cache_dir", str(tmp_path / "cache-node-1")], remote, 3)
    proc = subprocess.run(
        [*cmd, "--data.cache_dir", str(tmp_path / "cache-node-2")],
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(remote, local)
    # The chunks came through the cache of each "node"; the credentials are nowhere in the run.
    assert any((tmp_path / "cache-node-2").rglob("chunk-*.bin"))
    saved = "".join(p.read_text(errors="ignore") for p in remote.rglob("*") if p.is_file()
                    and p.suffix in (".yaml", ".json", ".jsonl", ".log", ".txt"))  # fmt: skip
    assert s3.secret not in saved and s3.secret not in proc.stderr
    assert remote_corpus[0] in (remote / "config.yaml").read_text()


def test_mixture_of_two_remote_sources_resumes_bitwise(s3, remote_corpus, sample_data, tmp_path):
    tokens, tokenizer = sample_data

    def mixture(a, b):
        return [
            "--data.sources",
            f"[{{name: prose, dir: {a}, weight: 0.7}}, {{name: code, dir: {b}, weight: 0.3}}]",
        ]

    local = tmp_path / "local"
    train(local, sample_data, *ARGS, *mixture(tokens, tokens))
    remote = tmp_path / "remote"
    cmd = remote_cmd(
        remote, tokenizer, *mixture(*remote_corpus), "--data.cache_dir", str(tmp_path / "c")
    )
    kill_after_checkpoint(cmd, remote, 3)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)))  # fmt: skip
    assert_same_run(remote, local)
    records = map(json.loads, (remote / "metrics.jsonl").read_text().splitlines())
    by_source = [r["tokens_by_source"] for r in records if "tokens_by_source" in r]
    assert by_source and by_source[-1]["prose"] > by_source[-1]["code"] > 0


def preflight_error(tmp_path, tokenizer, *extra, env=None):
    """Run the trainer expecting a config error: (stderr, seconds), no process group started."""
    started = time.monotonic()
    proc = subprocess.run(
        remote_cmd(tmp_path / "run", tokenizer, *extra),
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing was started: no run directory either
    return proc.stderr, time.monotonic() - started


def test_bad_remote_inputs_are_one_clear_error(s3, remote_corpus, sample_data, tmp_path):
    tokens, tokenizer = sample_data
    url = remote_corpus[0]
    cases = [
        # (overrides, environment, expected message)
        (["--data.dir", "s3://no-such-bucket/tokens"], None,
         "data.dir: cannot use the 'train' split s3://no-such-bucket/tokens/train: Cannot read "
         "s3://no-such-bucket/tokens/train/index.json: the bucket 'no-such-bucket' does not exist"),
        (["--data.dir", "s3://corpus-a/missing"], None,
         "s3://corpus-a/missing/train is not a prepared litdata dataset (no index.json)"),
        (["--data.dir", url], {"AWS_SECRET_ACCESS_KEY": "wrong"},
         f"Cannot read {url}/train/index.json: the store at {s3.endpoint} refused the credentials "
         "(SignatureDoesNotMatch)"),
        (["--data.dir", url], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
         "cannot reach the object store at http://127.0.0.1:9"),
        (["--data.sources", f"[{{name: a, dir: {url}}}, {{name: b, dir: s3://corpus-b/nope}}]"], None,
         "data.sources[1].dir=s3://corpus-b/nope: s3://corpus-b/nope is not a prepared litdata dataset"),
        (["--data.dir", url, "--checkpoint.remote_dir", "s3://no-ckpt-bucket/runs/a"], None,
         "checkpoint.remote_dir=s3://no-ckpt-bucket/runs/a: Cannot open s3://no-ckpt-bucket/runs/a: "
         "the bucket 'no-ckpt-bucket' does not exist"),
    ]  # fmt: skip
    # The trainer's command line: exit 2, the message, no run dir, in seconds.
    extra, _, message = cases[0]
    stderr, seconds = preflight_error(tmp_path, tokenizer, *extra)
    assert message in stderr and seconds < 60, stderr[-2000:]
    # Every case, through the same checks in this process (each a subprocess costs ~5 s).
    from data.tokenizer import train_tokenizer

    other = train_tokenizer(tokens.parent / "raw", tmp_path / "other", vocab_size=400)
    cases.append(
        (["--data.dir", url, "--data.tokenizer", str(other)], None,
         f"data.dir={url} was prepared with the tokenizer")
    )  # fmt: skip
    for extra, env, message in cases:
        loader._REMOTE_INDEXES.clear()  # what an earlier case read is not read again
        with pytest.MonkeyPatch.context() as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            cfg = load_config([*TINY, "--data.tokenizer", str(tokenizer), *ARGS, *extra])
            started = time.monotonic()
            with pytest.raises(ConfigError) as info:
                check_inputs(cfg)
        assert message in str(info.value), (extra, str(info.value))
        assert time.monotonic() - started < 60, extra
