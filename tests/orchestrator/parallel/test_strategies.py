"""DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 on CPU (gloo): same losses as one process, bitwise resume,
consolidation into one state dict, cross-strategy starts, `fabric run` flags, a killed rank.

What is compared, and why: litdata hands each rank a contiguous share of the data, so one process
and two processes read different sequences at the same step (see tests/strategy_worker.py). The
1-vs-2-process comparison therefore runs the real trainer with a loader whose global batch per
step is fixed (tests/strategy_worker.py): same 16 sequences per step whatever the world size,
checked through the batch fingerprints. Two processes vs one, and every strategy vs DDP: within
1e-6 (gradients are summed in a different order; measured: 0 or 1 ulp = 4.8e-7 after 4 steps).
Step 3 of every run is a NaN drill whose update is skipped: each strategy must drop that step's
gradients and continue identically. The stability options (QK-norm, whose gains shard with their
block, and the z-loss) train 2 steps under DDP, FSDP2, ZeRO-2 and ZeRO-3 and must agree the same way.
The encoder-decoder (RedLLM) trains under each strategy too, and resumes bitwise. HSDP (2 replicas
x 2 shards on 4 processes) matches FSDP on 4 and DDP on 2, and resumes across the two layouts. The
28 training runs start in two concurrent waves (fixture `runs`); the tests then only read their
outputs.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "strategy_worker.py"
pytestmark = pytest.mark.slow

STEPS = 4
TINY = [
    "--model.name", "tiny", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_hidden", "172", "--model.vocab_size", "512", "--model.max_seq_len", "64",
    "--train.micro_batch_size", "4", "--train.global_batch_size", "16", "--train.log_interval", "1",
    "--train.max_steps", str(STEPS), "--schedule.decay_steps", str(STEPS),
    "--optimizer.lr", "1e-3", "--optimizer.min_lr", "1e-4", "--schedule.warmup_steps", "2",
    "--eval.at_start", "false", "--eval.interval", "0", "--eval.max_batches", "0",
    "--checkpoint.interval", "2", "--checkpoint.keep_last", "0",
    # Step 3 gets a NaN loss: the update is skipped, and every strategy must drop that step's
    # gradients (ZeRO keeps reduced partitions until its step) and carry on identically.
    "--faults.nan_loss_at_steps", "[3]",
]  # fmt: skip
CPU2 = [
    "--strategy.accelerator",
    "cpu",
    "--strategy.devices",
    "2",
    "--strategy.precision",
    "32-true",
]
# Activation checkpointing is on for FSDP and ZeRO-3: it must not change a single bit.
STRATEGIES = {
    "ddp": ["--strategy.name", "ddp"],
    "fsdp": ["--strategy.name", "fsdp", "--strategy.activation_checkpointing", "true"],
    "zero1": ["--strategy.name", "deepspeed", "--strategy.zero_stage", "1"],
    "zero2": ["--strategy.name", "deepspeed", "--strategy.zero_stage", "2"],
    "zero3": ["--strategy.name", "deepspeed", "--strategy.zero_stage", "3",
              "--strategy.activation_checkpointing", "true"],
}  # fmt: skip


# QK-norm and the z-loss together: 2 steps under each kind of sharding (`stability-<name>` runs),
# compared with DDP in test_every_strategy_matches_ddp; the z-loss term is logged as train/z_loss.
STABILITY = ["--model.qk_norm", "true", "--model.z_loss", "1e-3", "--train.max_steps", "2",
             "--checkpoint.interval", "0"]  # fmt: skip
STABILITY_RUNS = ("ddp", "fsdp", "zero2", "zero3")

# HSDP (strategy.fsdp_shard_size): 4 processes, 2 replicas x 2 shards, the decoder's 4 steps with
# async sharded saves (`hsdp`), beside full sharding over the same 4 processes (`fsdp4`); then each
# resumes from the other's step-2 checkpoint (`fsdp4-from-hsdp`, `hsdp-from-fsdp4`): DCP reshards.
FSDP4 = [*STRATEGIES["fsdp"], "--strategy.devices", "4"]
HSDP = [*FSDP4, "--strategy.fsdp_shard_size", "2"]
HSDP_RESUMES = {"fsdp4-from-hsdp": ("hsdp", FSDP4), "hsdp-from-fsdp4": ("fsdp4", HSDP)}

# The encoder-decoder (RedLLM, models/encdec.py) on the same data: 2+2 layers, prefix LM with the
# block split in half. Each strategy trains it 4 steps (`encdec-<name>`, the NaN drill included);
# FSDP2 and ZeRO-3 resume it from their step-2 checkpoints (`resume-encdec-<name>`).
ENCDEC = ["--model.arch", "encoder_decoder", "--model.tie_embeddings", "true"]
ENCDEC_RESUMES = ("fsdp", "zero3")


def clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for key in [k for k in env if k.startswith(("SLURM_", "LT_", "MASTER_"))]:
        env.pop(key)  # never mistake the test machine for a Slurm job or a `fabric run`
    return env


def run(args, timeout=600):
    proc = subprocess.run(
        args, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


class Run:
    """A training run in the background; output goes to a file (many run at once)."""

    def __init__(self, run_dir, args):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.run_dir.parent / f"{self.run_dir.name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                args, cwd=REPO_ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self, timeout=900):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self

    @property
    def ok(self):
        return self.proc.returncode == 0

    @property
    def stdout(self):
        return self.log.read_text()

    def check(self):
        assert self.ok, (
            f"{self.run_dir.name} exited with {self.proc.returncode}:\n{self.stdout[-6000:]}"
        )
        return self


def start_worker(run_dir, sample_data, *extra):
    tokens, tokenizer = sample_data
    return Run(
        run_dir,
        [
            sys.executable,
            str(WORKER),
            *TINY,
            *CPU2,
            "--data.dir",
            str(tokens),
            "--data.tokenizer",
            str(tokenizer),
            "--run.dir",
            str(run_dir),
            *extra,
        ],
    )


def start_fabric_run(run_dir, sample_data, config):
    """`fabric run --strategy=fsdp --devices=2 orchestrator/train.py` over a config saying ddp on 1 device."""
    tokens, tokenizer = sample_data
    fabric = [
        str(Path(sys.executable).parent / "fabric"),
        "run",
        "--accelerator=cpu",
        "--devices=2",
        "--strategy=fsdp",
        "orchestrator/train.py",
        "--",
    ]
    return Run(
        run_dir,
        [
            *fabric,
            *TINY,
            "--strategy.accelerator",
            "cpu",
            "--data.dir",
            str(tokens),
            "--data.tokenizer",
            str(tokenizer),
            "--config",
            str(config),
            "--run.dir",
            str(run_dir),
        ],
    )


def records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(run_dir):
    """Per-step losses, the skipped (NaN) step as "nan" so that lists compare with ==."""
    return [r["loss"] if math.isfinite(r["loss"]) else "nan" for r in records(run_dir)]


def max_diff(a, b):
    assert [x == "nan" for x in a] == [y == "nan" for y in b], (a, b)
    return max(abs(x - y) for x, y in zip(a, b) if x != "nan")


def checkpoint(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def copy_checkpoint(source_dir, step, run_dir):
    (Path(run_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint(source_dir, step), checkpoint(run_dir, step))


@pytest.fixture(scope="session")
def runs(sample_data, tmp_path_factory):
    """Every training run of this module. The machine has 2 cores that a 2-process run leaves mostly
    idle while it starts up, so independent runs go together, in two waves:
      1. each strategy with 2 processes, 4 steps (checkpoints at 2 and 4), for the decoder and for
         the encoder-decoder; one process with the same global batch; `fabric run` with flags
         overriding the config; HSDP and FSDP with 4 processes;
      2. each sharded strategy resumed from its step-2 checkpoint (the encoder-decoder: FSDP2 and
         ZeRO-3); ZeRO-3 started from the FSDP checkpoint's weights; the `fabric run` resumed;
         QK-norm + z-loss under DDP, FSDP, ZeRO-2/3; FSDP resumed from HSDP and back.
    """
    import yaml

    root = tmp_path_factory.mktemp("strategies")
    config = root / "ddp-on-one-device.yaml"
    config.write_text(yaml.safe_dump({"strategy": {"name": "ddp", "devices": 1}}))
    started = time.perf_counter()
    first = {
        name: start_worker(root / name, sample_data, *flags) for name, flags in STRATEGIES.items()
    }
    first["single"] = start_worker(
        root / "single", sample_data, "--strategy.name", "single", "--strategy.devices", "1"
    )
    first["fabric-a"] = start_fabric_run(root / "fabric-a", sample_data, config)
    first["hsdp"] = start_worker(
        root / "hsdp", sample_data, *HSDP, "--checkpoint.async_save", "true"
    )
    first["fsdp4"] = start_worker(root / "fsdp4", sample_data, *FSDP4)
    encdec = {
        f"encdec-{name}": start_worker(root / f"encdec-{name}", sample_data, *flags, *ENCDEC)
        for name, flags in STRATEGIES.items()
    }
    for r in [*first.values(), *encdec.values()]:
        r.wait()
    second = {}
    for name in STRATEGIES:
        if name != "ddp" and first[name].ok:  # (DDP resume: tests/orchestrator/test_train.py)
            copy_checkpoint(root / name, 2, root / f"resume-{name}")
            second[f"resume-{name}"] = start_worker(
                root / f"resume-{name}", sample_data, *STRATEGIES[name]
            )
    if first["fsdp"].ok:
        second["zero3-from-fsdp"] = start_worker(
            root / "zero3-from-fsdp",
            sample_data,
            *STRATEGIES["zero3"],
            "--checkpoint.init_from",
            str(checkpoint(root / "fsdp", STEPS)),
            "--train.max_steps",
            "1",
            "--eval.at_start",
            "true",
        )
    if first["fabric-a"].ok:
        copy_checkpoint(root / "fabric-a", 2, root / "fabric-b")
        second["fabric-b"] = start_fabric_run(root / "fabric-b", sample_data, config)
    for name, (source, flags) in HSDP_RESUMES.items():
        if first[source].ok:
            copy_checkpoint(root / source, 2, root / name)
            second[name] = start_worker(root / name, sample_data, *flags)
    for name in STABILITY_RUNS:
        second[f"stability-{name}"] = start_worker(
            root / f"stability-{name}", sample_data, *STRATEGIES[name], *STABILITY
        )
    for name, flags in STRATEGIES.items():
        # The sharded formats of the encoder-decoder's module tree; DDP's resume of it is covered
        # by tests/orchestrator/training/test_fault_tolerance.py (SIGKILL), ZeRO-1/2 partition
        # the optimizer state as they do the decoder's (resumed above).
        if name in ENCDEC_RESUMES and encdec[f"encdec-{name}"].ok:
            copy_checkpoint(root / f"encdec-{name}", 2, root / f"resume-encdec-{name}")
            second[f"resume-encdec-{name}"] = start_worker(
                root / f"resume-encdec-{name}", sample_data, *flags, *ENCDEC
            )
    for r in second.values():
        r.wait()
    total = len(first) + len(encdec) + len(second)
    print(f"{total} training runs in {time.perf_counter() - started:.0f}s")
    return {**first, **encdec, **second}


@pytest.fixture(scope="session", params=list(STRATEGIES))
def two_processes(request, runs):
    """(name, run dir, Run) of the 2-process run of each strategy."""
    return request.param, runs[request.param].check().run_dir, runs[request.param]


@pytest.fixture(scope="session")
def one_process(runs):
    return runs["single"].check().run_dir


@pytest.fixture(scope="session")
def ddp_records(runs):
    return runs["ddp"].check().run_dir


def test_two_processes_match_one_process(two_processes, one_process):
    name, run_dir, _ = two_processes
    two, one = records(run_dir), records(one_process)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    # The same 16 sequences in every step (4 micro-batches: 4 on one process, 2 x 2 on two).
    for a, b in zip(two, one):
        assert (
            sorted(a["batch_hashes"]) == sorted(b["batch_hashes"]) and len(a["batch_hashes"]) == 4
        )
    diff = max_diff(losses(run_dir), losses(one_process))
    print(
        f"{name}: max |loss(2 processes) - loss(1 process)| = {diff:.2e} (losses {losses(run_dir)})"
    )
    assert diff <= 1e-6
    assert losses(run_dir)[2] == "nan"  # the drill fired, and the update was skipped...
    assert two[-1]["loss"] < two[0]["loss"]  # ...and training went on


def test_every_strategy_matches_ddp(two_processes, ddp_records, runs):
    from orchestrator.config import load_config

    name, run_dir, proc = two_processes
    mine, ddp = losses(run_dir), losses(ddp_records)
    # Measured: bitwise equal, or 1 ulp (4.8e-7) where gradients are reduced in another order.
    print(f"{name} vs ddp: bitwise={mine == ddp}, max diff {max_diff(mine, ddp):.2e}")
    assert max_diff(mine, ddp) <= 1e-6, (name, mine, ddp)
    params = load_config(TINY).model.num_params()
    assert (
        f"{params:,} parameters | 2 process(es)" in proc.stdout
    )  # also when ZeRO-3 partitions them
    if name not in STABILITY_RUNS:
        return
    # QK-norm + z-loss: the same losses (and logged z-loss terms) under every sharding as under DDP.
    stable, stable_ddp = (runs[f"stability-{n}"].check() for n in (name, "ddp"))
    mine, ddp = losses(stable.run_dir), losses(stable_ddp.run_dir)
    z, z_ddp = ([r["z_loss"] for r in records(r.run_dir)] for r in (stable, stable_ddp))
    print(f"{name} vs ddp with qk_norm + z_loss: losses {mine} / {ddp}, z-loss terms {z} / {z_ddp}")
    assert len(mine) == 2 and max_diff(mine, ddp) <= 1e-6, (name, mine, ddp)
    assert max(abs(a - b) for a, b in zip(z, z_ddp)) <= 1e-7 and all(0 < v < 1 for v in z)
    assert mine[0] != losses(run_dir)[0]  # the options change the model (same data, same seed)
    stable_params = load_config([*TINY, *STABILITY]).model.num_params()
    assert stable_params == params + 2 * 2 * 16  # 2 layers x (q, k) gains of head_dim 16
    assert f"{stable_params:,} parameters | 2 process(es)" in stable.stdout


def test_encoder_decoder_trains_alike_under_every_strategy_and_resumes_bitwise(two_processes, runs):
    """RedLLM under each strategy: the losses of DDP (within 1e-6, as the decoder's), its parameter
    count (tied embeddings counted once, also when ZeRO-3 partitions them), and (FSDP2, ZeRO-3: its
    sharded checkpoints) a bitwise resume."""
    from models.build import build_model
    from models.llama import count_parameters
    from orchestrator.config import load_config

    name, decoder_dir, _ = two_processes
    mine, ddp = (runs[f"encdec-{n}"].check() for n in (name, "ddp"))
    ours, theirs = losses(mine.run_dir), losses(ddp.run_dir)
    print(f"encoder-decoder {name} vs ddp: {ours} / {theirs}")
    assert max_diff(ours, theirs) <= 1e-6, (name, ours, theirs)
    assert ours[2] == "nan" and ours[-1] < ours[0]  # the drill's step skipped, training went on
    assert ours[0] != losses(decoder_dir)[0]  # another model on the same data
    cfg = load_config([*TINY, *ENCDEC]).model
    params = count_parameters(build_model(cfg))
    assert params == cfg.num_params() and f"{params:,} parameters | 2 process(es)" in mine.stdout
    if name not in ENCDEC_RESUMES:
        return
    resumed = runs[f"resume-encdec-{name}"].check()
    assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert losses(resumed.run_dir) == ours[2:]  # bitwise
    assert [r["batch_hashes"] for r in records(resumed.run_dir)] == [
        r["batch_hashes"] for r in records(mine.run_dir)[2:]
    ]


def test_z_loss_is_logged(runs):
    """model.z_loss > 0: train/z_loss at every log step, in metrics.jsonl and TensorBoard (equal)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["stability-ddp"].check().run_dir
    logged = [(r["step"], r["z_loss"]) for r in records(run_dir)]
    assert [step for step, _ in logged] == [1, 2]  # train.log_interval 1
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/z_loss")] == logged
    # Without a z-loss, nothing of it is logged.
    assert all("z_loss" not in r for r in records(runs["ddp"].check().run_dir))


def test_resume_is_bitwise(two_processes, runs):
    name, run_dir, _ = two_processes
    if name == "ddp":
        pytest.skip("DDP resume is covered bitwise by tests/orchestrator/test_train.py")
    resumed_run = runs[f"resume-{name}"].check()
    assert "Resumed from" in resumed_run.stdout and "at step 2" in resumed_run.stdout
    straight, resumed = records(run_dir), records(resumed_run.run_dir)
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed_run.run_dir) == losses(run_dir)[2:]  # bitwise (step 3 skipped in both)
    assert [r["lr"] for r in resumed] == [
        r["lr"] for r in straight[2:]
    ]  # the scheduler was restored
    assert [r["batch_hashes"] for r in resumed] == [
        r["batch_hashes"] for r in straight[2:]
    ]  # and the data position


