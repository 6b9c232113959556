"""A kernel's forward and backward, each a torch.library op, with an eager fast path that skips the dispatcher.

torch.library custom ops are what torch.compile, export, FakeTensor / meta planning and ``opcheck`` need, but
every call through one pays the dispatcher, the op's Python wrapper and its generated autograd.Function: with
the kernel functions stubbed out (host time only; bench/host_overhead.py, results in
bench/results/host_overhead/), a forward+backward took 65-105 µs more per call on the development machine's
2-core CPU (1.6-1.9x) than through a plain ``torch.autograd.Function`` calling the same functions. On a GPU
that is host time per call, which decides the small shapes of the benchmarks.

So each kernel function is kept twice over one implementation:

- :func:`kernel_function` registers a Python function as the op ``mtlfast::<name>`` (with its fake
  implementation) and returns a :class:`KernelFunction`, which calls the function directly on a plain
  eager call and the op otherwise (:func:`library_op_needed`);
- :class:`KernelAutograd` gives a forward KernelFunction its autograd formula twice: registered on the op
  (``register_autograd``) and as an eager ``autograd.Function`` with the same ``setup_context`` and
  ``backward``.

A backward KernelFunction made with ``refuse_grad=<public op name>`` also takes the op when grad mode is on
(a backward with ``create_graph=True``): the op's registered derivative then raises a clear error at a
second backward, instead of the direct call's outputs silently carrying no graph.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _needs_registrations(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta or type(value) not in _PLAIN_TENSORS
    if isinstance(value, (list, tuple)):  # a list input holds tensors or plain values (block sizes), never both
        return bool(value) and isinstance(value[0], torch.Tensor) and any(map(_needs_registrations, value))
    return False


def library_op_needed(args: Sequence) -> bool:
    """Whether a call with these arguments must go through the torch.library op: while torch.compile / export
    traces (is_compiling first: Dynamo folds it and never traces the checks after it), under a dispatch mode
    (FakeTensorMode, make_fx, ...) or a functorch transform, or for meta tensors and tensor subclasses (fake
    tensors, DTensor, ...), which only the op's registrations know how to handle."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return True
    return any(map(_needs_registrations, args))


def refuse_double_backward(backward_op: str, public: str) -> None:
    """Registers, for the torch.library op ``backward_op`` (a kernel backward), an autograd formula that
    raises a clear error: the kernel backwards have no derivative of their own, and without this a second
    backward through them fails inside torch with "no autograd formula was registered"."""
    def _backward(ctx, *grads):
        raise NotImplementedError(f"mtlfast.ops.{public}: double backward (the gradient of a gradient, "
                                  "create_graph=True) is not implemented on the kernel backends; use "
                                  "backend='reference' for it")

    torch.library.register_autograd(backward_op, _backward, setup_context=lambda ctx, inputs, output: None)


class KernelFunction:
    """A Python kernel function ``fn`` and the torch.library op ``op`` (``mtlfast::<name>``) around it.

    Calling it runs ``fn`` directly unless :func:`library_op_needed` (or, with ``refuse_grad``, grad mode is
    on), in which case it runs ``op``."""

    def __init__(self, name: str, fn: Callable, fake: Callable, refuse_grad: str | None = None) -> None:
        self.name, self.fn, self.fake = name, fn, fake
        self.op = torch.library.custom_op(f"mtlfast::{name}", fn, mutates_args=())
        self.op.register_fake(fake)
        self._grad_needs_op = refuse_grad is not None
        if refuse_grad is not None:
            refuse_double_backward(f"mtlfast::{name}", refuse_grad)

    def __call__(self, *args):
        if (self._grad_needs_op and torch.is_grad_enabled()) or library_op_needed(args):
            return self.op(*args)
        return self.fn(*args)


def kernel_function(name: str, *, fake: Callable, refuse_grad: str | None = None
                    ) -> Callable[[Callable], KernelFunction]:
    """Decorator: ``fn`` (type-annotated as torch.library requires) becomes a :class:`KernelFunction`
    registered as ``mtlfast::<name>``. ``refuse_grad``: the public op's name, for a backward function."""
    return lambda fn: KernelFunction(name, fn, fake, refuse_grad)


class KernelAutograd:
    """``forward`` (a :class:`KernelFunction`) with autograd: ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` as for ``torch.library.register_autograd`` (the backward returns one gradient or
    None per input, a list of gradients for a list-of-tensors input). Registered on the op, and also run by an
    eager ``autograd.Function``; calling this object picks the way as :class:`KernelFunction` does.

    autograd.Function only sees tensors passed as arguments, so a list-of-tensors input is spread into its
    elements for the Function and gathered again (layout: that list's length, or None for any other input)."""

    def __init__(self, forward: KernelFunction, *, setup_context: Callable, backward: Callable) -> None:
        self.forward = forward
        forward.op.register_autograd(backward, setup_context=setup_context)

        def function_forward(ctx, layout, *flat):
            inputs = _gather(layout, flat)
            output = forward.fn(*inputs)
            setup_context(ctx, inputs, output)
            ctx.layout = layout
            return output

        def function_backward(ctx, *grads):
            result = backward(ctx, *grads)
            return (None, *_spread(ctx.layout, result if isinstance(result, tuple) else (result,)))

        self._function = type(f"{forward.name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})

    def __call__(self, *args):
        if library_op_needed(args):
            return self.forward.op(*args)
        if not torch.is_grad_enabled():  # no graph is recorded: the Function would only cost time
            return self.forward.fn(*args)
        layout = tuple(len(a) if _is_tensor_list(a) else None for a in args)
        return self._function.apply(layout, *_spread(layout, args))


def _is_tensor_list(arg) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and all(isinstance(t, torch.Tensor) for t in arg)


def _spread(layout: tuple, values: Sequence) -> list:
    """The values with each list input's entry replaced by its elements (a None entry: one None per element)."""
    flat = []
    for size, value in zip(layout, values, strict=True):
        if size is None:
            flat.append(value)
        else:
            flat.extend([None] * size if value is None else value)
    return flat


def _gather(layout: tuple, flat: Sequence) -> list:
    inputs, position = [], 0
    for size in layout:
        if size is None:
            inputs.append(flat[position])
            position += 1
        else:
            inputs.append(list(flat[position:position + size]))
            position += size
    return inputs
