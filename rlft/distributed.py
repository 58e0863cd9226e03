"""Everything multi-process, in one place: torchrun process groups, per-rank data, the wrapped
model, collectives for the loss normalizer and metrics, and rank-0-only writing.

Run ``torchrun --nproc_per_node N -m rlft train config.toml`` (or ``rlft train --nproc N
config.toml``, which starts torchrun for you). Each process is one rank; :func:`init` joins the
process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, NCCL (one GPU per rank, ``cuda:LOCAL_RANK``) on GPU.
Without torchrun (``WORLD_SIZE`` unset or 1) every function here is the single-process identity,
so the trainer has one code path.

How a step splits (``rlft.training.loop`` calls these; nothing else in rlft knows about ranks):

- **Data**: the step's P prompts are a pure function of (step, seed) on every rank;
  :func:`shard` gives rank r the contiguous slice ``P/W * r ..``. Each rank samples its own prompts'
  G rollouts; group advantages are per prompt, so no rewards cross ranks. Sampling is seeded per
  rollout from (seed, step, example id, group index, turn), so a prompt's rollouts are the same
  whichever rank samples them (and the same as in one process).
- **Gradient**: the loss normalizer (masked tokens / sequences of the whole batch) is summed over
  ranks (:func:`all_reduce_sum`), each rank's loss is its share of the global loss, and the wrapper
  (DDP, or FSDP2) averages gradients, so the loss is multiplied by :func:`grad_scale` (the world
  size): the summed gradient equals the single-process one. :func:`micro_steps` runs the same
  number of forward/backward passes on every rank (padding with zero-loss passes) and syncs
  gradients once, on the last.
- **Writing**: rank 0 alone writes the run store and checkpoints (:func:`run_store` gives other
  ranks a :class:`ReplicaStore` that reads but drops writes); rollouts of all ranks are gathered
  to rank 0 (:func:`gather_groups`) so the store holds the whole batch. Eval runs on rank 0 only.
  Resume: every rank loads the same checkpoint.

FSDP2 (``distributed = "fsdp2"``): :func:`wrap` shards every decoder layer and the root with
``fully_shard`` (gloo on CPU, NCCL on GPU; bf16 all-gathers with float32 gradient reductions on
GPU when ``dtype = "bfloat16"``). Each rank keeps only its shard of the trained weights, their
gradients and optimizer state. The engine samples from its own full copy (built before sharding,
refreshed after each step from :func:`full_state_dict`, a collective every rank runs), since ranks
decode different numbers of tokens and a sharded forward pass is a collective. Checkpoints gather
the full weights and optimizer state (:func:`full_state_dict`, :func:`full_optimizer_state`) and
rank 0 writes them in the same format as one process, so they load with plain ``transformers`` /
``peft`` and resume on any number of ranks. Left out: sharded (per-rank) checkpoint files, CPU
offload of parameters, and an engine that samples from the shards themselves.

Why one module: nothing else in rlft knows about ranks; every collective the trainer runs is
here, so a reader sees the whole multi-process contract in one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["init", "cleanup", "is_distributed", "world_size", "rank", "local_rank", "is_main", "device", "check",
           "shard", "all_reduce_sum", "all_reduce_max", "broadcast_object", "gather_groups", "wrap", "unwrap",
           "is_sharded", "full_state_dict", "full_optimizer_state", "load_optimizer_state", "full_tensor",
           "grad_scale", "micro_steps", "barrier", "Silent", "launch", "torchrun_command"]

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp2")


def _dist():
    import torch.distributed as td

    return td


# -- process group -----------------------------------------------------------------------------


def init(backend: str | None = None) -> bool:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1. ``backend``: gloo | nccl (default:
    nccl when this machine has a GPU for each of its ranks, else gloo on the CPU: NCCL cannot put
    two ranks on one GPU). Returns True when this call created the group (then :func:`cleanup`
    destroys it); False in a single process or when the group already exists."""
    td = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not td.is_available() or td.is_initialized():
        return False
    import torch

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is None and 0 < gpus < local_ranks:
        import warnings

        warnings.warn(f"{local_ranks} ranks on this machine but {gpus} GPU(s): training on the CPU with gloo "
                      f"(NCCL needs one GPU per rank; use --nproc {gpus})", stacklevel=2)
    backend = backend or ("nccl" if gpus >= local_ranks else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend=backend)
    return True


