"""Backend selection rules (DESIGN.md §2) on a toy op, so they are tested independently of any kernel."""
import subprocess
import sys

import pytest
import torch

import mtlfast
from mtlfast.backends import OPS, BackendError, BackendScope, Op, current_backend, use_backend
from mtlfast.ops.deform_sample import _OP as _OP_DEFORM
from mtlfast.testing import fresh_seed, rel_error


@pytest.fixture
def toy_op():
    op = Op("_toy_double", auto_order={"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")})
    op.register("reference", lambda x: ("reference", 2 * x), devices=("cpu", "cuda"), dtypes=mtlfast.backends.FLOAT_DTYPES)
    op.register("cpp", lambda x: ("cpp", 2 * x), devices=("cpu",), dtypes=(torch.float32,),
                limits=lambda x: [f"at most 8 elements (got {x.numel()})"] if x.numel() > 8 else [])
    op.register("triton", lambda x: ("triton", 2 * x), devices=("cuda",), dtypes=(torch.float32,),
                available=lambda device, dtype: "no triton on this test machine")
    yield op
    del OPS["_toy_double"]


def call(op, x, backend=None):
    return op.select(backend, x.device, x.dtype, (x,)).fn(x)[0]


def test_auto_picks_first_supported_in_order(toy_op):
    assert call(toy_op, torch.ones(4)) == "cpp"
    assert call(toy_op, torch.ones(16)) == "reference"  # cpp's shape limit refuses, auto moves on
    assert call(toy_op, torch.ones(4, dtype=torch.float64)) == "reference"


def test_explicit_backend_never_falls_back(toy_op):
    with pytest.raises(BackendError, match=r"(?s)'cpp' cannot serve.*at most 8 elements \(got 16\)"):
        call(toy_op, torch.ones(16), "cpp")
    with pytest.raises(BackendError, match=r"dtype float64 not supported \(supports float32\)"):
        call(toy_op, torch.ones(2, dtype=torch.float64), "cpp")
    with pytest.raises(BackendError, match=r"(?s)triton:.*device 'cpu' not supported"):
        call(toy_op, torch.ones(2), "triton")
    with pytest.raises(BackendError, match=r"has no cuda implementation"):
        call(toy_op, torch.ones(2), "cuda")


def test_precedence_call_then_context_then_env(toy_op, monkeypatch):
    monkeypatch.setenv("MTLFAST_BACKEND", "reference")
    assert current_backend() == "reference"
    assert call(toy_op, torch.ones(2)) == "reference"
    with use_backend("cpp"):
        assert call(toy_op, torch.ones(2)) == "cpp"
        with use_backend("reference"):
            assert call(toy_op, torch.ones(2)) == "reference"
        assert call(toy_op, torch.ones(2), backend="reference") == "reference"
        assert current_backend() == "cpp"
    assert current_backend() == "reference"
    monkeypatch.delenv("MTLFAST_BACKEND")
    assert current_backend() == "auto"


def test_torch_compile_traces_the_scope_and_recompiles_when_it_changes():
    """A function calling an op compiles into one graph (fullgraph: the backend scope is traceable, which a
    ContextVar is not), and Dynamo guards on the scope: a compiled call runs the backend in force at each call,
    use_backend, its per-op overrides and another thread's (unset) scope alike."""
    import threading

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    op = Op("_toy_scoped", auto_order={"cpu": ("cpp", "reference")})
    op.register("reference", lambda x: 2 * x, devices=("cpu",), dtypes=(torch.float32,))
    op.register("cpp", lambda x: 3 * x, devices=("cpu",), dtypes=(torch.float32,))  # tells the backends apart
    try:
        compiled = torch.compile(lambda x: op.select(None, x.device, x.dtype, (x,)).fn(x) + 1, backend="eager",
                                 fullgraph=True)
        one = torch.ones(2)
        assert compiled(one).tolist() == [4, 4]  # auto: cpp
        with use_backend("reference"):
            assert compiled(one).tolist() == [3, 3]
            with use_backend("reference", _toy_scoped="cpp"):
                assert compiled(one).tolist() == [4, 4]
            seen = []
            thread = threading.Thread(target=lambda: seen.append(compiled(one).tolist()))
            thread.start()
            thread.join()
            assert seen == [[4, 4]]  # the scope is this thread's
            assert compiled(one).tolist() == [3, 3]
        assert compiled(one).tolist() == [4, 4]
        assert counters["stats"]["unique_graphs"] == 3  # auto, reference, the override: after the block, auto's again
    finally:
        del OPS["_toy_scoped"]


