"""Tensor-parallel styles for modules whose weights are parameters, not Linear layers: fused MoE
experts (transformers 5's ``experts.gate_up_proj`` [E, 2*I, H] and ``experts.down_proj``
[E, H, I]).

torch's ``ColwiseParallel`` and ``RowwiseParallel`` shard an ``nn.Linear``'s ``weight`` and hook
its forward. transformers' MoE plan instead shards the experts module's own 3-D parameters
(``packed_colwise``, ``rowwise``) and runs the module on their local shards, summing its output
over the ranks (``moe_tp_experts``). :class:`ParameterParallel` is that, as a torch
``ParallelStyle``: ``parallelize_module`` applies it like any other style, and each parameter is a
DTensor whose placements say exactly which part of it the rank holds; loaderkit's distributed
reader computes each rank's part from them (``pipeline/distribute.py``).

A packed weight (gate and up concatenated along one dimension) is placed with torch's strided
shard, ``_StridedShard(dim, split_factor=2)``, as transformers' ``PackedColwiseParallel`` does:
rank ``r`` of ``n`` holds the ``r``-th ``1/n`` of the gate block and the ``r``-th ``1/n`` of the up
block, so ``chunk(2)`` of its local output is its slice of gate and its slice of up.

The forward is meant for inference (loaderkit loads models in eval mode): the output's partial sums
are all-reduced in place under ``no_grad``, and through an autograd-aware all-reduce otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def packed(dim: int, parts: int = 2) -> Any:
    """The placement of a weight packing ``parts`` blocks along ``dim`` (a fused gate/up): each
    rank holds its slice of every block (torch's ``_StridedShard(dim, split_factor=parts)``)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=parts)


class ParameterParallel(ParallelStyle):
    """Shard a module's own parameters by name and run its forward on their local shards.

    :param placements: parameter name -> its placement on the (1-D) mesh: ``Shard(d)``,
        :func:`packed`, or ``Replicate()``.
    :param sum_output: all-reduce (sum) the module's output over the mesh: the module computes
        a partial sum on each rank (a row-parallel weight inside it), as transformers'
        ``moe_tp_experts`` does for the experts.
    :param local_forward: run the forward with the module's DTensor parameters (and DTensor
        inputs) as their local tensors, as transformers' local kernels do; a module whose
        forward handles DTensors itself may say ``False``.
    """

    def __init__(self, placements: dict[str, Any] | None = None, *, sum_output: bool = False,
                 local_forward: bool = True) -> None:
        super().__init__()
        self.placements = dict(placements or {})
        self.sum_output = sum_output
        self.local_forward = local_forward

    def __repr__(self) -> str:
        return (f"ParameterParallel({self.placements}, sum_output={self.sum_output}, "
                f"local_forward={self.local_forward})")

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"ParameterParallel takes a 1-D mesh, not {device_mesh.ndim}-D")
        for name, placement in self.placements.items():
            param = module._parameters.get(name)
            if param is None:
                raise ValueError(f"{type(module).__name__} has no parameter {name!r} to shard")
            module._parameters[name] = nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=None),
                requires_grad=param.requires_grad,
            )
        if self.local_forward or self.sum_output:
            _install_forward(module, device_mesh, self.local_forward, self.sum_output)
        return module


def _install_forward(module: nn.Module, mesh, local: bool, sum_output: bool) -> None:
    """Wrap ``module.forward`` (inside the module call, so after every forward pre-hook:
    loaderkit's cast rules have decoded the fp8 shards by then, and are restored after)."""
    inner = module.forward
    group = mesh.get_group()

    def forward(*args, **kwargs):
        if local:
            args = tuple(a.to_local() if isinstance(a, DTensor) else a for a in args)
            kwargs = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in kwargs.items()}
            swapped = {n: t for n, t in module._parameters.items() if isinstance(t, DTensor)}
            locals_ = {n: t.to_local() for n, t in swapped.items()}
            module._parameters.update(locals_)
            try:
                out = inner(*args, **kwargs)
            finally:
                for n, t in swapped.items():
                    if module._parameters.get(n) is locals_[n]:
                        module._parameters[n] = t
        else:
            out = inner(*args, **kwargs)
        if sum_output:
            out = _all_reduce(out, group)
        return out

    module.forward = forward


def _all_reduce(out: Any, group) -> Any:
    import torch.distributed as dist

    if isinstance(out, DTensor):
        out = out.to_local()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"ParameterParallel(sum_output=True) sums a tensor output, not {type(out).__name__}")
    if torch.is_grad_enabled() and out.requires_grad:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(out, group=group)
    dist.all_reduce(out, group=group)
    return out