def cleanup(owned: bool = True) -> None:
    """Destroy the process group if ``owned`` (it was created by :func:`init`)."""
    td = _dist()
    if owned and td.is_available() and td.is_initialized():
        td.destroy_process_group()


def is_distributed() -> bool:
    td = _dist()
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes the store and checkpoints."""
    return rank() == 0


def device() -> Any:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    import torch

    if is_distributed() and _dist().get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def check(cfg: Any) -> None:
    """Fail before any compute when ``cfg`` cannot run on this world: the batch must split evenly
    over the ranks."""
    strategy = getattr(cfg, "distributed", "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed = {strategy!r} is not one of: {', '.join(STRATEGIES)}")
    if not is_distributed():
        return
    w = world_size()
    if cfg.batch_size % w:
        raise ValueError(f"batch_size = {cfg.batch_size} prompts cannot be split evenly over {w} ranks: "
                         f"use a multiple of {w} (each rank samples batch_size / world_size prompts)")


# -- data --------------------------------------------------------------------------------------


def shard(examples: Sequence[T]) -> list[T]:
    """This rank's contiguous slice of the step's examples (all of them in one process). The
    length must divide by the world size (:func:`check` makes sure of it for the batch)."""
    w, r = world_size(), rank()
    if len(examples) % w:
        raise ValueError(f"{len(examples)} examples cannot be split evenly over {w} ranks")
    n = len(examples) // w
    return list(examples[r * n:(r + 1) * n])


# -- collectives -------------------------------------------------------------------------------


def _reduce(values: Any, op: str) -> Any:
    if not is_distributed():
        return values
    import torch

    td = _dist()
    scalar = not isinstance(values, (list, tuple))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64, device=device())
    td.all_reduce(t, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
    out = t.cpu().tolist()
    return out[0] if scalar else out


def all_reduce_sum(values: Any) -> Any:
    """Sum a float (or a list of floats) over ranks; float64 on the wire. Identity in one process."""
    return _reduce(values, "sum")


def all_reduce_max(values: Any) -> Any:
    """Max of a float (or a list of floats) over ranks. Identity in one process."""
    return _reduce(values, "max")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects). Identity in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def gather_groups(groups: list[Any]) -> list[Any]:
    """Rank 0: the groups of every rank, in rank order (= the step's batch order, since
    :func:`shard` slices contiguously). Other ranks: their own groups. A rollout's ``state``
    (per-rollout scratch, possibly unpicklable) does not travel. Identity in one process."""
    if not is_distributed():
        return groups
    light = [dataclasses.replace(g, rollouts=[dataclasses.replace(r, state={}) for r in g.rollouts]) for g in groups]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    _dist().gather_object(light, out, dst=0)
    return [g for part in out for g in part] if out is not None else groups


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


# -- the model ---------------------------------------------------------------------------------


def wrap(model: Any, strategy: str = "ddp", bf16: bool = False) -> Any:
    """The module the policy update runs forward/backward through. One process: ``model`` itself.
    DDP (gloo on CPU, NCCL on ``cuda:LOCAL_RANK``): ``DistributedDataParallel(model)``, which
    broadcasts rank 0's weights at construction; ``model`` stays the plain module (the engine,
    reference, saving and probes use it) and shares its parameters with the wrapper. FSDP2:
    ``fully_shard`` on every decoder layer, then on the root, in place (every rank must hold the
    same weights before: they load the same files with the same seed). ``bf16``: on GPU, FSDP2
    gathers parameters in bf16 and reduces gradients in float32 (on CPU the update's bf16 autocast
    does the casting and gloo moves float32)."""
    if not is_distributed():
        return model
    import torch

    dev = device()
    if next(model.parameters()).device != dev:
        model.to(dev)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and dev.type == "cuda" else MixedPrecisionPolicy())
        # the mesh on this rank's device: fully_shard's default mesh takes the GPU whenever one is
        # present, also for CPU ranks (more ranks than GPUs: gloo, see init)
        mesh = init_device_mesh(dev.type, (world_size(),))
        for m in list(model.modules()):
            if type(m).__name__.endswith("DecoderLayer"):
                fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if strategy != "ddp":
        raise ValueError(f"distributed = {strategy!r} is not one of: {', '.join(STRATEGIES)}")
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # no buffer sync in forward: it is a collective in every forward, and the number of forwards
    # per step differs between ranks only in passes that micro_steps pads; weights and buffers are
    # still broadcast from rank 0 once, here (newer torch names the switch forward_sync_buffers)
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else "broadcast_buffers")
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **{no_sync: False})


def unwrap(model: Any) -> Any:
    """The plain module inside a DDP wrapper (FSDP2 modules and plain modules as they are)."""
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(model, DDP)


def _is_fsdp(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def is_sharded(model: Any) -> bool:
    """True for a module sharded by FSDP2 (its parameters are DTensor shards)."""
    return _is_fsdp(model)


def full_tensor(t: Any) -> Any:
    """A DTensor's whole value (a collective: every rank must call it in the same order); any
    other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "placements") else t