def test_checkpoints_are_sharded_where_the_strategy_shards(two_processes):
    name, run_dir, _ = two_processes
    state = checkpoint(run_dir, STEPS) / "state"
    if name == "ddp":
        assert state.is_file()
    elif name == "fsdp":
        assert (state / ".metadata").is_file() and len(list(state.glob("*.distcp"))) == 2
    else:
        assert (state / "latest").is_file() and len(
            list((state / "checkpoint").glob("*optim_states.pt"))
        ) == 2


def test_consolidate_gives_one_plain_state_dict(two_processes, ddp_records, tmp_path):
    from models.config import model_config
    from models.llama import Llama
    from orchestrator.checkpoint.consolidate import load_model_state

    name, run_dir, _ = two_processes
    out = tmp_path / "full.pt"
    proc = run(
        [sys.executable, "-m", "orchestrator", "consolidate", str(run_dir), "--output", str(out)]
    )
    assert f"into {out}" in proc.stdout
    saved = torch.load(out, weights_only=True)  # plain tensors and containers only
    assert saved["step"] == STEPS
    state = saved["model"]
    cfg = model_config("tiny")
    for key, value in dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=172,
        vocab_size=512,
        max_seq_len=64,
    ).items():
        setattr(cfg, key, value)
    reference = Llama(cfg).state_dict()
    assert set(state) == set(
        reference
    )  # models/llama.py names: no wrapper prefixes, AC leaves no trace
    assert all(
        state[k].shape == reference[k].shape and state[k].dtype == torch.float32 for k in state
    )
    ddp = load_model_state(checkpoint(ddp_records, STEPS))
    worst = max((state[k] - ddp[k]).abs().max().item() for k in ddp)
    print(f"{name}: max |w - w_ddp| after {STEPS} steps = {worst:.2e}")
    # Losses are bitwise equal; weights differ by the last bits of the gradient norm (reduced in
    # a different order per strategy), which scales every update when clipping is active.
    assert worst <= 1e-5
    if name == "ddp":
        assert all(torch.equal(state[k], ddp[k]) for k in ddp)
    # Hugging Face export reads the checkpoint of every strategy directly (no consolidation step).
    from safetensors.torch import load_file

    from orchestrator.tools.hf import export_checkpoint, to_hf_state_dict

    exported = export_checkpoint(checkpoint(run_dir, STEPS), tmp_path / "hf", with_tokenizer=False)
    weights = load_file(Path(exported) / "model.safetensors")
    expected = to_hf_state_dict(state, cfg)
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k].float(), expected[k].float()) for k in expected)


