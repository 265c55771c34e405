"""`orchestrator train` with data whose global batches do not depend on the number of processes.

    python tests/strategy_worker.py --strategy.devices 2 ... (any `orchestrator train` arguments)

Why: litdata gives each rank a contiguous share of the (shuffled) chunks, so with 2 processes the
step-s global batch is {rank 0's s-th batch, rank 1's s-th batch}, while one process reads
2s and 2s+1 of a single stream — different sequences, so losses of 1 and 2 processes cannot be
compared step by step on litdata. Here the s-th global batch is fixed: it is made of micro-batch
chunks c = s*A*W .. s*A*W + A*W - 1 (A micro-batches per process and step, W processes), and
rank r's k-th micro-batch of step s is chunk s*A*W + k*W + r. One process with A=4 and two with
A=2 therefore see the same 16 sequences per step. Everything else — Fabric, strategies, model,
optimizer, loop, checkpoints (the loader's position is saved and restored) — is the real trainer.

The data directory must still be a prepared dataset (functions other than the loader read it).
Sequences are learnable (token t = (a + b*t) mod V), so losses fall.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

VOCAB = int(os.environ.get("SYNTH_VOCAB", "512"))
GLOBAL_BATCH = int(os.environ.get("SYNTH_GLOBAL_BATCH", "16"))
VAL_CHUNKS = 4  # validation: the same 4 chunks whatever the world size (as far as they divide)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk(index: int, batch_size: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * index + 17)
    a = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
    b = torch.randint(1, 8, (batch_size, 1), generator=g)
    t = torch.arange(seq_len + 1).unsqueeze(0)
    return ((a + b * t) % VOCAB).to(torch.int64)  # (B, T+1)


class SyntheticLoader:
    """Endless training micro-batches for this rank; `state_dict` is its position."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world = _world()
        per_step = GLOBAL_BATCH // batch_size  # micro-batch chunks per optimizer step (all ranks)
        if GLOBAL_BATCH % batch_size or per_step % self.world:
            raise ValueError(
                "SYNTH_GLOBAL_BATCH must be a multiple of micro_batch_size x processes"
            )
        self.accumulation = per_step // self.world
        self.read = 0  # micro-batches this rank has yielded

    def __iter__(self):
        while True:
            step, k = divmod(self.read, self.accumulation)
            index = step * self.accumulation * self.world + k * self.world + self.rank
            self.read += 1
            yield chunk(index, self.batch_size, self.seq_len)

    def __len__(self) -> int:
        return 1 << 30

    def state_dict(self) -> dict:
        return {"read": self.read, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world:
            raise ValueError("the synthetic loader resumes with the same number of processes only")
        self.read = state["read"]


class SyntheticValLoader:
    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world = _world()

    def __iter__(self):
        for i in range(self.rank, VAL_CHUNKS, self.world):
            yield chunk(10_000_000 + i, self.batch_size, self.seq_len)


def make_dataloader(data_dir, seq_len: int, batch_size: int, shuffle: bool = True, **_):
    if Path(str(data_dir)).name == "train":
        return SyntheticLoader(batch_size, seq_len)
    return SyntheticValLoader(batch_size, seq_len)


def main() -> int:
    import orchestrator.train as train
    import orchestrator.training.data as training_data
    import orchestrator.training.validation as validation

    # The trainer builds its loaders in these two modules (the training and the validation data).
    training_data.make_dataloader = make_dataloader
    validation.make_dataloader = make_dataloader
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