def full_state_dict(model: Any, rank0_only: bool = False) -> dict[str, Any]:
    """``model``'s state dict with whole tensors. Sharded (FSDP2): gathered from every rank, a
    collective every rank must call; ``rank0_only``: gathered to rank 0 only, on the CPU (other
    ranks get an empty dict). Otherwise ``model.state_dict()``."""
    if not _is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors. Sharded: gathered to rank 0 on the CPU
    (keyed by parameter name; a collective every rank must call). Otherwise ``state_dict()``."""
    if not _is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], by_name: bool) -> None:
    """Restore an optimizer state saved by one process (``by_name=False``: torch's own format,
    keyed by parameter index) or gathered from FSDP2 shards (``by_name=True``: keyed by
    parameter name) into ``model``'s optimizer, sharded or not, so that a run resumes under
    either strategy. ``model``: the module the update runs through."""
    model = unwrap(model)
    if not by_name and not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # indices follow the trainable parameters' order (Policy.trainable_parameters)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        state = {"state": {names[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def grad_scale(model: Any) -> float:
    """What to multiply each rank's loss by so that the wrapper's gradient *average* becomes the
    *sum* over ranks (each rank's loss already divides by the global normalizer): the world size
    for a DDP/FSDP2 module, 1 otherwise."""
    return float(world_size()) if (_is_ddp(model) or _is_fsdp(model)) else 1.0


@contextlib.contextmanager
def _grad_sync(model: Any, enabled: bool) -> Iterator[None]:
    if enabled:
        yield
    elif _is_ddp(model):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _zero_pass(model: Any) -> None:
    """A forward/backward that adds exactly zero to every gradient: it keeps a rank with fewer
    micro-batches (or none) in step with the others' collectives."""
    import torch

    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    (out.logits.float().sum() * 0.0).backward()


def micro_steps(model: Any, micro_batches: Sequence[T], pad: Any = None) -> Iterator[T]:
    """Yield the micro-batches of one optimizer step; run each one's forward and backward in the
    loop body. Distributed: every rank runs the same number of passes (the most any rank has;
    missing ones are zero-loss passes run here) and gradients are synced on the last pass only
    (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync`` before it). ``pad``: called before each
    zero-loss pass, for the other collectives a real pass runs (FSDP2: a forward of any module
    sharing the sharded weights, such as the LoRA reference). One process: a plain loop."""
    if not (_is_ddp(model) or _is_fsdp(model)):
        yield from micro_batches
        return
    n = int(all_reduce_max(float(len(micro_batches))))
    for i in range(n):
        with _grad_sync(model, enabled=i == n - 1):
            if i < len(micro_batches):
                yield micro_batches[i]
            else:
                if pad is not None:
                    pad()
                _zero_pass(model)


# -- rank-0-only side effects --------------------------------------------------------------------


class Silent:
    """Accepts any method call and does nothing (progress bars, reporters of non-main ranks)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


# -- launching -----------------------------------------------------------------------------------


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m rlft <argv>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
            "-m", "rlft", *argv]


def launch(nproc: int, argv: Sequence[str], cwd: str | Path | None = None) -> int:
    """Run ``rlft <argv>`` in ``nproc`` processes on this machine (torchrun, standalone
    rendezvous on a free port); returns torchrun's exit code."""
    return subprocess.call(torchrun_command(nproc, argv), cwd=cwd)
