"""Training on several processes: torchrun's environment, the process group, and the few
collectives the loop needs.

    torchrun --nproc-per-node 2 -m training --threads 1 ...            # CPUs: Gloo
    torchrun --nproc-per-node 8 -m training --device cuda ...          # GPUs: NCCL

Launched without torchrun (WORLD_SIZE unset) nothing here touches torch.distributed: every
helper answers as the single process does (rank 0 of 1) and `gather_with_grad` returns its input.

Every rank computes the loss of the whole global batch from gathered embeddings. The gathers
are differentiable (their backward sums the gradients that all ranks' copies of the loss send to
each rank's rows), so a rank's gradient is world_size times its share of the global-batch
gradient, and DDP's average over ranks gives back exactly the single-process gradient. Batch
norm is synchronised too (`sync_batchnorm`), so a forward over shards computes what one forward
over the global batch would.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import warnings

import torch
import torch.nn as nn


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside a process group (launched by torchrun and `setup` called)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that evaluates, prints and writes the run folder."""
    return rank() == 0


def setup(device: str = "cpu") -> torch.device:
    """The device this process trains on; under torchrun (WORLD_SIZE set) also joins the process
    group: NCCL with device "cuda" (one GPU per process, cuda:LOCAL_RANK), Gloo with "cpu"."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}; expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' but torch sees no CUDA device")
    if "WORLD_SIZE" not in os.environ:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if not is_distributed():
        # rank 0 evaluates and checkpoints while the others wait at a barrier: allow it an hour
        _dist().init_process_group("nccl" if device == "cuda" else "gloo",
                                   timeout=datetime.timedelta(hours=1),
                                   device_id=dev if device == "cuda" else None)
    return dev


def teardown() -> None:
    if is_distributed():
        _dist().destroy_process_group()


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable); also a barrier behind rank 0."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def _functional():
    import torch.distributed.nn.functional as F

    return F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (n_r, ...) concatenated in rank order: (sum n_r, ...). The ranks may hold
    different numbers of rows (padded for the collective, trimmed after). Gradients flow back to
    each rank's rows, summed over all ranks' uses of them."""
    if not is_distributed():
        return x
    dist = _dist()
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    if most == 0:
        return x
    if len(x) < most:
        x = torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))])
    with warnings.catch_warnings():  # deprecated in favour of a private API since torch 2.10
        warnings.simplefilter("ignore", FutureWarning)
        parts = _functional().all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks; its backward sums the gradients over ranks too."""
    if not is_distributed():
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _functional().all_reduce(x)


# ----------------------------------------------------------------------------- batch norm


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the rows of all ranks, on CPU tensors (torch's SyncBatchNorm needs a GPU):
    mean and variance from differentiable all-reduces of per-channel sums. Outside a process
    group or in eval mode it is plain batch norm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = all_reduce_with_grad(xf.new_tensor(float(x.numel() // x.shape[1]))).detach()
        mean = all_reduce_with_grad(xf.sum(dims)) / n  # (C,)
        var = all_reduce_with_grad((xf - mean.view(shape)).pow(2).sum(dims)) / n  # (C,)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
                self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).to(self.running_var.dtype),
                                       f)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _to_sync(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        module = new
    for name, child in module.named_children():
        module.add_module(name, _to_sync(child))
    return module


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every batch norm computed over the global batch: torch's SyncBatchNorm on
    GPUs, GlooSyncBatchNorm on CPUs. Same state-dict keys, so checkpoints load into the plain
    model. Unchanged outside a process group."""
    if not is_distributed():
        return model
    if next(model.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_sync(model)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict (name, shape, bytes), in order: equal digests,
    equal weights. Also the key of cached features (training/features.py)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