def test_a_scope_opened_inside_a_compiled_function_compiles_and_ends_with_it():
    """use_backend and BackendScope.active inside a compiled function (a model whose forward scopes a block): one
    graph, the block's backend inside it, the caller's scope after it, also when the scope was never set (a fresh
    thread: leaving the block deletes the entries in eager code, which Dynamo cannot trace)."""
    import threading

    op = Op("_toy_inner_scope", auto_order={"cpu": ("cpp", "reference")})
    op.register("reference", lambda x: 2 * x, devices=("cpu",), dtypes=(torch.float32,))
    op.register("cpp", lambda x: 3 * x, devices=("cpu",), dtypes=(torch.float32,))
    run = lambda x: op.select(None, x.device, x.dtype, (x,)).fn(x)  # noqa: E731

    def forward(x):
        with use_backend("reference"):
            inner = run(x)
            with BackendScope.capture().active():
                captured = run(x)
        return inner + captured + run(x)  # reference, reference, then the caller's: auto (cpp)

    seen, failed = [], []

    def fresh_thread():
        try:
            torch._dynamo.reset()
            compiled = torch.compile(forward, backend="eager", fullgraph=True)
            seen.append((compiled(torch.ones(1)).item(), current_backend(), compiled(torch.ones(1)).item()))
            with use_backend("reference"):
                seen.append(compiled(torch.ones(1)).item())
        except Exception as exc:  # raised again in the test's thread
            failed.append(exc)

    try:
        thread = threading.Thread(target=fresh_thread)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        assert seen == [(7.0, "auto", 7.0), 6.0]
    finally:
        del OPS["_toy_inner_scope"]