def test_hsdp_trains_as_fsdp_and_ddp_and_reshards_through_its_checkpoints(runs, ddp_records):
    """strategy.fsdp_shard_size 2 on 4 processes: FSDP2 over a 2 x 2 (replicate x shard) mesh.
    The losses of full sharding over the same 4 processes and of DDP on 2 (the same 16 sequences
    per step); its async shards resume under FSDP and FSDP's under HSDP, bitwise."""
    from orchestrator.checkpoint.consolidate import load_model_state

    hsdp, fsdp4 = runs["hsdp"].check(), runs["fsdp4"].check()
    assert "fsdp HSDP 2 replicas x 2 shards" in hsdp.stdout
    assert "fsdp HSDP" not in fsdp4.stdout and "4 process(es)" in fsdp4.stdout
    assert "in the background (training stalled" in hsdp.stdout  # async sharded saves
    mine, full, ddp = losses(hsdp.run_dir), losses(fsdp4.run_dir), losses(ddp_records)
    print(f"hsdp {mine}\nfsdp {full}\nddp  {ddp}")
    assert [sorted(r["batch_hashes"]) for r in records(hsdp.run_dir)] == [
        sorted(r["batch_hashes"]) for r in records(ddp_records)
    ]
    # Step 1 is a forward of the initial weights: the meta-device build materialised bitwise the
    # same weights over the 2-D mesh. Later steps: gradients summed in another order (<= 1 ulp).
    assert mine[0] == full[0]
    assert max_diff(mine, full) <= 1e-6 and max_diff(mine, ddp) <= 1e-6, (mine, full, ddp)
    assert mine[2] == "nan" and mine[-1] < mine[0]
    # Really a 2 x 2 mesh: each tensor is saved as one replica's 2 shards (full sharding: 4).
    assert [_saved_shards(r.run_dir, "model.embed.weight") for r in (hsdp, fsdp4)] == [2, 4]
    weights = load_model_state(checkpoint(hsdp.run_dir, STEPS))  # consolidates like FSDP's
    reference = load_model_state(checkpoint(fsdp4.run_dir, STEPS))
    assert set(weights) == set(reference)
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5
    for name, (source, _) in HSDP_RESUMES.items():
        resumed, source_run = runs[name].check(), runs[source]
        assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout, name
        assert ("fsdp HSDP" in resumed.stdout) == (source == "fsdp4")
        # Step 3 is the skipped NaN drill, so step 4's loss is a forward of the restored step-2
        # weights: equal bitwise only if the other layout's shards were loaded bitwise.
        assert losses(resumed.run_dir) == losses(source_run.run_dir)[2:], name
        after = load_model_state(checkpoint(resumed.run_dir, STEPS))
        before = load_model_state(checkpoint(source_run.run_dir, STEPS))
        # One update from the restored optimizer state (a fresh Adam state moves weights ~lr).
        worst = max((after[k] - before[k]).abs().max().item() for k in before)
        print(f"{name}: max |w - w_{source}| at step {STEPS} = {worst:.2e}")
        assert worst <= 1e-6, (name, worst)


