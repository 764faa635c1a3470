"""A stand-in CUDA device for machines without a GPU (CI is one), to test the `--device cuda` code paths.

Under `simulated_cuda()`, a tensor put on "cuda" is a CPU tensor wrapped in `OnDevice`: its `device` says
cuda:0, and it computes on the CPU, so a simulated run must give the CPU run's bytes. What it checks is what
CUDA refuses and a CPU run never notices:

- an operation mixing a device tensor with a host tensor (a 0-dim host tensor is allowed, as CUDA allows it; so
  are host index tensors, and `copy_` between devices);
- a draw on the device from a host generator;
- `.numpy()` of a device tensor.

It cannot check the GPU's arithmetic or speed: `benchmarks/gpu_check.py` does that on a real GPU. Modes are per
thread: a thread that puts a tensor on "cuda" without the mode fails as a CPU-only build does, never silently.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_aten = torch.ops.aten
# calls whose tensor arguments may lie on either device, as on CUDA: copies across devices (and, for indexing,
# the index: see `_host_tensors`)
_ACROSS = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_, _aten.copy_.default,
           _aten._to_copy.default}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, _aten.index.Tensor, _aten.index_put.default,
             _aten.index_put_.default, _aten._index_put_impl_.default}
_calls = threading.local()  # .depth: inside a checked call, whose own internals may make host tensors


class OnDevice(torch.Tensor):
    """A CPU tensor (`inner`) that says it lives on cuda:0 (to Python: to PyTorch's C++ it is a CPU tensor, so
    that no CUDA device guard is asked for)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=inner.device, requires_grad=inner.requires_grad)
        wrapper.inner = inner
        return wrapper

    @property
    def device(self) -> torch.device:
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # only ever reached without the mode: a device tensor outside `simulated_cuda()`


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _check_devices(func, args, kwargs) -> None:
    """Refuse, as CUDA does, a call that mixes device tensors with host tensors of one dimension or more."""
    flat, _ = tree_flatten((args if func not in _INDEXING else (args[0], *args[2:]), kwargs))
    if func in _ACROSS or not any(isinstance(t, OnDevice) for t in flat):
        return
    host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0]
    if host:
        raise RuntimeError(f"{getattr(func, '__name__', func)}: Expected all tensors to be on the same device, but "
                           f"found at least two devices, cuda:0 and cpu! (host tensor of shape "
                           f"{tuple(host[0].shape)})")


class _Indexed(TorchFunctionMode):
    """Checks the devices of every call the code makes (its arguments, not what PyTorch makes inside it, which
    sees these tensors as the CPU tensors they are), and names cuda:0 where a call says "cuda": a CPU-only build
    cannot ask which CUDA device is current."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            func, args = torch.Tensor.to, (args[0], CUDA)
        kwargs = kwargs or {}
        if func is torch.device:
            return func(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and _is_cuda(kwargs.get("device")):
            # these build on the host with the modes left out, then copy: make the copy one the mode sees
            return func(*args, **{**kwargs, "device": "cpu"}).to(CUDA)
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            return args[0].inner.tolist()  # as CUDA does, a copy to the host
        _check_devices(func, args, kwargs)
        if func in (torch.Tensor.cpu, torch.Tensor.to) and isinstance(args[0], OnDevice) \
                and (func is torch.Tensor.cpu or any(_is_host(v) for v in (*args[1:], *kwargs.values()))):
            # to the host: a copy, as from a GPU (PyTorch sees a CPU tensor, so `to` would return it unchanged)
            inner = args[0].inner
            result = func(inner, *args[1:], **kwargs)
            return result.clone() if result is inner else result
        _calls.depth = getattr(_calls, "depth", 0) + 1
        try:
            return func(*tree_map(_indexed, args), **tree_map(_indexed, kwargs))
        finally:
            _calls.depth -= 1


def _is_host(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu"


def _indexed(value):
    if isinstance(value, (str, torch.device)) and str(value) == "cuda":
        return CUDA
    return value


class Placements:
    """How many tensors were put on the device, in all threads (a test asserts that some were)."""

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.count += n


class _Simulation(TorchDispatchMode):
    def __init__(self, placed: Placements):
        super().__init__()
        self.placed = placed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_device = [t for t in flat if isinstance(t, OnDevice)]
        to_device = _is_cuda(kwargs.get("device"))
        if "device" in kwargs and to_device:
            kwargs["device"] = torch.device("cpu")
        generator = kwargs.get("generator")
        if (on_device or to_device) and generator is not None and generator.device.type != "cuda":
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        if not getattr(_calls, "depth", 0):  # an operation no call of the code made (autograd's, say)
            _check_devices(func, args, kwargs)
        inners = {id(t.inner): t for t in on_device}
        result = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if not (on_device or to_device) or func is _aten._local_scalar_dense.default:
            return result

        def wrap(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) in inners:  # an in-place op returns its argument
                return inners[id(value)]
            self.placed.add(to_device)
            return OnDevice(value)

        return tree_map(wrap, result)


def _unwrap(value):
    return value.inner if isinstance(value, OnDevice) else value


@contextlib.contextmanager
def simulated_cuda() -> Iterator[Placements]:
    """`torch.cuda.is_available()` is true and tensors put on "cuda" are `OnDevice`, in this thread and in the
    threads it starts meanwhile (PyTorch's modes are per thread); yields the count of tensors put there."""
    placed = Placements()
    saved = torch.cuda.is_available, torch.cuda._lazy_init, threading.Thread.run
    run = threading.Thread.run

    def simulated_run(thread: threading.Thread) -> None:
        with _Indexed(), _Simulation(placed):
            run(thread)

    torch.cuda.is_available = lambda: True
    torch.cuda._lazy_init = lambda: None  # what `.to("cuda")` calls first, to start CUDA
    threading.Thread.run = simulated_run
    try:
        with _Indexed(), _Simulation(placed):
            yield placed
    finally:
        torch.cuda.is_available, torch.cuda._lazy_init, threading.Thread.run = saved
