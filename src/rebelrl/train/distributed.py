"""Several processes, one run: the calls a loop makes to accelerate, in one place.

A run launched with ``accelerate launch`` or ``rebelrl train --num_processes N`` (torch's launcher)
runs the same loop in every process. Each process samples, scores and forms pairs from its own equal
share of an iteration's prompts; the wrapped policy (DDP, or FSDP / DeepSpeed from an accelerate
config) averages gradients over processes on the last micro-batch of each minibatch, so an optimizer
step sees the mean over the whole minibatch, as one process would. Metrics and evaluations are
combined over processes; the main process alone writes files, behind barriers.

With one process and no accelerate config there is nothing to distribute: modules are used as they
are, every collective returns its input, and a run gives the very numbers it gives without accelerate.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rebelrl.config import ConfigError
from rebelrl.errors import UserError

T = TypeVar("T")

# How a metric of one process's share combines with the other processes' into the whole batch's.
# Anything not listed is a mean over the share's completions, weighted by their count.
SUMMED = ("completions", "guide/completions", "guide/tokens")
MAXED = ("logp_mismatch_max", "vllm/logp_gap_max", "time/")  # an iteration takes as long as its slowest process
TOKEN_MEANS = ("sampler_dropped_mass", "value_mean")  # means over completion tokens
STDS = {"score_std": "score_mean", "reward_std": "reward_mean"}  # a std and the mean it is taken around


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes, and accelerate's ``Accelerator`` (None: one
    process, no accelerate at all)."""

    accelerator: Any = None  # accelerate.Accelerator

    @classmethod
    def start(cls) -> Processes:
        from accelerate import Accelerator

        # Without a GPU, accelerate joins several processes only when told the run is on the CPU (gloo).
        cpu = not torch.cuda.is_available()
        accelerator = Accelerator(cpu=cpu)
        if cpu and accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            _shard_on_the_cpu(accelerator)
        return cls(accelerator)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def count(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_one_machine(self) -> bool:
        """Every process runs on this machine (the launcher's local world is the whole world)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.count)) == self.count

    @property
    def device(self) -> torch.device:
        if self.accelerator is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self.accelerator.device

    @property
    def distributed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator is not None and self.accelerator.distributed_type != DistributedType.NO

    # --- models and gradients ------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model as trained, optimizer): wrapped by accelerate (DDP, FSDP, DeepSpeed) when there is
        something to distribute, else the very objects given."""
        if not self.distributed:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """A second trained module (PPO's critic head) wrapped like the policy, so its gradients are averaged too."""
        return self.accelerator.prepare(module) if self.distributed else module

    @contextmanager
    def micro_batch(self, models: list[torch.nn.Module], last: bool):
        """Forward and backward of one micro-batch. Gradients are averaged across processes only on
        the ``last`` micro-batch of a minibatch: the earlier ones accumulate locally (``no_sync``), so
        a minibatch costs one all-reduce however many micro-batches it has."""
        with ExitStack() as stack:
            if self.distributed and not last:
                for model in models:
                    stack.enter_context(self.accelerator.no_sync(model))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Pre-clip global norm of the (already averaged) gradients; clips them in place."""
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    # --- data and results ----------------------------------------------------------------------

    def share(self, items: list[T]) -> list[T]:
        """This process's contiguous, equal share of ``items`` (their count divides by the process count)."""
        n = len(items) // self.count
        return items[self.rank * n : (self.rank + 1) * n]

    def gather(self, items: list[T]) -> list[T]:
        """Every process's ``items``, concatenated in process order (any picklable objects)."""
        if not self.distributed:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum(self, value: float) -> float:
        """``value`` added up over processes (one process: ``value``)."""
        return sum(self.gather([value])) if self.distributed else value

    def max(self, value: float) -> float:
        """The largest ``value`` over processes (NaN if any is NaN)."""
        values = self.gather([value])
        return float("nan") if any(math.isnan(v) for v in values) else max(values)

    def worst(self, value: float) -> float:
        """The first non-finite ``value`` of any process, else this process's: a check every process
        makes at the same point then stops all of them, not one while the others wait for it."""
        return next((v for v in self.gather([value]) if not math.isfinite(v)), value)

    def combine(self, metrics: dict[str, float], rows: int, tokens: int) -> dict[str, float]:
        """An iteration's metrics over the whole batch from each process's metrics of its share of
        ``rows`` completions and ``tokens`` completion tokens (see ``combine_metrics``)."""
        if not self.distributed:
            return metrics
        return combine_metrics(self.gather([(metrics, rows, tokens)]))

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by the main process alone (it writes files); every process gets its result,
        or raises the ``UserError`` it raised."""
        if not self.distributed:
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as e:
                box[0] = ("error", e)
        broadcast_object_list(box)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def wait(self) -> None:
        """Barrier: no process goes on before every process got here (a checkpoint is whole, a log rewound)."""
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def state_dict(self, learner: torch.nn.Module) -> dict | None:
        """The full weights of a sharded model (FSDP, DeepSpeed ZeRO-3), gathered by every process for
        the main one to save; None where the unwrapped model already holds them (one process, DDP)."""
        from accelerate.utils import DistributedType

        if not self.distributed or self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        return self.accelerator.get_state_dict(learner)

    @property
    def _fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.distributed and self.accelerator.distributed_type == DistributedType.FSDP

    def optimizer_state(self, learner: torch.nn.Module, optimizer) -> dict:
        """The optimizer's state to save: under FSDP (1 or 2) each process holds the moments of its
        shards only, so they are gathered into the whole model's (every process calls this; the main one saves it)."""
        if not self._fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(learner, _unwrapped(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, learner: torch.nn.Module, optimizer, state: dict) -> None:
        """The saved optimizer state back into the optimizer; under FSDP each process keeps its shards of it."""
        if not self._fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(learner, _unwrapped(optimizer), optim_state_dict=state, options=StateDictOptions(full_state_dict=True))

    @property
    def steps_in_backward(self) -> bool:
        """DeepSpeed's engine steps the optimizer inside ``backward`` at each of its accumulation boundaries."""
        from accelerate.utils import DistributedType

        return self.distributed and self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def shards_weights(self) -> bool:
        """Whether a process holds only a shard of each weight between forward passes."""
        from accelerate.utils import DistributedType

        if not self.distributed:
            return False
        kind = self.accelerator.distributed_type
        return kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def full_weights(self, learner: torch.nn.Module):
        """A context in which the unwrapped policy holds all of its weights, for ``generate``: FSDP and
        ZeRO-3 keep only a shard of each weight on a process between forward passes."""
        from accelerate.utils import DistributedType

        if not self.shards_weights:
            return nullcontext()
        if self.accelerator.is_fsdp2:
            return _fsdp2_full_weights(learner, self.accelerator.state.fsdp_plugin.reshard_after_forward)
        if self.accelerator.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(learner, writeback=False)
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(learner.parameters()), modifier_rank=None)


ONE_PROCESS = Processes()


def _unwrapped(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


@contextmanager
def _fsdp2_full_weights(model: torch.nn.Module, reshard_after_forward):
    """FSDP2 (``fully_shard``): every sharded module gathers its full weights once (a collective that
    every process makes alike) and keeps them through any number of forward passes, so that processes
    may decode different numbers of steps; on exit each goes back to its shard and to resharding after
    its forward (``reshard_after_forward`` of the config; the root keeps its weights, as FSDP2 sets it)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model and bool(reshard_after_forward), recurse=False)


def _shard_on_the_cpu(accelerator) -> None:
    """An FSDP accelerate config on CPU processes: accelerate shards only on accelerators and would
    silently fall back to DDP, but torch's FSDP2 (``fully_shard``) shards over gloo as well, so the run
    takes accelerate's FSDP2 path there too (the path a GPU run takes, testable without one)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"an FSDP accelerate config on CPU processes needs fsdp_version: 2 (torch's fully_shard, which shards over gloo); "
                          f"it has fsdp_version: {plugin.fsdp_version}")
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # accelerate copies it from here on later calls
    accelerator.state.fsdp_plugin = plugin


