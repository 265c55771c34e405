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


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from data.prepare import prepare_dataset
    from data.sample_corpus import write_sample_corpus
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sample")
    write_sample_corpus(root / "raw", train_docs=400, val_docs=80, docs_per_shard=200)
    tokenizer = train_tokenizer(root / "raw", root / "tokenizer", vocab_size=512)
    prepare_dataset(root / "raw", root / "tokens", tokenizer, num_workers=1)
    return root / "tokens", tokenizer


