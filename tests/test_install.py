"""`pip install .` gives a package that works on its own: run from an empty directory, it reads
nothing through the checkout (its config and data files are package data)."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# The build writes build/ and *.egg-info into its source tree: it runs on a copy of the checkout,
# without what is not source.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
    ".ruff_cache", ".whl",
)  # fmt: skip


@pytest.mark.slow
def test_installed_package_runs_from_an_empty_directory(tmp_path):
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's
    src, site, empty = tmp_path / "src", tmp_path / "site", tmp_path / "empty"
    shutil.copytree(REPO_ROOT, src, ignore=NOT_SOURCE)
    empty.mkdir()
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)  # from here on only the installed copy exists
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")

    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args], cwd=empty, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    # Every package comes from the install (not the checkout, not an editable install), with its data.
    run("-c", f"""
import data, models, orchestrator, orchestrator.checkpoint.checkpointer, orchestrator.parallel.strategy
import orchestrator.tools.evaluate, orchestrator.tools.scaling, orchestrator.training.monitor, orchestrator.train
from orchestrator.cli import QUICKSTART_CONFIG
from orchestrator.config import load_config
from orchestrator.tools.plan import DEFAULT_RESULTS
site = {str(site)!r}
for module in (data, models, orchestrator):
    assert module.__file__.startswith(site), module.__file__
for resource in (QUICKSTART_CONFIG, DEFAULT_RESULTS):
    assert str(resource).startswith(site) and resource.is_file(), resource
assert load_config(["--config", str(QUICKSTART_CONFIG)]).model.name == "tiny"  # the demo's config
""")  # fmt: skip
    assert "--data-dir" in run("-m", "orchestrator", "demo", "--help")
    # The demo's config, as `orchestrator demo` passes it to the trainer.
    config = site / "orchestrator" / "resources" / "quickstart.yaml"
    out = run("-m", "orchestrator", "config", "--config", str(config), "--train.max_steps", "7")
    assert "max_steps: 7" in out and "name: tiny" in out
    # `plan` reads its packaged measured-throughput table.
    out = run("-m", "orchestrator", "plan", "--gpu-hours", "100", "--device", "h100", "--gpus", "8")
    assert "12.5h on 8 GPU(s)" in out and "no measurement for this device" in out
    # The console script too.
    assert "compute-optimal" in run(str(site / "bin" / "orchestrator"), "--help")