def test_unknown_backend_names_are_rejected(toy_op, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call(toy_op, torch.ones(2), "fast")
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv("MTLFAST_BACKEND", "Triton")
    with pytest.raises(ValueError, match="MTLFAST_BACKEND: unknown backend 'Triton'"):
        current_backend()


def test_auto_with_no_candidate_lists_every_reason(toy_op):
    toy_op.auto_order["cpu"] = ("cpp",)
    with pytest.raises(BackendError, match=r"(?s)'auto' cannot serve.*cpp: at most 8 elements"):
        call(toy_op, torch.ones(9))


def test_duplicate_op_name_is_an_error(toy_op):
    with pytest.raises(ValueError, match="already registered"):
        Op("_toy_double")


def test_info_lists_each_op_with_its_choice(toy_op):
    from mtlfast.info import info_text

    text = info_text()
    assert "_toy_double" in text and "auto -> cpp" in text
    assert "triton: device 'cpu' not supported" in text


def test_import_mtlfast_is_light_and_complete():
    """``import mtlfast`` imports no torch (the edge metric's workers rely on it), yet every public name works
    at once in a fresh process: per-op backend overrides, the ops, and ``mtlfast info`` listing every op."""
    script = ("import sys, mtlfast\n"
              "assert 'torch' not in sys.modules\n"
              "with mtlfast.use_backend('reference', deform_sample='cpp'):\n"
              "    pass\n"
              "assert callable(mtlfast.ops.attention) and 'auto' in mtlfast.BACKENDS\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "mtlfast", "info"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("ops (", 1)[1].splitlines()[1:] if line.strip()}
    assert listed == {"attention", "tpp_attention", "lthd_attention", "iterative_fusion", "em_attention",
                      "deform_sample"}, result.stdout


def test_info_survives_a_bad_mtlfast_backend(toy_op, monkeypatch):
    """The diagnostic tool still prints its table and names the bad value."""
    from mtlfast.info import info_text

    monkeypatch.setenv("MTLFAST_BACKEND", "bogus")
    text = info_text()
    assert "MTLFAST_BACKEND=bogus" in text and "invalid (MTLFAST_BACKEND: unknown backend 'bogus'" in text
    assert "_toy_double" in text


def _op_calls(gen, dtype=torch.float32, device="cpu", first_dtype=None):
    """Each op on small random tensors of ``dtype`` on ``device``, the backend as argument (``first_dtype``:
    the first input in another dtype, as a Linear's output under autocast next to a float32 tensor)."""
    def r(*shape, first=False):
        return torch.randn(*shape, generator=gen).to(device, first_dtype if first and first_dtype else dtype)

    return {
        "attention": lambda b: mtlfast.ops.attention(r(1, 2, 9, 8, first=True), r(1, 2, 7, 8), r(1, 2, 7, 4),
                                                     backend=b),
        "tpp_attention": lambda b: mtlfast.ops.tpp_attention(r(1, 2, 1, 9, 8, first=True), r(1, 2, 1, 7, 8),
                                                             r(1, 2, 1, 7, 4), r(2, 1, 2), backend=b),
        "lthd_attention": lambda b: mtlfast.ops.lthd_attention(r(1, 16, 8, first=True), r(1, 16, 8), r(1, 4, 8),
                                                               r(1, 4, 8), r(1, 16, 4), (4, 4), (2, 2), backend=b),
        "iterative_fusion": lambda b: mtlfast.ops.iterative_fusion(r(1, 9, 8, first=True), r(1, 9, 8), r(1, 9, 4),
                                                                   torch.tensor(0.3, device=device), 3, backend=b),
        "em_attention": lambda b: mtlfast.ops.em_attention(r(1, 9, 8, first=True), r(1, 3, 8), 2, backend=b)[0],
        "deform_sample": lambda b: mtlfast.ops.deform_sample([r(1, 4, 3, 5, first=True)], r(1, 7, 2), r(1, 7, 1),
                                                             backend=b),
    }


# deform_sample ignores autocast (test below)
_AUTOCAST_OPS = [op for op in _op_calls(None) if op != "deform_sample"]


def test_deform_sample_ignores_autocast_on_every_backend(device):
    """Under torch.autocast deform_sample computes in its inputs' dtype on every backend: grid_sample, on
    autocast's float32 list, would make the reference alone return float32 from float16 inputs."""
    seed = fresh_seed()
    outs = {}
    for backend in ("reference", "triton"):
        with torch.autocast(device, dtype=torch.float16):
            gen = torch.Generator().manual_seed(seed)
            outs[backend] = _op_calls(gen, dtype=torch.float16, device=device)["deform_sample"](backend)
    assert {o.dtype for o in outs.values()} == {torch.float16}
    assert rel_error(outs["triton"], outs["reference"].double()) < 1e-2


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("op", _AUTOCAST_OPS)
def test_ops_follow_autocast_on_every_backend(op, mixed, device):
    """Under torch.autocast the ops cast their inputs to its dtype (as SDPA does): the reference (whose matmuls
    autocast by themselves) and the Triton kernels (custom ops, which autocast does not touch) return the same
    dtype from the same inputs, and mixed float16/float32 inputs are accepted there."""
    seed = fresh_seed()
    outs = {}
    for backend in ("reference", "triton"):
        with torch.autocast(device, dtype=torch.float16):
            gen = torch.Generator().manual_seed(seed)
            outs[backend] = _op_calls(gen, device=device, first_dtype=torch.float16 if mixed else None)[op](backend)
    assert {o.dtype for o in outs.values()} == {torch.float16}
    assert rel_error(outs["triton"], outs["reference"].double()) < 1e-2


@pytest.mark.parametrize("op", ["attention", "tpp_attention", "iterative_fusion", "em_attention",
                                "em_attention_detached", "deform_sample"])
def test_triton_double_backward_is_refused_clearly(op, device):
    """The kernel backwards have no derivative: a gradient of a gradient names the op and the way out."""
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(1, 9, 8, generator=gen).to(device).requires_grad_()
    calls = {
        "attention": lambda: mtlfast.ops.attention(x[None], x[None], x[None], backend="triton"),
        "tpp_attention": lambda: mtlfast.ops.tpp_attention(x[None, None], x[None, None], x[None, None],
                                                           torch.ones(1, 1, 1, device=device), backend="triton"),
        "iterative_fusion": lambda: mtlfast.ops.iterative_fusion(x, x, x, torch.tensor(0.3, device=device), 2,
                                                                 backend="triton"),
        "em_attention": lambda: mtlfast.ops.em_attention(x, x[:, :3], 2, backend="triton")[0],
        "em_attention_detached": lambda: mtlfast.ops.em_attention(x, x[:, :3].detach(), 2, detach_iterations=True,
                                                                  backend="triton")[0],
        "deform_sample": lambda: mtlfast.ops.deform_sample([x[None]], torch.tanh(x[:, :, :2]), x[:, :, 2:3],
                                                           backend="triton"),
    }
    (grad,) = torch.autograd.grad(calls[op]().square().sum(), x, create_graph=True)
    name = op.replace("_detached", "")
    with pytest.raises(NotImplementedError, match=rf"mtlfast.ops.{name}: double backward .* use backend='reference'"):
        grad.sum().backward()


@pytest.mark.parametrize("op", [op for op in _op_calls(None) if op != "deform_sample"])  # deform_sample: no dots
def test_tf32_dots_round_their_operands_and_meet_the_tf32_bound(op, device):
    """With torch's float32 matmul precision lowered the Triton kernels' float32 dots run in TF32 (dot_precision),
    their operands rounded to nearest (kernels.attention.dot): Triton's own TF32 truncates, and its error was over
    DESIGN.md §6's TF32 bound of 1e-3 (1.6e-3 simulated). The interpreter computes the rounded products, so the
    TF32 error shows on a CPU too: well above float32's, within the bound."""
    seed = fresh_seed()
    ref = _op_calls(torch.Generator().manual_seed(seed), torch.float64, device)[op]("reference")
    errors = {}
    was = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            errors[precision] = rel_error(_op_calls(torch.Generator().manual_seed(seed), device=device)[op]("triton"),
                                          ref)
    finally:
        torch.set_float32_matmul_precision(was)
    assert errors["high"] < 1e-3 and errors["high"] > 30 * errors["highest"], errors


@pytest.mark.parametrize("op", list(_op_calls(None)))
def test_triton_refuses_bfloat16_in_the_cpu_interpreter(op):
    """The interpreter computes bfloat16 wrongly (tpp_attention gave errors of 1e9 before this refusal), so
    the Triton backend of every op (mtlfast.backends.triton_unavailable) refuses bfloat16 CPU tensors and
    says why."""
    with pytest.raises(BackendError, match="interpreter"):
        _op_calls(None, torch.bfloat16)[op]("triton")


@pytest.mark.parametrize("op", list(_op_calls(None)))
def test_kernel_backends_refuse_torch_func_gradient_transforms(op, device):
    """Inside torch.func.grad or jvp (vjp, jacrev and jacfwd are built on them) a kernel backend refuses, naming
    the transform (PyTorch runs a custom op's derivative under torch.autograd only; without the refusal:
    "autograd.Function ... must override the setup_context staticmethod"), and the reference serves."""
    calls = _op_calls(torch.Generator().manual_seed(fresh_seed()), device=device)
    jvp = lambda f: lambda s: torch.func.jvp(f, (s,), (s,))[1]  # noqa: E731
    one = torch.tensor(1.0, device=device)
    for transform in (torch.func.grad, jvp):
        with pytest.raises(BackendError, match="torch.func gradient transform .* the reference backend supports"):
            transform(lambda s: (calls[op]("triton") * s).sum())(one)
        assert torch.isfinite(transform(lambda s: (calls[op]("reference") * s).sum())(one))


def test_kernel_backends_refuse_dual_tensors(device):
    """Forward-mode AD with torch.autograd.forward_ad's dual tensors: the kernels have none (PyTorch's error was
    "You must implement the jvp function"); a plain input inside dual_level still runs the kernel."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v, tangent = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64).to(device) for _ in range(4))
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, tangent)
        with pytest.raises(BackendError, match="an input is a dual tensor .* the reference backend has one"):
            mtlfast.ops.attention(dual, k, v, backend="triton")
        out = fwAD.unpack_dual(mtlfast.ops.attention(dual, k, v, backend="reference"))
        plain = mtlfast.ops.attention(q.float(), k.float(), v.float(), backend="triton")
    expected = torch.func.jvp(lambda x: mtlfast.ops.attention(x, k, v, backend="reference"), (q,), (tangent,))
    assert rel_error(out.primal, expected[0]) < 1e-12 and rel_error(out.tangent, expected[1]) < 1e-12
    assert rel_error(plain, expected[0]) < 1e-4


def test_torch_vmap_alone_runs_the_kernels(device):
    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v = (torch.randn(*shape, generator=gen).to(device) for shape in ((3, 1, 2, 9, 8), (1, 2, 7, 8), (1, 2, 7, 5)))
    out = torch.vmap(lambda x: mtlfast.ops.attention(x, k, v, backend="triton"))(q)
    ref = torch.stack([mtlfast.ops.attention(x.double(), k.double(), v.double(), backend="reference") for x in q])
    assert rel_error(out, ref) < 1e-5


def test_deform_sample_kernels_refuse_vmap_and_auto_takes_the_reference(device):
    """deform_sample's kernel ops take a list of tensors, for which PyTorch makes no vmap fallback ("Batching rule
    not implemented"): under torch.vmap its kernel backends refuse, naming it, and auto serves the reference."""
    gen = torch.Generator().manual_seed(fresh_seed())
    values = torch.randn(3, 1, 4, 5, 6, generator=gen).to(device)
    points = (torch.rand(3, 1, 7, 2, generator=gen) * 2.2 - 1.1).to(device)
    weights = torch.rand(3, 1, 7, 1, generator=gen).to(device)
    compiled = ("cpp" if device == "cpu" else "cuda",) if mtlfast._ext.status().loaded else ()
    for backend in ("triton", *compiled):  # the backends that serve this device
        with pytest.raises(BackendError, match=f"{backend}: .*torch.vmap is active, and PyTorch has no batching rule"):
            torch.vmap(lambda v, p, w: mtlfast.ops.deform_sample([v], p, w, backend=backend))(values, points, weights)
    out = torch.vmap(lambda v, p, w: mtlfast.ops.deform_sample([v], p, w))(values, points, weights)
    ref = torch.stack([mtlfast.ops.deform_sample([v], p, w, backend="reference")
                       for v, p, w in zip(values, points, weights)])
    assert rel_error(out, ref) < 1e-6


@pytest.mark.skipif(not mtlfast._ext.status().loaded, reason="compiled extension missing (deform_sample's cpp)")
def test_auto_takes_the_reference_inside_torch_func_grad():
    """deform_sample's auto backend on a CPU is the C++ kernel; inside torch.func.grad (and per-sample gradients,
    vmap of grad) it is the reference, with torch.autograd's gradients through the kernel."""
    gen = torch.Generator().manual_seed(fresh_seed())
    values = [torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64),
              torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64)]
    points = torch.rand(2, 7, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    weights = torch.rand(2, 7, 2, generator=gen, dtype=torch.float64)
    assert _OP_DEFORM.select(None, points.device, points.dtype, (values, points, weights)).backend == "cpp"

    def loss(p, w, vals=values):
        return mtlfast.ops.deform_sample(vals, p, w).square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(points, weights)
    p, w = points.clone().requires_grad_(), weights.clone().requires_grad_()
    expected = torch.autograd.grad(mtlfast.ops.deform_sample(values, p, w, backend="cpp").square().sum(), (p, w))
    for got, want in zip(grads, expected):
        assert rel_error(got, want) < 1e-12
    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(0, 0, 0))(points[:, None], weights[:, None],
                                                                         [v[:, None] for v in values])
    assert rel_error(per_sample[:, 0], expected[0]) < 1e-12


def test_meta_planning():
    """Under meta_planning, meta tensors select as on the planned device, with the declared devices, dtypes and
    limits of that device but the machine checks asked about "meta" (no GPU needed); the ops then run their
    fake implementations. Outside it, meta tensors are refused."""
    from mtlfast.backends import meta_planning
    from mtlfast.ops.attention import _OP as attention_op

    q = torch.empty(1, 2, 9, 16, device="meta")
    args, kwargs = (q, q, q), {"scale": 0.25}
    with pytest.raises(BackendError, match=r"no backend is declared for device type 'meta' \(to plan .*meta_planning"):
        attention_op.select(None, q.device, q.dtype, args, kwargs)
    with meta_planning("cuda"):
        assert attention_op.select(None, q.device, q.dtype, args, kwargs).backend == "triton"
        out = mtlfast.ops.attention(q, q, q)
        assert out.device.type == "meta" and out.shape == (1, 2, 9, 16)
        with pytest.raises(BackendError, match="dtype float64 not supported"):
            attention_op.select("triton", q.device, torch.float64, args, kwargs)
        assert attention_op.select(None, torch.device("cpu"), q.dtype, args, kwargs).backend == "reference"
    with pytest.raises(ValueError, match="meta_planning: device must be one of cuda, cpu"):
        with meta_planning("tpu"):
            pass


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.3.5", False), ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.2", True), ("3.7.0", "2.5.2", False)])
def test_triton_refuses_the_interpreter_with_numpy_2_4(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.6's interpreter raises a bare TypeError inside every kernel under numpy >= 2.4 (seen: 140 op tests
    failed with numpy 2.5.2), so the CPU Triton backend refuses up front and names the fix."""
    import numpy
    import triton

    from mtlfast.backends import triton_unavailable

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also where a GPU is present and the tests do not set it
    reason = triton_unavailable("cpu", torch.float32)
    if refused:
        assert f"numpy {numpy_version} is installed" in reason and "numpy<2.3" in reason
    else:
        assert reason is None
    assert triton_unavailable("meta", torch.float32) is None  # the GPU (and its planning) runs no interpreter


@pytest.mark.parametrize("archs, capability, runs", [
    ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False), ("8.0", (8, 6), True),
    ("8.6", (8, 0), False), ("8.0;9.0", (9, 0), True), ("8.0 8.6", (8, 9), True), ("9.0a", (9, 0), True),
    ("9.0a", (9, 1), False), ("8.0+PTX", (9, 0), True), ("9.0+PTX", (8, 0), False), ("9.0a+PTX", (10, 0), False),
    ("10.0f", (10, 3), True), ("10.0f+PTX", (12, 0), False), ("Hopper", (8, 0), True)])
def test_cuda_kernels_refuse_a_gpu_their_build_cannot_run(archs, capability, runs):
    """A cubin for sm_XY runs on X.Z with Z >= Y, PTX on any later device, arch-specific code (a) on X.Y only and
    family-specific code (f) within its family; named archs are not judged. A refusal names the build's archs,
    the device's capability and the rebuild."""
    from mtlfast.backends import cuda_arch_refusal

    reason = cuda_arch_refusal(f"openmp=yes(201511) threads=2 cuda=yes cudart=13000 archs={archs}", capability)
    if runs:
        assert reason is None
    else:
        cc = f"{capability[0]}.{capability[1]}"
        assert reason == (f"mtlfast._C's CUDA kernels were built for {archs} (TORCH_CUDA_ARCH_LIST), which this GPU "
                          f"of compute capability {cc} cannot run: rebuild with TORCH_CUDA_ARCH_LIST={cc}")
    assert cuda_arch_refusal("openmp=yes(201511) threads=2 cuda=no", capability) is None


