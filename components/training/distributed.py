"""Where and how finetune runs: device, precision and data-parallel processes, through Lightning Fabric.

Fabric places the model and batches, applies mixed precision and wraps the trained module for
DistributedDataParallel; the training loop, freezing, unfreezing and resume stay ours
(components/finetune.py). Processes are started the way `torchrun` starts them (PyTorch's elastic
launcher): `launch` runs N copies of a command on this node; a Kubeflow Trainer job (infra/k8s/trainjob)
runs `torchrun` itself on every node. Either way each process finds RANK, LOCAL_WORLD_SIZE, ... in its
environment, and `fabric_for` joins them into one process group (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import os
import sys
import uuid

import torch

from components.config import ConfigError, FinetuneConfig

WORKER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")  # set by torchrun for each process


def launched() -> bool:
    """True inside a process that torchrun (or `launch`) started."""
    return all(name in os.environ for name in WORKER_ENV)


def local_processes() -> int:
    """How many processes of this job share this node (its CPUs among them)."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if launched() else 1


def accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def processes_per_node(cfg: FinetuneConfig) -> int:
    """finetune.devices as a number of processes on this node. auto: one per visible GPU (the pod's
    nvidia.com/gpu limit); on CPU one, since a second process would only share the same cores."""
    if cfg.devices != "auto":
        gpus = torch.cuda.device_count()
        if accelerator() == "cuda" and cfg.devices > gpus:
            raise ConfigError(f"finetune.devices: {cfg.devices} processes asked for, {gpus} GPUs visible")
        processes = cfg.devices
    else:
        processes = max(1, torch.cuda.device_count()) if accelerator() == "cuda" else 1
    check_sync_batchnorm(cfg, processes, accelerator())
    return processes


def check_sync_batchnorm(cfg: FinetuneConfig, processes: int, device: str) -> None:
    """PyTorch's SyncBatchNorm reduces statistics only between GPUs (torch/nn/modules/batchnorm.py,
    SyncBatchNorm.forward: "expected input tensor to be on GPU"): refused on CPU processes, before any work."""
    if cfg.sync_batchnorm and processes > 1 and device != "cuda":
        raise ConfigError(f"finetune.sync_batchnorm: synchronised BatchNorm needs GPUs; these {processes} processes "
                          "run on CPUs, where each normalises its share of the batch (set it to false)")


def sync_batchnorm(model, cfg: FinetuneConfig, fabric):
    """The model with BatchNorm layers that compute their statistics over every process's share of the
    batch (finetune.sync_batchnorm), where there is more than one process."""
    if not cfg.sync_batchnorm or fabric.world_size == 1:
        return model
    check_sync_batchnorm(cfg, fabric.world_size, fabric.device.type)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def precision(setting: str, device: str) -> str:
    """finetune.precision as fp32, bf16 or fp16 for this device. auto: on a GPU bf16 where it has it
    (Ampere and later), else fp16; on a CPU fp32. bf16 on a CPU is there on request: on AVX-512 BF16
    without AMX it trained resnet18 at 29 img/s against fp32's 43; with AMX it was twice as fast at 224
    pixels but slower at 32 (28 against 14 and 260 against 408 img/s), and it gave a NaN loss in 1 of 15
    runs of a small fine-tune while another bf16 training ran beside it (0 of 48 alone; fp32 never): a bf16
    step or validation whose result is not finite is done again in fp32 (components/training/loop.py)."""
    if setting == "fp16" and device != "cuda":
        raise ConfigError("finetune.precision: fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    if setting != "auto":
        return setting
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


FABRIC_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def fabric_for(cfg: FinetuneConfig):
    """A launched Fabric for this process: one device, or this process's place in the torchrun group."""
    from lightning_fabric import Fabric

    device = accelerator()
    where = dict(accelerator=device, precision=FABRIC_PRECISION[precision(cfg.precision, device)])
    if launched():
        _die_with_launcher()
        local, world = local_processes(), int(os.environ["WORLD_SIZE"])
        fabric = Fabric(devices=local, num_nodes=world // local, strategy="ddp" if world > 1 else "auto", **where)
    else:
        fabric = Fabric(devices=1, **where)
    fabric.launch()
    return fabric


class ProcessFailed(RuntimeError):
    """A data-parallel process failed; it printed why. `exit_code` is its own (components.cli)."""

    def __init__(self, rank: int, processes: int, exit_code: int):
        super().__init__(f"data-parallel process {rank} of {processes} exited with {exit_code} (its error is above); "
                         "the others were stopped")
        self.exit_code = exit_code


def _die_with_launcher() -> None:
    """Go when the launcher goes, even by SIGKILL: it starts each process in a session of its own, out
    of reach of a signal to its process group, and an orphan would train on and write alone."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # it went before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def launch(processes: int, args: list[str]) -> None:
    """Run `python <args>` as `processes` data-parallel processes on this node, as `torchrun --standalone
    --nproc-per-node` would. Each prints its own error; the first failure stops the others and raises
    ProcessFailed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    print(f"finetune: {processes} data-parallel processes on this node", file=sys.stderr)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        # the one that failed on its own, not one the launcher then stopped (a signal: a negative code)
        rank, failure = min(err.failures.items(), key=lambda item: (item[1].exitcode <= 0, item[1].timestamp))
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        raise ProcessFailed(rank, processes, code) from None