def _saved_shards(run_dir, key):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint(run_dir, STEPS) / "state").read_metadata()
    return len(metadata.state_dict_metadata[key].chunks)


def test_a_sharded_checkpoint_starts_a_run_of_another_strategy(runs):
    """FSDP shards -> ZeRO-3 partitions: same weights in (same first validation loss), and the
    optimizer continues from them (not from its own initialisation)."""
    from orchestrator.checkpoint.consolidate import load_model_state

    fsdp_dir, target = runs["fsdp"].check().run_dir, runs["zero3-from-fsdp"].check()
    assert "Initialised model weights from" in target.stdout
    # The source run's final validation (same 4 sequences, same world size).
    source_val = [
        json.loads(line)
        for line in (fsdp_dir / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ][-1]
    first_val = [
        json.loads(line)
        for line in (target.run_dir / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ][0]
    assert abs(first_val["val_loss"] - source_val["val_loss"]) <= 1e-6, (first_val, source_val)
    before, after = (
        load_model_state(checkpoint(fsdp_dir, STEPS)),
        load_model_state(checkpoint(target.run_dir, 1)),
    )
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 2e-3  # one Adam step of lr <= 1e-3 from the loaded weights


def test_resuming_with_another_strategy_is_refused_clearly(two_processes):
    from orchestrator.checkpoint.resume import check_resume_strategy
    from orchestrator.config import load_config
    from orchestrator.schema import ConfigError

    name, run_dir, _ = two_processes
    if name not in ("fsdp", "zero3"):
        pytest.skip("one sharded format of each kind")
    other = (
        ["--strategy.name", "deepspeed", "--strategy.zero_stage", "2"]
        if name == "fsdp"
        else ["--strategy.name", "ddp"]
    )
    cfg = load_config([*TINY, *CPU2, *other])
    with pytest.raises(ConfigError, match="cannot resume from .*--checkpoint.init_from"):
        check_resume_strategy(checkpoint(run_dir, STEPS), cfg, world_size=2)
    if name == "zero3":
        same = load_config([*TINY, *CPU2, *STRATEGIES["zero3"]])
        check_resume_strategy(checkpoint(run_dir, STEPS), same, world_size=2)  # same strategy: fine
        with pytest.raises(ConfigError, match="for 2 processes, this run has 4"):
            check_resume_strategy(checkpoint(run_dir, STEPS), same, world_size=4)


def test_fabric_run_honours_its_flags_trains_and_resumes(runs):
    """`fabric run --strategy=fsdp --devices=2 orchestrator/train.py` over a config that says ddp on 1
    device: the flags win, each override is printed and recorded, and the run resumes bitwise."""
    import yaml

    first, second = runs["fabric-a"].check(), runs["fabric-b"].check()
    assert (
        "note: fabric run --strategy=fsdp sets strategy.name=fsdp (the config says ddp)"
        in first.stdout
    )
    assert (
        "note: fabric run --devices=2 sets strategy.devices=2 (the config says 1)" in first.stdout
    )
    assert (checkpoint(first.run_dir, 2) / "state" / ".metadata").is_file()  # really FSDP
    recorded = yaml.safe_load((first.run_dir / "config.yaml").read_text())["strategy"]
    assert (recorded["name"], recorded["devices"]) == ("fsdp", 2)

    assert "Resumed from" in second.stdout
    a, b = records(first.run_dir), records(second.run_dir)
    assert [r["step"] for r in b] == [3, 4]
    assert losses(second.run_dir) == losses(first.run_dir)[2:]
    assert [r["batch_hashes"] for r in b] == [r["batch_hashes"] for r in a[2:]]
    hashes = [h for r in a for h in r["batch_hashes"]]
    assert len(hashes) == len(set(hashes)) == STEPS * 4


def test_a_killed_rank_ends_the_run_quickly(sample_data, tmp_path):
    """Outside Slurm (Fabric starts rank 1 as a child of rank 0): SIGKILL rank 1 mid-run."""
    tokens, tokenizer = sample_data
    env = clean_env()
    args = [
        sys.executable,
        "-m",
        "orchestrator",
        "train",
        *TINY,
        *CPU2,
        "--train.max_steps",
        "100000",
        "--checkpoint.interval",
        "0",
        "--data.dir",
        str(tokens),
        "--data.tokenizer",
        str(tokenizer),
        "--run.dir",
        str(tmp_path),
        "--strategy.timeout_s",
        "60",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) == 1, children
        killed = time.perf_counter()
        os.kill(children[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        elapsed = time.perf_counter() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"rank 0 exited {elapsed:.2f}s after rank 1 was killed")
    assert proc.returncode != 0
    assert "lost contact with another rank" in out
    assert elapsed < 30


def _children(pid):
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def test_launch_settings_agree_with_the_launcher(monkeypatch):
    """Unit level: what `fabric run` and Slurm say wins, is reported, and impossible combinations stop."""
    from orchestrator.config import load_config
    from orchestrator.parallel.launch import resolve_launch
    from orchestrator.schema import ConfigError

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LT_"))]:
        monkeypatch.delenv(key)
    cfg = load_config(["--strategy.devices", "1"])
    monkeypatch.setenv("LT_CLI_USED", "1")
    monkeypatch.setenv("LT_DEVICES", "2")
    monkeypatch.setenv("LT_NUM_NODES", "1")
    monkeypatch.setenv("LT_STRATEGY", "deepspeed_stage_3")
    monkeypatch.setenv("LT_PRECISION", "bf16")
    notes = resolve_launch(cfg)
    s = cfg.strategy
    assert (s.name, s.zero_stage, s.devices, s.precision) == ("deepspeed", 3, 2, "bf16-mixed")
    assert len(notes) == 4 and all(n.startswith("fabric run --") for n in notes)
    assert (
        "LT_STRATEGY" not in os.environ
    )  # handed over: Fabric must not compare it with our strategy object

    monkeypatch.setenv("LT_STRATEGY", "xla")
    with pytest.raises(ConfigError, match="--strategy=xla is not supported"):
        resolve_launch(load_config([]))
    monkeypatch.delenv("LT_STRATEGY")
    monkeypatch.setenv("LT_DEVICES", "2")
    with pytest.raises(ConfigError, match="single runs one process"):
        resolve_launch(load_config(["--strategy.name", "single"]))

    for key in ("LT_CLI_USED", "LT_DEVICES", "LT_NUM_NODES", "LT_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    cfg = load_config([])
    notes = resolve_launch(cfg)
    assert (cfg.strategy.devices, cfg.strategy.num_nodes) == (4, 2) and len(notes) == 2


def test_hsdp_shard_size_must_divide_the_world_before_launch(monkeypatch):
    """Config.validate refuses a shard size that does not divide devices x num_nodes (also once
    Slurm has said how many there are), naming the key and the sizes that would do."""
    from orchestrator.config import load_config
    from orchestrator.parallel.launch import resolve_launch
    from orchestrator.parallel.strategy import describe_strategy, hsdp_shape
    from orchestrator.schema import ConfigError

    fsdp = ["--strategy.name", "fsdp", "--strategy.devices", "8", "--strategy.num_nodes", "2"]
    cfg = load_config([*fsdp, "--strategy.fsdp_shard_size", "8"])
    assert hsdp_shape(cfg) == (2, 8) and describe_strategy(cfg).startswith("fsdp HSDP 2 replicas")
    for full in ("0", "16"):  # all ranks: plain FSDP
        assert hsdp_shape(load_config([*fsdp, "--strategy.fsdp_shard_size", full])) is None
    with pytest.raises(
        ConfigError,
        match=r"strategy.fsdp_shard_size=6 does not divide the world size 16 \(strategy.devices x "
        r"strategy.num_nodes = 8 x 2\).*Set strategy.fsdp_shard_size to one of \[1, 2, 4, 8, 16\]",
    ):
        load_config([*fsdp, "--strategy.fsdp_shard_size", "6"])
    with pytest.raises(ConfigError, match="fsdp_shard_size=2 needs strategy.name=fsdp"):
        load_config(["--strategy.name", "ddp", "--strategy.fsdp_shard_size", "2"])
    # Slurm launched 3 nodes of 4 tasks: a shard size of 8 no longer divides them.
    for key in [k for k in os.environ if k.startswith(("SLURM_", "LT_"))]:
        monkeypatch.delenv(key)
    cfg = load_config([*fsdp, "--strategy.fsdp_shard_size", "8"])
    for key, value in dict(
        SLURM_NTASKS="12", SLURM_NTASKS_PER_NODE="4", SLURM_NNODES="3", SLURM_JOB_NAME="x",
        SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="fsdp_shard_size=8 does not divide the world size 12"):
        resolve_launch(cfg)


def test_deepspeed_config_and_strategy_validation():
    from orchestrator.config import load_config
    from orchestrator.parallel.deepspeed import deepspeed_config
    from orchestrator.schema import ConfigError

    cfg = load_config(
        [
            "--strategy.name",
            "deepspeed",
            "--strategy.zero_stage",
            "3",
            "--strategy.offload_optimizer",
            "true",
            "--strategy.offload_params",
            "true",
            "--optimizer.grad_clip",
            "0.5",
        ]
    )
    ds = deepspeed_config(cfg, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 1
    for bad, message in [
        (["--strategy.zero_stage", "4"], "zero_stage must be 1, 2 or 3"),
        (["--strategy.offload_params", "true"], "offload_params needs"),
        (
            ["--strategy.accelerator", "cpu", "--strategy.precision", "16-mixed"],
            "16-mixed needs a GPU",
        ),
        (["--strategy.name", "megatron"], "strategy.name='megatron' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(bad)


def test_activation_checkpointing_changes_no_number():
    """Same loss and gradients with and without recomputation; parameter names unchanged."""
    from models.config import model_config
    from models.llama import Llama
    from orchestrator.parallel.activation_checkpointing import apply_activation_checkpointing

    cfg = model_config("tiny")
    cfg.n_layers, cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.max_seq_len = 2, 64, 172, 128, 32
    torch.manual_seed(0)
    plain = Llama(cfg)
    ckpt = Llama(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    assert list(dict(ckpt.named_parameters())) == list(dict(plain.named_parameters()))
    tokens = torch.randint(0, 128, (2, 33))
    grads = []
    for model in (plain, ckpt):
        loss = torch.nn.functional.cross_entropy(
            model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        )
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
