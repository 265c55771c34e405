"""orchestrator/training/data.py: the warning before a costly elastic resume."""

from orchestrator.config import load_config
from orchestrator.training.data import ELASTIC_RESUME_BYTES_PER_BLOCK, elastic_resume_warning

SAVED = {"data": {"num_workers": 2}, "train": {"micro_batch_size": 4}}
HUGE = 10 * 2**30 // ELASTIC_RESUME_BYTES_PER_BLOCK  # blocks whose plan is ~10 GiB


def config(*argv):
    return load_config(["--model.name", "tiny", "--data.num_workers", "2",
                        "--train.micro_batch_size", "4", *argv])  # fmt: skip


def test_warns_only_for_a_changed_layout_of_a_large_epoch():
    cfg = config()
    assert elastic_resume_warning(cfg, SAVED, 8, 8, HUGE) is None  # same layout: exact, cheap
    assert elastic_resume_warning(cfg, SAVED, 8, 16, 1000) is None  # small epoch: cheap
    warning = elastic_resume_warning(cfg, SAVED, 8, 16, HUGE)
    assert "world size 8 -> 16" in warning and "10.0 GiB in each of the 3 process(es)" in warning
    warning = elastic_resume_warning(config("--data.num_workers", "0"), SAVED, 8, 8, HUGE)
    assert warning.startswith("resuming with data.num_workers 2 -> 0: ")
    # Mixtures refuse such a change before litdata gets to it.
    mixture = config("--data.sources", "[{name: a, dir: /x}]")
    assert elastic_resume_warning(mixture, SAVED, 8, 16, HUGE) is None
