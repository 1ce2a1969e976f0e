"""Several accelerators on a CPU-only machine, for testing that tensors follow a model split over GPUs.

``VirtualDevices()`` is a torch dispatch mode: inside it, a tensor moved to
``vgpu:k`` (``.to``, factory functions with ``device=``, ``module.to``) is a
wrapper that reports ``device == vgpu:k`` but holds a real CPU tensor, so every
operation computes real values on the CPU. What it checks is what CUDA would
refuse: an operation whose tensor operands sit on different devices (a 0-dim
CPU tensor may join a CUDA operation, and CPU index tensors may index a device
tensor, as in torch; copies may cross devices). A model dispatched over
``vgpu:0`` and ``vgpu:1`` by accelerate then runs on the CPU with the same
device bookkeeping as on two GPUs, and any tensor left on the wrong device
fails as it would there. ``vgpu`` is torch's PrivateUse1 backend registered
from Python (``register()``): a CPU-only torch cannot name CUDA devices in
every operation. Autograd's engine sees one such device, so backward passes
on ``vgpu:1`` are out of reach.

torch's ``FakeTensorMode`` checks devices the same way but holds no values, so
nothing that reads a sampled token (every decode loop) can run under it.

Example:
    >>> register()
    True
    >>> with VirtualDevices():
    ...     a = torch.ones(2, device="vgpu:0")
    ...     (a * 2).to("cpu"), a.device
    (tensor([2., 2.]), device(type='vgpu', index=0))
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["VirtualDevices", "VirtualTensor", "register"]

NAME = "vgpu"


def register() -> bool:
    """Name torch's PrivateUse1 backend ``vgpu`` (once per process); False if it already has another name."""
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    name = torch._C._get_privateuse1_backend_name()
    if name == "privateuseone":
        _setup_privateuseone_for_python_backend(NAME)
        return True
    return name == NAME

# Operations that move data between devices by design.
_CROSSING = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default,
             torch.ops.aten._copy_from.default, torch.ops.aten._copy_from_and_resize.default}


_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default}


# What a wrapper reports about its shape is what its inner tensor has now.
_METADATA = {torch.ops.aten.sym_size.default, torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.default,
             torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default,
             torch.ops.aten.sym_storage_offset.default, torch.ops.aten.is_contiguous.default,
             torch.ops.aten.is_contiguous.memory_format}


class VirtualTensor(torch.Tensor):
    """A CPU tensor that says it lives on a virtual accelerator (``vgpu:k``)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=device, requires_grad=inner.requires_grad, layout=inner.layout,
            dispatch_sizes_strides_policy="sizes")  # sizes asked of the inner tensor: in-place views change them
        t.inner = inner
        return t

    def tolist(self):  # a device tensor's values are copied to the host, as on a GPU
        return self.inner.tolist()

    def __repr__(self) -> str:
        return f"VirtualTensor({self.inner!r}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            return func(*tree_map(_inner, args), **(kwargs or {}))
        raise RuntimeError(f"{func} on a virtual device tensor outside VirtualDevices()")


class VirtualDevices(TorchDispatchMode):
    """Run real CPU arithmetic while keeping (and checking) device placement, as on several GPUs."""

    def __enter__(self):
        # torch.tensor(data, device=...) builds on the CPU, then moves through this mode (as FakeTensorMode does)
        self._lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch._C._set_only_lift_cpu_tensors(self._lift)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _METADATA:
            return func(*tree_map(_inner, args), **kwargs)
        inner_args, inner_kwargs = tree_map(_inner, args), tree_map(_inner, kwargs)
        target = kwargs.get("device")
        if target is not None:  # a factory function or a move: made on the CPU, reported on the device asked for
            target = torch.device(target)
            if target.type != "cpu" and target.index is None:  # the current device, as torch.cuda reads it
                target = torch.device(target.type, 0)
            inner_kwargs["device"] = torch.device("cpu")
        elif func in _CROSSING:  # copy_ writes into its first argument; _to_copy without device= keeps it
            target = args[0].device
        else:
            target = _common_device(func, args, kwargs)
        out = func(*inner_args, **inner_kwargs)
        written = _written_argument(func, args, kwargs)
        if written is not None:  # in place (add_, __ixor__, squeeze_, out=): the argument itself, already updated
            return written
        if target is None or target.type == "cpu":
            return out
        return tree_map(lambda x: VirtualTensor(x, target) if type(x) is torch.Tensor else x, out)


def _written_argument(func, args, kwargs):
    """The argument an in-place or out= operation writes and returns, if it is one."""
    returns = func._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or not returns[0].alias_info.is_write:
        return None
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return kwargs[a.name] if a.name in kwargs else args[i]
    return None


def _inner(x):
    return x.inner if isinstance(x, VirtualTensor) else x


def _common_device(func, args, kwargs) -> torch.device | None:
    """The one device of an operation's tensors, or the error CUDA raises when they are on several."""
    if func in _INDEXING:  # index tensors may stay on the CPU (torch moves them), or sit on the tensor's device
        args = (args[0], [i for i in args[1] if i is not None and i.device.type != "cpu"], *args[2:])
    seen = set()
    for x in tree_flatten((args, kwargs))[0]:
        if isinstance(x, torch.Tensor) and (isinstance(x, VirtualTensor) or x.dim() > 0):
            seen.add(x.device)  # a 0-dim CPU tensor joins any device's operation, as in torch
    if len(seen) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{' and '.join(sorted(map(str, seen)))}! (in {func})")
    return next(iter(seen), None)
