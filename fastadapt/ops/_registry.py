"""The custom-op convention every kernel family follows.

Each fused op is one ``torch.library`` custom op ``fastadapt::<name>`` declared with
:func:`fused_op`.  The decorated function is the op's schema (its type annotations) and its
``torch`` implementation; other backends register beside it::

    @fused_op("block_rotate")                         # fastadapt::block_rotate
    def block_rotate_op(x: Tensor, R: Tensor) -> Tensor:
        return ...                                    # torch (CPU) implementation

    @block_rotate_op.impl("triton")                   # CUDA, or CPU under FASTADAPT_BACKEND=triton
    def _(x, R): return kernels.block_rotate_forward(x, R)

    @block_rotate_op.fake                             # shapes for torch.compile / meta tensors
    def _(x, R): return x.new_empty(x.shape)

    block_rotate_op.autograd(backward, setup_context)  # gradients, usually through a backward op

    @block_rotate_op.example                          # inputs for torch.library.opcheck
    def _(): yield (randn(5, 8), randn(2, 4, 4)), {}

What the registration gives every op, with nothing else to write:

- Backend choice in one place.  The op's kernel (below autograd, for every device) picks an
  implementation with :func:`fastadapt.backend.select` among the backends registered for it (CUDA
  -> "triton", CPU -> "torch", or the backend FASTADAPT_BACKEND forces).  Autograd code never
  branches on a backend: a backward is itself an op with its own implementations.
- torch.compile.  A custom op is one opaque node with a fake kernel, so dynamo traces an
  accelerated model without graph breaks; host-side work inside an implementation (a divergence
  monitor, reading a seed) runs at run time, never in the traced graph.
- Autocast.  Under ``torch.autocast`` (cpu or cuda) the op runs with its floating-point tensor
  arguments cast to the *current* autocast dtype (torch.library.register_autocast would fix one
  dtype per device) and autocast switched off inside, as a matmul does; ``autocast_keep`` names
  arguments left as they are (e.g. a float32 norm cache).
- Eager speed.  Outside tracing an op call skips the dispatcher: the implementation runs
  directly (under an autograd.Function made from the same setup_context / backward when
  gradients are needed), so a fused layer pays no more host time than plain torch calls
  (:meth:`FusedOp.__call__` says when the registered op runs instead).
- opcheck.  ``tests/test_op_registry.py`` runs ``torch.library.opcheck`` (schema, fake kernel,
  autograd registration, aliasing) on the examples of every op of every ops module; an op
  without examples fails that test.

Implementations run on real tensors: they may read Python scalars from CPU tensors (a dropout
seed), but must not synchronise with a device or read device tensors on the host.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch._library import utils
from torch._library.utils import fill_defaults

from ..backend import select

NAMESPACE = "fastadapt"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_AUTOCAST_KEYS = {"cpu": torch._C.DispatchKey.AutocastCPU, "cuda": torch._C.DispatchKey.AutocastCUDA}
# What autocast casts (torch's own rule for matmuls: float64 is left alone).
_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)
_OPS: dict[str, "FusedOp"] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)   # other tensor types (fake, subclasses) take the dispatcher



def _first_device(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    return torch.device("cpu")


class FusedOp:
    """One fastadapt custom op: its implementations per backend and its registrations.

    Call it like the function it was declared from; ``.default`` is the raw OpOverload
    (``torch.ops.fastadapt.<name>.default``), the cheapest way to call it.
    """

    def __init__(self, name: str, schema_fn: Callable, mutates_args: Iterable[str], autocast: bool,
                 autocast_keep: Iterable[str]):
        if name in _OPS:
            raise ValueError(f"fastadapt::{name} is declared twice")
        self.name = name
        self.implementations: dict[str, Callable] = {"torch": schema_fn}
        self._examples: Optional[Callable[[], Iterator]] = None
        self._eager_function = None
        self._num_params = len(inspect.signature(schema_fn).parameters)
        params = list(inspect.signature(schema_fn).parameters)

        @functools.wraps(schema_fn)
        def dispatch(*args, **kwargs):
            backend = select(name, _first_device(args), tuple(self.implementations))
            return self.implementations[backend](*args, **kwargs)

        schema = torch.library.infer_schema(schema_fn, mutates_args=tuple(mutates_args))
        self.custom_op = torch.library.custom_op(f"{NAMESPACE}::{name}", dispatch,
                                                 mutates_args=tuple(mutates_args), schema=schema)
        self.default = getattr(getattr(torch.ops, NAMESPACE), name).default
        if autocast:
            keep = {params.index(k) for k in autocast_keep}
            for device_type in _AUTOCAST_KEYS:
                _LIBRARY.impl(name, self._autocast_kernel(device_type, keep),
                              _AUTOCAST_KEYS[device_type].name, with_keyset=True)
        _OPS[name] = self

    def __call__(self, *args, **kwargs):
        """Eager calls skip the dispatcher (about 2-4x a bare autograd.Function's host time per
        call, which dominates small layers): the implementation runs directly, under an
        autograd.Function built from the same setup_context and backward when gradients are
        needed.  Everything else takes the registered op: torch.compile / export tracing, autocast,
        an active dispatch mode (fake tensors, opcheck), tensor subclasses, functorch transforms,
        keyword arguments, an op without autograd called on inputs that require grad."""
        if (kwargs or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.maybe_current_level() is not None):
            return self.default(*args, **kwargs)
        tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
        if torch.overrides.has_torch_function(tensors) or any(type(t) not in _PLAIN for t in tensors):
            return self.default(*args)
        for t in tensors:
            if t.device.type in _AUTOCAST_KEYS and torch.is_autocast_enabled(t.device.type):
                return self.default(*args)
        if len(args) != self._num_params:
            args, _ = fill_defaults(self.default._schema, args, {})
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            if self._eager_function is None:
                return self.default(*args)   # no autograd registered: the dispatcher raises its error
            return self._eager_function.apply(*args)
        return self._run(*args)

    def _run(self, *args):
        backend = select(self.name, _first_device(args), tuple(self.implementations))
        return self.implementations[backend](*args)

    def __repr__(self) -> str:
        return f"FusedOp({NAMESPACE}::{self.name}, backends={sorted(self.implementations)})"

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.implementations)

    def impl(self, backend: str) -> Callable:
        """Decorator registering the implementation for ``backend`` ("triton", "cpp", "reference")."""
        def register(fn):
            self.implementations[backend] = fn
            return fn
        return register

    def fake(self, fn: Callable) -> Callable:
        """Decorator registering the fake (meta) kernel: output shapes, dtypes and devices only."""
        self.custom_op.register_fake(fn)
        return fn

    def autograd(self, backward: Callable, setup_context: Callable) -> None:
        """Register gradients (``torch.library.register_autograd``).  ``setup_context`` may call
        ``ctx.mark_non_differentiable`` on auxiliary outputs (tensors kept for backward) and
        ``ctx.set_materialize_grads(False)`` so that no zeros are made for them."""
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        self._eager_function = _eager_function(self.name, self.default._schema, self._run, backward, setup_context)

    def example(self, fn: Callable[[], Iterator]) -> Callable:
        """Decorator: ``fn()`` yields (args, kwargs) for opcheck, small CPU tensors."""
        self._examples = fn
        return fn

    def examples(self) -> list:
        return [] if self._examples is None else list(self._examples())

    def _autocast_kernel(self, device_type: str, keep: set[int]):
        excluded = torch._C.DispatchKeySet(_AUTOCAST_KEYS[device_type])

        def kernel(_keyset, *args):
            dtype = torch.get_autocast_dtype(device_type)
            cast = [a.to(dtype) if (i not in keep and isinstance(a, torch.Tensor) and a.dtype in _AUTOCAST_FROM
                                    and a.device.type == device_type) else a
                    for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return self.default(*cast)
        return kernel


def _eager_function(name: str, schema, run: Callable, backward: Callable, setup_context: Callable):
    """The autograd.Function an eager call runs: ``run`` (the implementation) then
    ``setup_context``; ``backward`` as registered.

    autograd.Function tracks top-level tensors only, so Tensor[] arguments travel flattened
    (their lengths first) and a Tensor[] output returns as a tuple; backward sees them as lists
    again (grads, ``ctx.needs_input_grad``), as the registered op's backward does.  This does
    what torch._library.autograd.supports_tensorlist does, from the schema instead of a pytree
    walk per call (that walk cost ~120 us per LoRA call, more than the layer's own work at
    d=128, N=64)."""
    lists = tuple(i for i, a in enumerate(schema.arguments) if utils.is_tensorlist_like_type(a.type))
    list_out = len(schema.returns) == 1 and utils.is_tensorlist_like_type(schema.returns[0].type)
    if not lists and not list_out:
        def forward(ctx, *args):
            output = run(*args)
            setup_context(ctx=ctx, inputs=args, output=output)
            return output
        return type(f"Eager_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def nest(flat, lengths) -> list:
        """The arguments with each Tensor[] position rebuilt from ``flat`` (its entries inline)."""
        args, j, k = [], 0, 0
        for i in range(len(flat) - sum(lengths) + len(lengths)):
            if k < len(lists) and lists[k] == i:
                args.append(list(flat[j:j + lengths[k]]))
                j, k = j + lengths[k], k + 1
            else:
                args.append(flat[j])
                j += 1
        return args

    def forward(ctx, lengths, *flat):
        args = nest(flat, lengths)
        output = run(*args)
        setup_context(ctx=ctx, inputs=tuple(args), output=output)
        ctx.fastadapt_lengths = lengths
        return tuple(output) if list_out else output

    def backward_flat(ctx, *grads):
        lengths, needs = ctx.fastadapt_lengths, ctx.needs_input_grad
        ctx.needs_input_grad = tuple(nest(needs[1:], lengths))
        try:
            result = backward(ctx, list(grads)) if list_out else backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        if not isinstance(result, tuple):
            result = (result,)
        flat, k = [None], 0
        for i, g in enumerate(result):
            if k < len(lists) and lists[k] == i:
                flat.extend([None] * lengths[k] if g is None else g)
                k += 1
            else:
                flat.append(g)
        return tuple(flat)

    function = type(f"Eager_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_flat)})

    def apply(*args):
        flat, lengths = [], []
        for i, a in enumerate(args):
            if i in lists:
                flat.extend(a)
                lengths.append(len(a))
            else:
                flat.append(a)
        output = function.apply(tuple(lengths), *flat)
        return list(output) if list_out else output

    return type(f"EagerCall_{name}", (), {"apply": staticmethod(apply), "function": function})


def fused_op(name: str, *, mutates_args: Iterable[str] = (), autocast: bool = True,
             autocast_keep: Iterable[str] = ()) -> Callable[[Callable], FusedOp]:
    """Declare ``fastadapt::<name>`` from its torch implementation (see the module docstring).

    mutates_args: names of arguments written in place (torch.library's contract).
    autocast: register the cast-to-the-autocast-dtype rule (False for ops autocast must not
        touch, e.g. ones that take integer data only).  autocast_keep: arguments it leaves alone.
    """
    def declare(fn: Callable) -> FusedOp:
        return FusedOp(name, fn, mutates_args, autocast, autocast_keep)
    return declare


def registered_ops() -> dict[str, FusedOp]:
    """Every op declared so far (import the ops modules first: :func:`import_all`)."""
    return dict(_OPS)


def import_all() -> dict[str, FusedOp]:
    """Import every module of fastadapt.ops (each declares its ops on import); returns all ops."""
    import importlib
    import pkgutil

    from .. import ops
    for info in pkgutil.iter_modules(ops.__path__):
        importlib.import_module(f"{ops.__name__}.{info.name}")
    return registered_ops()