def test_triton_refuses_gpus_below_compute_capability_8(monkeypatch):
    """Compiled for sm_75 the Triton kernels need up to 96 KB of shared memory per block, over the 64 KB there:
    GPUs below 8.0 are refused (auto then takes the CUDA kernel or the reference), 8.0 and later are not."""
    from mtlfast import backends
    from mtlfast.backends import triton_unavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_DEVICE_FACTS", {})
    for capability in ((7, 0), (7, 5), (8, 0), (8, 6), (9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        backends._DEVICE_FACTS.clear()  # answered once per process and device
        reason = triton_unavailable("cuda", torch.float16)
        if capability < (8, 0):
            assert reason == ("the Triton kernels need compute capability >= 8.0 (their tiles take up to 96 KB of "
                              "shared memory per block on sm_75, over its 64 KB); this GPU has "
                              f"{capability[0]}.{capability[1]}")
        else:
            assert reason is None


def test_auto_passes_over_cuda_kernels_built_for_another_gpu(monkeypatch):
    """An sm_90 build on an sm_80 GPU: deform_sample's cuda backend (auto's first on a GPU) refuses with the
    reason, so auto takes the next (Triton) instead of a launch failing with "no kernel image is available"."""
    from mtlfast import _ext, backends
    from mtlfast.ops.deform_sample import _OP

    built = _ext.ExtensionStatus(True, with_cuda=True, build_info="openmp=yes cuda=yes cudart=13000 archs=9.0")
    monkeypatch.setattr(_ext, "status", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_DEVICE_FACTS", {})
    for capability, refused in (((8, 0), True), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        backends._DEVICE_FACTS.clear()  # answered once per process and device
        reasons = _OP.support_table("cuda", torch.float32)["cuda"]
        assert reasons == (["mtlfast._C's CUDA kernels were built for 9.0 (TORCH_CUDA_ARCH_LIST), which this GPU of "
                            "compute capability 8.0 cannot run: rebuild with TORCH_CUDA_ARCH_LIST=8.0"]
                           if refused else []), reasons


def test_triton_limits_refuse_a_batch_beyond_the_grid():
    """The Triton kernels that put the batch on CUDA grid axis 1 or 2 (at most 65535 programs) refuse larger
    batches with that reason (the launch would fail), and deform_sample's B·N·S weight offsets are 32-bit."""
    from mtlfast.backends import OPS

    def meta(*shape):
        return torch.empty(shape, device="meta")

    calls = {  # op -> (batch size -> limits arguments), keyword arguments
        "tpp_attention": (lambda B: (meta(B, 2, 1, 3, 8),) * 3 + (meta(2, 1, 2), None), {"scale": 0.5}),
        "em_attention": (lambda B: (meta(B, 9, 8), meta(B, 3, 8), 2),
                         {"tau": 1.0, "eps": 1e-6, "detach_iterations": False}),
        "iterative_fusion": (lambda B: (meta(B, 9, 8),) * 3 + (meta(), 2),
                             {"scale": 0.5, "variant": "C", "mode": "recompute"}),
        "deform_sample": (lambda B: ([meta(B, 4, 3, 3)], meta(B, 5, 2), meta(B, 5, 1)), {}),
    }
    for name, (args, kwargs) in calls.items():
        limits = OPS[name].implementations["triton"].limits
        reasons = limits(*args(70000), **kwargs)
        assert any("B = 70000 exceeds the CUDA grid limit of 65535" in r for r in reasons), (name, reasons)
        assert limits(*args(65535), **kwargs) == [], name
    reasons = OPS["deform_sample"].implementations["triton"].limits([meta(1, 1, 1, 1)] * 64, meta(1, 2**26, 2),
                                                                    meta(1, 2**26, 64))
    assert any(r.startswith("B·N·S = 4294967296") for r in reasons), reasons


def test_triton_limits_refuse_32_bit_offsets_within_a_batch():
    """tpp_attention and em_attention offset each batch element in 64 bits and within it in 32: inputs whose one
    batch slice spans more than 2**31 elements are refused, naming the tensor; at 2**31 they are taken."""
    from mtlfast.backends import OPS

    def meta(*shape):
        return torch.empty(shape, device="meta")

    tpp = OPS["tpp_attention"].implementations["triton"].limits
    em = OPS["em_attention"].implementations["triton"].limits
    w = meta(2, 2, 4)
    q_ok, q_big = meta(1, 2, 2, 2**23, 64), meta(1, 2, 2, 2**23 + 1, 64)  # T·H·N·D = 2**31 and 2**31 + 256
    small = meta(1, 2, 2, 16, 64)
    assert tpp(q_ok, small, small, w, None) == []
    assert [r.split(":")[0] for r in tpp(q_big, small, small, w, None)] == ["q", "out", "dq"]
    assert [r.split(":")[0] for r in tpp(small, q_big, q_big, w, None)] == ["k", "v", "dk", "dv"]
    assert "one batch slice spans 2147483904 elements; in-slice offsets are 32-bit" in tpp(q_big, small, small, w,
                                                                                         None)[0]
    kw = {"tau": 1.0, "eps": 1e-6, "detach_iterations": False}
    assert em(meta(1, 2**22, 512), meta(1, 64, 512), 3, **kw) == []
    assert [r.split(":")[0] for r in em(meta(1, 2**22 + 1, 512), meta(1, 64, 512), 3, **kw)] == ["x"]