class GatheringGenerator:
    """A ``Generator`` that samples inside ``gathered()``, a context in which the sampling model
    holds all of its weights (FSDP full sharding, DeepSpeed ZeRO-3)."""

    def __init__(self, generator, gathered: Callable):
        self.inner, self.gathered = generator, gathered

    def generate(self, prompts, n, params, **options):
        with self.gathered():
            return self.inner.generate(prompts, n, params, **options)

    def __getattr__(self, name):  # model, tokenizer, stop_ids, batch_size
        return getattr(self.inner, name)


def combine_metrics(parts: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """The metrics of a whole batch from ``(metrics, rows, tokens)`` of each process's share.

    Means are weighted by the count they were taken over (completions; tokens for ``TOKEN_MEANS``),
    ``SUMMED`` counts add up, ``MAXED`` values take the largest, and a std in ``STDS`` is pooled
    around the combined mean: with n_i rows, mean m_i and sample std s_i per share, N = sum n_i and
    M = sum n_i m_i / N, the whole batch's sample variance is
    (sum_i (n_i - 1) s_i^2 + n_i (m_i - M)^2) / (N - 1).
    """
    if len(parts) == 1:
        return dict(parts[0][0])
    keys = list(dict.fromkeys(k for metrics, _, _ in parts for k in metrics))
    out = {}
    for key in keys:
        have = [(m[key], rows, tokens) for m, rows, tokens in parts if key in m and m[key] is not None]
        if not have:
            out[key] = None
        elif key in SUMMED:
            out[key] = sum(v for v, _, _ in have)
        elif key.startswith(MAXED):
            out[key] = max(v for v, _, _ in have)
        elif key in STDS:
            out[key] = _pooled_std([(m[STDS[key]], m[key], rows) for m, rows, _ in parts if key in m])
        else:
            count = 2 if key in TOKEN_MEANS else 1  # position of the weight in (value, rows, tokens)
            total = sum(h[count] for h in have)
            out[key] = sum(h[0] * h[count] for h in have) / total if total else have[0][0]
    return out


def _pooled_std(shares: list[tuple[float, float, int]]) -> float:
    """Sample std of a union from (mean, sample std, count) of its parts."""
    n = sum(c for _, _, c in shares)
    if n < 2:
        return 0.0
    mean = sum(m * c for m, _, c in shares) / n
    ss = sum((c - 1) * s * s + c * (m - mean) ** 2 for m, s, c in shares)
    return math.sqrt(ss / (n - 1))


# --- process counts and launching ----------------------------------------------------------------


def check_shares(cfg, processes: int, steps_in_backward: bool = False) -> None:
    """Every process must get an equal share of an iteration's prompts and of each minibatch, so that
    the averaged gradient is the mean over the whole minibatch; refused before anything loads.
    ``steps_in_backward``: the optimizer steps inside every backward (DeepSpeed), so a process's
    share of a minibatch must be one micro-batch."""
    if processes <= 1:
        return
    if cfg.eval.gold_fn is not None:
        raise ConfigError("eval.gold_fn judges the held-out samples in one process for now: launch without --num_processes")
    from rebelrl.train.config import OFFLINE_ALGOS

    if cfg.algo in OFFLINE_ALGOS:
        raise ConfigError(f"algo={cfg.algo} runs in one process for now: its metrics and held-out evaluation are not yet combined "
                          "across processes; launch it without --num_processes")
    if cfg.rollout.prompts_per_iter % processes:
        raise ConfigError(
            f"rollout.prompts_per_iter={cfg.rollout.prompts_per_iter} must be a multiple of the {processes} processes: "
            "each process samples an equal share of an iteration's prompts"
        )
    if cfg.update.minibatch_size % processes:
        raise ConfigError(
            f"update.minibatch_size={cfg.update.minibatch_size} must be a multiple of the {processes} processes: "
            "each process takes an equal share of every minibatch"
        )
    share = cfg.update.minibatch_size // processes
    if steps_in_backward and cfg.update.micro_batch_size != share:
        raise ConfigError(
            f"update.micro_batch_size={cfg.update.micro_batch_size}: DeepSpeed steps the optimizer after every backward, so each "
            f"process's share of a minibatch must be one micro-batch: set update.micro_batch_size={share} (update.minibatch_size / {processes})"
        )


def launched_processes() -> int:
    """How many processes a launcher (torchrun, accelerate launch) started this run with; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch(num_processes: int, argv: list[str]) -> int:
    """Run ``rebelrl`` with ``argv`` in ``num_processes`` local processes through torch's launcher
    (gloo on the CPU, NCCL on GPUs; the rendezvous on a free local port); returns its exit code."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # the processes share the cores rather than each taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
           "-m", "rebelrl.cli", *argv]
    return subprocess.run(cmd, env=env).returncode
