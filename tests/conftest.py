import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def prepare_sample_corpus(root: Path, train_docs: int, val_docs: int, docs_per_shard: int):
    """The built-in corpus at a test size, a 512-piece tokenizer and its token chunks under `root`."""
    from data.prepare import PrepareOptions, prepare_dataset
    from data.sample_corpus import write_sample_corpus
    from data.tokenizer import train_tokenizer

    write_sample_corpus(
        root / "raw", train_docs=train_docs, val_docs=val_docs, docs_per_shard=docs_per_shard
    )
    tokenizer = train_tokenizer(root / "raw", root / "tokenizer", vocab_size=512)
    prepare_dataset(PrepareOptions(root / "raw", root / "tokens", tokenizer, num_workers=1))
    return root / "tokens", tokenizer


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    return prepare_sample_corpus(
        tmp_path_factory.mktemp("sample"), train_docs=400, val_docs=80, docs_per_shard=200
    )


@pytest.fixture(scope="session")
def monitored_run(sample_data, tmp_path_factory):
    """One short 2-process run with every monitoring feature on (tests/orchestrator/training/test_monitor.py and
    tests/orchestrator/tools/test_evaluate.py share it): a two-source mixture, a NaN fault at step 3 (a skipped
    step), per-layer gradient norms, sample generations every 3 steps and a peak for MFU."""
    from tests.training import train

    tokens, _ = sample_data
    run_dir = tmp_path_factory.mktemp("monitored")
    proc = train(
        run_dir,
        sample_data,
        "--train.max_steps",
        "6",
        "--eval.interval",
        "3",
        "--checkpoint.interval",
        "6",
        "--data.sources",
        f"[{{name: prose, dir: {tokens}, weight: 0.7}}, {{name: code, dir: {tokens}, weight: 0.3}}]",
        "--faults.nan_loss_at_steps",
        "[3]",
        "--logging.layer_grad_norms",
        "true",
        "--logging.sample_interval",
        "3",
        "--logging.peak_tflops",
        "1",
    )
    return run_dir, proc


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback for the whole session."""
    pytest.importorskip("moto.server", reason="moto[server] not installed (`make setup`)")
    from tests.s3_server import S3Server

    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server, with this test's environment (and so its child processes') pointed at it."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def local_slurm(tmp_path_factory):
    """A real local Slurm cluster (cluster/local_slurm.py) for a fixture to yield from; the test
    is skipped where Slurm cannot run."""
    import time

    from cluster.local_slurm import LocalSlurm, SlurmUnavailable

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    started = time.perf_counter()
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster on this machine: {e}")
    print(f"local Slurm cluster up in {time.perf_counter() - started:.1f}s")
    yield cluster
    cluster.stop()


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package), registered under
    `<name>_bench` so that its dataclasses and worker processes can find it."""
    import importlib.util

    module_name = f"{name}_bench"
    spec = importlib.util.spec_from_file_location(
        module_name, REPO_ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
