"""The two ways into a kernel op (mtlfast/ops/_kernel_op.py): plain eager calls run the kernel functions through an
autograd.Function, everything traced runs the torch.library ops; both must give the same numbers, and each way
must be taken exactly when it should."""
import contextlib

import pytest
import torch

import mtlfast
from mtlfast.ops._kernel_op import library_op_needed
from mtlfast.testing import OpNames, fresh_seed


def _calls(device):
    """op -> (its torch.library forward op, a function of a generator giving the op's inputs, the call on them).
    Sizes odd; deform_sample with two stages, so its list input is spread and gathered."""
    def r(gen, *shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    alpha = lambda gen: (torch.rand((), generator=gen) * 0.8 + 0.1).to(device).requires_grad_()  # noqa: E731
    return {
        "attention": ("mtlfast.attention_fwd",
                      lambda g: (r(g, 1, 2, 9, 24), r(g, 1, 2, 7, 24), r(g, 1, 2, 7, 20)),
                      lambda q, k, v: (mtlfast.ops.attention(q, k, v, backend="triton"),)),
        "tpp_attention": ("mtlfast.tpp_attention_fwd",
                          lambda g: (r(g, 1, 2, 2, 9, 16), r(g, 1, 2, 2, 7, 16), r(g, 1, 2, 2, 7, 20),
                                     r(g, 2, 2, 4), r(g, 2, 2)),
                          lambda q, k, v, w, b: (mtlfast.ops.tpp_attention(q, k, v, w, b, backend="triton"),)),
        "iterative_fusion": ("mtlfast.iterative_fusion_fwd",
                             lambda g: (r(g, 2, 11, 16), r(g, 2, 11, 16), r(g, 2, 11, 12), alpha(g)),
                             lambda q, k, v, a: (mtlfast.ops.iterative_fusion(q, k, v, a, 4, backend="triton"),)),
        "em_attention": ("mtlfast.em_attention_fwd",
                         lambda g: (r(g, 2, 13, 16), r(g, 2, 5, 16)),
                         lambda x, mu: mtlfast.ops.em_attention(x, mu, 3, backend="triton")),
        "deform_sample": ("mtlfast.deform_sample_triton",
                          lambda g: (r(g, 2, 5, 4, 6), r(g, 2, 5, 3, 3), r(g, 2, 9, 2), r(g, 2, 9, 2)),
                          lambda v0, v1, p, w: (mtlfast.ops.deform_sample([v0, v1], p, w, backend="triton"),)),
    }


def _forward_backward(call, inputs, seed):
    outs = call(*inputs)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cotangents, allow_unused=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("op", list(_calls("cpu")))
def test_eager_function_and_library_op_agree_bit_for_bit(op, device):
    """The same inputs through the eager autograd.Function and through the torch.library op (forced by a dispatch
    mode that changes nothing) give identical outputs and gradients; the graphs show which way each call took
    (the Function's backward node vs the op's generated one), and only the library way is seen by the mode."""
    forward_op, make_inputs, call = _calls(device)[op]
    seed = fresh_seed()
    inputs = make_inputs(torch.Generator().manual_seed(seed))

    eager_out = call(*inputs)
    assert type(eager_out[0].grad_fn).__name__ == f"{forward_op.split('.')[1]}_eagerBackward"
    eager = _forward_backward(call, inputs, seed)

    with OpNames() as mode:
        library_out = call(*inputs)
        assert type(library_out[0].grad_fn).__name__.startswith(f"GeneratedBackwardFor_{forward_op.replace('.', '_')}")
        library = _forward_backward(call, inputs, seed)
    assert forward_op in mode.names

    for got, want in zip(library[0] + list(library[1]), eager[0] + list(eager[1]), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
    assert all(g is not None for g in eager[1][:3])

    with torch.no_grad():  # inference skips the Function and records no graph
        plain = call(*inputs)
    assert plain[0].grad_fn is None and torch.equal(plain[0], eager[0][0])


def test_library_op_needed_rules():
    """When the library op must serve a call: meta tensors and tensor subclasses (also inside list inputs), any
    dispatch mode (fake tensors, tracers), functorch transforms; plain cpu tensors and Parameters do not need it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.ones(2)
    assert not library_op_needed((x, torch.nn.Parameter(x), [x, x], 0.5, [], "C"))
    assert library_op_needed((x, torch.empty(2, device="meta")))
    assert library_op_needed(([x, torch.empty(2, device="meta")], x))
    with FakeTensorMode():
        assert library_op_needed((x,))
    with OpNames():
        assert library_op_needed((x,))
    assert torch.func.vmap(lambda t: torch.full_like(t, float(library_op_needed((t,)))))(torch.ones(3, 2)).all()


def test_fake_tensors_take_the_library_op():
    """Under FakeTensorMode (what torch.export and make_fx trace with) the kernel op answers with its fake
    implementation: shapes and dtypes, through autograd, without running a kernel. The op's autograd entry is
    called directly on CPU fake tensors, so no backend must be runnable here (fake CUDA tensors on a CPU-only torch
    abort the process in autograd, seen under MTLFAST_SIMULATE_GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtlfast.ops.attention import _attention

    with FakeTensorMode():
        q = torch.empty(2, 3, 33, 24, requires_grad=True)
        k = torch.empty(2, 3, 17, 24, requires_grad=True)
        v = torch.empty(2, 3, 17, 40, requires_grad=True)
        out, lse = _attention(q, k, v, 0.5, [], [])
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == (2, 3, 33, 40) and lse.shape == (2, 3, 33) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert "GeneratedBackwardFor_mtlfast_attention_fwd" in type(out.grad_fn).__name__


@pytest.mark.parametrize("way", ["eager", "library"])
def test_double_backward_is_refused_either_way(way, device):
    """A gradient of a gradient raises the op's clear error on both ways in (the eager backward takes the library
    op when create_graph=True, whose registered derivative refuses)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(1, 1, 9, 8, generator=gen).to(device).requires_grad_()
    with OpNames() if way == "library" else contextlib.nullcontext():
        (grad,) = torch.autograd.grad(mtlfast.ops.attention(q, q, q, backend="triton").square().sum(), q,
                                      create_graph=True)
    with pytest.raises(NotImplementedError, match=r"mtlfast.ops.attention: double backward .* use backend='reference'"):
        grad.sum().backward()


def test_host_overhead_script_runs(tmp_path):
    """bench/host_overhead.py (the host-time comparison of the two ways, kernel functions stubbed) runs on its own
    and writes one row per op with both ways' times; it stubs kernels for its whole process, hence a subprocess."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # not needed: stubbed
    subprocess.run([sys.executable, "-m", "mtlfast.bench.host_overhead", "--out", str(tmp_path), "--rounds", "1",
                    "--calls", "3"], check=True, env=env, capture_output=True, timeout=300)
    (path,) = tmp_path.glob("host_overhead/cpu-*-cores.json")
    result = json.loads(path.read_text())
    assert set(result["ops"]) == {"attention", "tpp_attention", "lthd_attention", "iterative_fusion", "em_attention",
                                  "deform_sample"}
    for row in result["ops"].values():
        assert set(row) == {f"{way} {mode}" for way in ("eager", "library") for mode in ("fwd+bwd", "inference")}
        assert all(0 < value < 1e6 for value in row.values())
    assert result["environment"]["device"].startswith("CPU")
