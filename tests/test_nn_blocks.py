"""mtlfast.nn blocks: kernel path vs reference path (forward and every parameter/input gradient), the
papers' equations written out literally in float64 against the blocks, and configuration errors."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

import mtlfast
import mtlfast.nn as blocks
from mtlfast.nn import (BridgeFeatureExtractor, CrossTaskInteractionBlock, EMInteraction, FeatureAggregation,
                        FeaturePropagation, HierarchyAdaptiveAttention, IterativeFusionBlock, LowToHighDiffusion,
                        MultiModalDistillation, ScaleAttentiveFeatureFusion, SelfFeatureDistillation,
                        TaskFeatureRefiner, TaskPairInteraction, TaskPatternPropagation)
from mtlfast.nn.common import DropPath, ProjectedAttention, checkpoint_stage, pool_to_grid, to_map, to_tokens
from mtlfast.nn.sem import reference_points
from mtlfast.testing import fresh_seed
from literal import batch_norm, conv_bn, randn, random_norms
from nn_paths import compare_paths

TASKS = ("semseg", "depth", "edge")


class _Tasks(torch.nn.Module):
    """module({task: map}) called with the tasks as keyword inputs."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **features):
        return self.module(features)


class _Stages(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **stages):
        return self.module([stages[k] for k in sorted(stages)])


class _BridgeScale(torch.nn.Module):
    """One BridgeNet scale: bridge = BFE(generic, tasks); refined tasks = TFR(tasks, bridge)."""

    def __init__(self):
        super().__init__()
        self.bfe = BridgeFeatureExtractor(8, 12, kv_stride=4)
        self.to_task = torch.nn.Conv2d(8, 12, 1)
        self.tfr = TaskFeatureRefiner(TASKS, 12, layers=1)

    def forward(self, generic, **tasks):
        bridge = self.bfe(generic, tasks)
        return bridge, self.tfr(tasks, self.to_task(bridge))


class _TifDecoder(torch.nn.Module):
    """TIF's task decoder wiring: SFD on scales 2 and 3, LTHD on scales 0 and 1 from their maps."""

    def __init__(self, dim=8):
        super().__init__()
        self.sfd = torch.nn.ModuleList(SelfFeatureDistillation(dim) for _ in range(2))
        self.lthd = torch.nn.ModuleList(LowToHighDiffusion(dim) for _ in range(2))

    def forward(self, x0, x1, x2, x3):
        rx2, q2, k2 = self.sfd[0](x2)
        rx3, q3, k3 = self.sfd[1](x3)
        fine, coarse = (q2, k2, x2.shape[-2:]), (q3, k3, x3.shape[-2:])
        return self.lthd[0](x0, fine, coarse), self.lthd[1](x1, fine, coarse), rx2, rx3


def _case(name, gen):
    """(module, inputs) of each block case; sizes odd and small for the interpreter."""
    if name == "TaskPatternPropagation":
        return _Tasks(TaskPatternPropagation(TASKS, 12, 8, heads=2)), {t: randn(2, 12, 7, 9, gen=gen) for t in TASKS}
    if name == "BridgeFeatureExtractor+TaskFeatureRefiner":
        inputs = {t: randn(2, 12, 9, 7, gen=gen) for t in TASKS}
        return _BridgeScale(), {"generic": randn(2, 8, 9, 7, gen=gen), **inputs}
    if name == "CrossTaskInteractionBlock":
        block = CrossTaskInteractionBlock(8, 4, downscale=1, n_iter=4, variant="B")
        return block, {"source": randn(2, 8, 5, 6, gen=gen), "target": randn(2, 8, 5, 6, gen=gen)}
    if name == "TaskPairInteraction":
        return (_Tasks(TaskPairInteraction(TASKS, 8, 4, downscale=2, n_iter=4, variant="C")),
                {t: randn(2, 8, 7, 9, gen=gen) for t in TASKS})
    if name == "SelfFeatureDistillation+LowToHighDiffusion":
        sizes = [(11, 13), (6, 7), (3, 4), (2, 2)]
        return _TifDecoder(), {f"x{i}": randn(2, 8, h, w, gen=gen) for i, (h, w) in enumerate(sizes)}
    if name == "HierarchyAdaptiveAttention":
        sizes, channels = [(15, 13), (8, 7), (4, 4), (2, 2)], [6, 8, 10, 12]
        return (_Stages(HierarchyAdaptiveAttention(channels, 16, heads=2)),
                {f"f{i}": randn(2, c, h, w, gen=gen) for i, ((h, w), c) in enumerate(zip(sizes, channels))})
    if name.startswith("EMInteraction"):
        block = EMInteraction(TASKS, 16, num_bases=8, n_iter=3, detach_iterations=name.endswith("detached"))
        return _Tasks(block), {t: randn(2, 16, 5, 7, gen=gen) for t in TASKS}
    raise KeyError(name)


CASES = ["TaskPatternPropagation", "BridgeFeatureExtractor+TaskFeatureRefiner", "CrossTaskInteractionBlock",
         "TaskPairInteraction", "SelfFeatureDistillation+LowToHighDiffusion", "HierarchyAdaptiveAttention",
         "EMInteraction-detached", "EMInteraction-unrolled"]


@pytest.mark.parametrize("name", CASES)
def test_kernel_path_matches_reference_path(name):
    torch.manual_seed(fresh_seed())  # fresh weights and inputs (DESIGN §6)
    module, inputs = _case(name, torch.Generator().manual_seed(fresh_seed()))
    errors = compare_paths(module, inputs, device="cuda" if torch.cuda.is_available() else "cpu")
    assert len(errors) > len(inputs)  # outputs and gradients were compared


# --- the papers' equations, written out -----------------------------------------------------------------

def test_multimodal_distillation_is_eq1():
    gen = torch.Generator().manual_seed(2)
    block = MultiModalDistillation(["semseg", "depth"], 6, source_tasks=["semseg", "depth", "edge"]).double()
    x = {t: randn(2, 6, 5, 7, gen=gen) for t in ("semseg", "depth", "edge")}
    out = block(x)
    for k in ("semseg", "depth"):
        want = x[k].clone()
        for l in ("semseg", "depth", "edge"):
            if l != k:
                a = block.attention[k][l]
                want = want + torch.sigmoid(F.conv2d(x[l], a.mask.weight, padding=1)) * F.conv2d(x[l], a.value.weight, padding=1)
        torch.testing.assert_close(out[k], want, rtol=1e-12, atol=1e-12)
    assert set(out) == {"semseg", "depth"}


def test_feature_aggregation_is_the_hrnet_head():
    """MTI-Net §2.5: every scale resized (bilinear) to the finest, concatenated, 1×1 conv + BN + ReLU, 1×1 conv."""
    gen = torch.Generator().manual_seed(fresh_seed())
    feats = [randn(2, c, 17 // 2 ** i, 21 // 2 ** i, gen=gen) for i, c in enumerate((3, 5, 7, 9))]
    block = random_norms(FeatureAggregation([3, 5, 7, 9], 4, mid_channels=6).double(), gen)
    x = torch.cat([feats[0]] + [F.interpolate(f, size=(17, 21), mode="bilinear", align_corners=False)
                                for f in feats[1:]], 1)
    conv, bn, predict = block.fuse[0], block.fuse[1], block.predict
    hidden = F.relu(batch_norm(bn, F.conv2d(x, conv.weight, conv.bias)))
    torch.testing.assert_close(block(feats), F.conv2d(hidden, predict.weight, predict.bias), rtol=1e-10, atol=1e-10)


def test_feature_propagation_gates_over_tasks():
    gen = torch.Generator().manual_seed(3)
    block = FeaturePropagation(TASKS, 8).double().eval()
    x = {t: randn(2, 8, 5, 6, gen=gen) for t in TASKS}
    out = block(x)
    concat = torch.cat([x[t] for t in TASKS], 1)
    logits = block.harmonize(concat)
    chunks = logits.split(8, dim=1)  # task-major, as concatenated
    gates = torch.softmax(torch.stack(chunks), dim=0)
    shared = block.reduce(torch.cat([g * x[t] for g, t in zip(gates, TASKS)], 1))
    for t in TASKS:
        torch.testing.assert_close(out[t], block.se[t](shared) + x[t], rtol=1e-12, atol=1e-12)


def test_task_pair_interaction_batching_equals_each_pair_eq5():
    """f°_t = f_t + Σ_{s≠t} CIB_{s→t}(f_s, f_t) with every pair computed on its own (eq. 2–5)."""
    gen = torch.Generator().manual_seed(4)
    block = TaskPairInteraction(TASKS, 8, 4, downscale=2, n_iter=3, variant="C", alpha=0.3).double().eval()
    x = {t: randn(2, 8, 7, 9, gen=gen) for t in TASKS}
    with mtlfast.use_backend("reference"):
        out = block(x)

    def each_pair(block, alpha):
        for t in TASKS:
            want = x[t].clone()
            for s in TASKS:
                if s == t:
                    continue
                cib = block.cib[f"{s}_to_{t}"]
                q, k, v, self_term, grid = cib.prepare(x[s], x[t])
                co = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1)  # eq. 2, softmax over sources
                for _ in range(3):
                    v = alpha(s, t) * (co @ v) + (1 - alpha(s, t)) * v  # IFB C, eq. 8
                want = want + self_term + F.interpolate(to_map(v, grid), size=(7, 9), mode="bilinear",
                                                        align_corners=False)
            yield t, want

    for t, want in each_pair(block, lambda s, t: block.fusion.alpha):
        torch.testing.assert_close(out[t], want, rtol=1e-10, atol=1e-10)
    # shared_alpha=False: each pair its own α (and its own call), with its own gradient
    own = TaskPairInteraction(TASKS, 8, 4, downscale=2, n_iter=3, variant="C", shared_alpha=False).double().eval()
    own.load_state_dict(block.state_dict(), strict=False)
    assert own.fusion is None and all(cib.fusion.alpha == block.fusion.alpha for cib in own.cib.values())
    with torch.no_grad():
        for i, cib in enumerate(own.cib.values()):
            cib.fusion.alpha.fill_(0.1 + 0.1 * i)
    with mtlfast.use_backend("reference"):
        out_own = own(x)
    for t, want in each_pair(own, lambda s, t: own.cib[f"{s}_to_{t}"].fusion.alpha):
        torch.testing.assert_close(out_own[t], want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(sum(o.sum() for o in out_own.values()), [c.fusion.alpha for c in own.cib.values()])
    assert len({g.item() for g in grads}) == len(grads) and all(g != 0 for g in grads)
    # targets: auxiliary tasks are sources only; the kept pairs and outputs are those of the full module
    first = TaskPairInteraction(TASKS, 8, 4, downscale=2, n_iter=3, variant="C", targets=TASKS[:1]).double().eval()
    assert first.pairs == [(s, TASKS[0]) for s in TASKS[1:]]
    missing, _ = first.load_state_dict(block.state_dict(), strict=False)
    assert not missing
    with mtlfast.use_backend("reference"):
        assert list(first(x)) == [TASKS[0]]
        torch.testing.assert_close(first(x)[TASKS[0]], out[TASKS[0]], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"targets: \['sal'\] are not among tasks"):
        TaskPairInteraction(TASKS, 8, 4, targets=["sal"])


@pytest.mark.parametrize("detach_iterations", [False, True])
def test_em_interaction_is_eq8_to_10(detach_iterations):
    """The default is SEM's X̃_t = A_t⁽ᴿ⁾ μ̄⁽ᴿ⁾ ("the final μ⁽ᴿ⁾ and A⁽ᴿ⁾ are used to reconstruct X̃"), μ̄⁽ᴿ⁾ the mean
    of the task bases (eq. 10), with the gradient through all R iterations; detach_iterations=True runs the
    iterations without gradient and reconstructs from one more E-step, A_t⁽ᴿ⁺¹⁾ = softmax(X_t (μᵗ)⁽ᴿ⁾ᵀ), with
    the gradient through it alone. Outputs and the input convs' gradients against the equations written out;
    μ⁽⁰⁾'s EMA in training only."""
    gen = torch.Generator().manual_seed(5)
    options = {"detach_iterations": True} if detach_iterations else {}  # the default: False
    block = EMInteraction(TASKS, 6, num_bases=4, n_iter=3, momentum=0.9, **options).double()
    x = {t: randn(2, 6, 3, 5, gen=gen) for t in TASKS}
    mu0 = block.bases.mu.clone()
    with mtlfast.use_backend("reference"):
        out = block(x)
    mus, zs = [], []
    for t in TASKS:  # each task alone from the shared μ⁽⁰⁾ (eq. 8–9)
        xt = to_tokens(block.inp[t](x[t]))
        mu = mu0.expand(2, -1, -1)
        with torch.set_grad_enabled(not detach_iterations):
            for _ in range(3):
                z = torch.softmax(xt @ mu.transpose(1, 2), dim=-1)
                m = (z / (1e-6 + z.sum(1, keepdim=True))).transpose(1, 2) @ xt
                mu = m / (1e-6 + m.norm(dim=-1, keepdim=True))
        z_next = torch.softmax(xt @ mu.transpose(1, 2), dim=-1)  # A⁽ᴿ⁺¹⁾
        assert not torch.allclose(z_next, z, rtol=0, atol=1e-6)  # so the two forwards differ here
        mus.append(mu)
        zs.append(z_next if detach_iterations else z)
    mu_bar = sum(mus) / len(TASKS)  # eq. 10
    want = {t: F.relu(x[t] + block.out[t](F.relu(to_map(z @ mu_bar, (3, 5))))) for t, z in zip(TASKS, zs)}
    for t in TASKS:
        torch.testing.assert_close(out[t], want[t], rtol=1e-10, atol=1e-10)
    inputs = [block.inp[t].weight for t in TASKS]
    grads = [torch.autograd.grad(sum((o * o.detach().flip(-1)).sum() for o in outputs.values()), inputs)
             for outputs in (out, want)]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    mean = mu_bar.detach().mean(0)
    torch.testing.assert_close(block.bases.mu, 0.9 * mu0 + 0.1 * mean)
    block.eval()
    before = block.bases.mu.clone()
    with mtlfast.use_backend("reference"):
        block(x)
    assert torch.equal(block.bases.mu, before)  # μ⁽⁰⁾ is constant at inference


def _em_step(block, x, run, backwards=1):
    """One training forward of ``run(block, x)`` and ``backwards`` backward passes (graph retained)."""
    with mtlfast.use_backend("reference"):
        out = run(block, x)
    loss = sum((o * o.detach().flip(-1)).sum() for o in out.values())
    for i in range(backwards):
        loss.backward(retain_graph=i + 1 < backwards)
    return out


@pytest.mark.parametrize("detach_iterations", [True, False])
def test_checkpoint_stage_updates_buffers_once(detach_iterations):
    """EMInteraction (EM bases EMA + BatchNorm) under checkpoint_stage: outputs, every parameter gradient
    and every buffer (μ⁽⁰⁾, BN running statistics, num_batches_tracked) equal those of the plain block, also
    after a second backward through the retained graph (a second recomputation). Plain torch checkpointing,
    the control, updates them twice and recomputes from the updated μ⁽⁰⁾, so its gradients differ."""
    import copy

    gen = torch.Generator().manual_seed(11)
    block = EMInteraction(TASKS, 6, num_bases=4, n_iter=3, momentum=0.9,
                          detach_iterations=detach_iterations).double().train()
    x = {t: randn(2, 6, 3, 5, gen=gen) for t in TASKS}
    runs = {"plain": lambda b, v: b(v), "checkpoint_stage": lambda b, v: checkpoint_stage(b, v),
            "torch_checkpoint": lambda b, v: torch.utils.checkpoint.checkpoint(b, v, use_reentrant=False)}
    results = {}
    for name, run in runs.items():
        for backwards in (1, 2):
            copy_ = copy.deepcopy(block)
            out = _em_step(copy_, x, run, backwards)
            results[name, backwards] = (out, copy_)
    for backwards in (1, 2):
        (out, plain), (out_ck, ck) = results["plain", backwards], results["checkpoint_stage", backwards]
        for t in TASKS:
            torch.testing.assert_close(out_ck[t], out[t], rtol=1e-12, atol=1e-12)
        for (name, p), q in zip(plain.named_parameters(), ck.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
        for (name, b), c in zip(plain.named_buffers(), ck.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)
    plain, control = results["plain", 1][1], results["torch_checkpoint", 1][1]
    assert not torch.allclose(control.bases.mu, plain.bases.mu)  # the EMA ran twice
    assert control.out[TASKS[0]][1].num_batches_tracked.item() == 2
    assert not torch.allclose(control.inp[TASKS[0]].weight.grad, plain.inp[TASKS[0]].weight.grad)
    assert not torch.equal(plain.bases.mu, block.bases.mu)  # one update happened


@pytest.mark.parametrize("where", ["after the block", "on another thread"])
def test_checkpoint_stage_recomputes_on_the_forwards_backends(where, device):
    """The forward runs attention on the Triton backend (use_backend); the backward, run after the block or on
    another thread (as autograd's device threads on a GPU), where the scope (per thread) is not set, must
    recompute on Triton too: auto on a CPU would pick the reference, which saves other tensors
    (torch.utils.checkpoint then fails) or, worse, computes differently."""
    import threading

    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v = (randn(1, 2, 9, 16, gen=gen).float().to(device).requires_grad_() for _ in range(3))
    with mtlfast.use_backend("triton"):
        out = checkpoint_stage(lambda a, b, c: mtlfast.ops.attention(a, b, c).sin(), q, k, v)
        grads = []
        backward = lambda: grads.extend(torch.autograd.grad(out.sum(), (q, k, v)))  # noqa: E731
        if where == "on another thread":
            thread = threading.Thread(target=backward)
            thread.start()
            thread.join()
    if where == "after the block":
        backward()
    want = torch.autograd.grad(torch.sin(mtlfast.ops.attention(q, k, v, backend="triton")).sum(), (q, k, v))
    assert len(grads) == 3
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _upsample_scores(a, coarse, fine):
    """Bilinear resize of a (B, hc·wc, hc·wc) score map along the key grid, then the query grid."""
    b = a.shape[0]
    keys = F.interpolate(a.reshape(b * a.shape[1], 1, *coarse), size=fine, mode="bilinear", align_corners=False)
    keys = keys.reshape(b, a.shape[1], -1).transpose(1, 2)  # (B, Nf keys, Nc queries)
    queries = F.interpolate(keys.reshape(-1, 1, *coarse), size=fine, mode="bilinear", align_corners=False)
    return queries.reshape(b, -1, fine[0] * fine[1]).transpose(1, 2)  # (B, Nf queries, Nf keys)


def test_low_to_high_diffusion_is_eq11_12():
    """A⁰ = up(A³) + A² from the SFD maps of scales 2 and 3, formed explicitly."""
    gen = torch.Generator().manual_seed(6)
    dec = _TifDecoder(dim=8).double().eval()
    x0, x2, x3 = randn(2, 8, 9, 11, gen=gen), randn(2, 8, 3, 4, gen=gen), randn(2, 8, 2, 2, gen=gen)
    with mtlfast.use_backend("reference"):
        _, q2, k2 = dec.sfd[0](x2)
        _, q3, k3 = dec.sfd[1](x3)
        out = dec.lthd[0](x0, (q2, k2, (3, 4)), (q3, k3, (2, 2)))
    s = 8 ** -0.5
    a0 = s * q2 @ k2.transpose(1, 2) + _upsample_scores(s * q3 @ k3.transpose(1, 2), (2, 2), (3, 4))
    lthd = dec.lthd[0]
    v = lthd.value(to_tokens(F.adaptive_avg_pool2d(x0, (3, 4))))
    rx = F.interpolate(to_map(lthd.ffn(torch.softmax(a0, -1) @ v), (3, 4)), size=(9, 11), mode="bilinear",
                       align_corners=False)
    torch.testing.assert_close(out, lthd.fuse(torch.cat([rx, x0], 1)), rtol=1e-10, atol=1e-10)


def test_self_feature_distillation_is_eq6_10():
    gen = torch.Generator().manual_seed(7)
    sfd = SelfFeatureDistillation(8).double()
    x = randn(2, 8, 3, 5, gen=gen)
    with mtlfast.use_backend("reference"):
        out, q, k = sfd(x)
    tokens = sfd.norm(to_tokens(x))
    kv = sfd.kv(tokens)  # K = V
    rx = torch.softmax(sfd.q(tokens) @ kv.transpose(1, 2) * 8 ** -0.5, -1) @ kv + to_tokens(x)  # eq. 9
    torch.testing.assert_close(out, to_map(sfd.ffn(rx), (3, 5)), rtol=1e-10, atol=1e-10)  # eq. 10
    torch.testing.assert_close(k, kv)


def test_hierarchy_adaptive_attention_is_eq1_to_4():
    """The block against eq. 1–4 written out with grid_sample: DAT points (cell centres of the stride-r grid +
    tanh offsets of at most offset_range / 2 cells), stage weights softmax_S(θ_HW(φ(Q; p))), keys/values from
    Σ_s W_s φ(F_s; p); the unify/offset/query convolutions and the projected attention (tested above) are the
    block's own modules."""
    gen = torch.Generator().manual_seed(fresh_seed())
    block = HierarchyAdaptiveAttention([4, 5, 6, 7], 8, heads=2, offset_range=2.0).double().eval()
    stages = [randn(2, c, 17 // 2 ** i, 23 // 2 ** i, gen=gen) * 10 for i, c in enumerate([4, 5, 6, 7])]
    with mtlfast.use_backend("reference"):
        out = block(stages)

    def phi(feature, points):  # bilinear sampling at normalised (x, y): (B, C, N)
        return F.grid_sample(feature, points[:, :, None], mode="bilinear", padding_mode="zeros",
                             align_corners=False)[..., 0]

    unified = [u(s) for u, s in zip(block.unify, stages)]
    points = []
    for net, s in zip(block.offsets, unified):  # eq. 1
        raw = net.net(s)
        gh, gw = raw.shape[-2:]
        ys, xs = torch.meshgrid((torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1,
                                (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1, indexing="ij")
        ref = torch.stack([xs, ys], -1).reshape(1, gh * gw, 2)
        offsets = torch.stack([torch.tanh(raw[:, 0]) * 2.0 / gw, torch.tanh(raw[:, 1]) * 2.0 / gh], -1).flatten(1, 2)
        assert offsets.abs().max() > 0.1 / max(gh, gw)  # the offsets move the points
        points.append(ref + offsets)
    points = torch.cat(points, 1)
    size = unified[-1].shape[-2:]
    qmap = block.query(torch.cat([F.interpolate(u, size=size, mode="bilinear", align_corners=False)
                                  for u in unified], 1))
    weights = torch.softmax(block.stage_weights(phi(qmap, points).transpose(1, 2)), -1)  # eq. 3, (B, N, S)
    sampled = sum(weights[..., s, None] * phi(u, points).transpose(1, 2) for s, u in enumerate(unified))  # eq. 4
    tokens = qmap.flatten(2).transpose(1, 2)
    want = block.ffn(tokens + block.attn(block.q_norm(tokens), sampled)).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    ref = reference_points((2, 3), 1, dtype=torch.float64)[0]
    torch.testing.assert_close(ref[1], torch.tensor([0.0, -0.5], dtype=torch.float64))  # cell centre (x, y)


def test_hierarchy_adaptive_attention_samples_at_float32_points_in_16_bit(monkeypatch):
    """Under a 16-bit autocast and in a bfloat16 module the deformable points and the stage weights stay float32 (a
    bfloat16 coordinate would move by up to 0.11 pixels of a 112-pixel-wide stage, _OffsetNet): the points carry
    the bfloat16 convolutions' error in the offsets only, not bfloat16's rounding of the coordinates. The feature
    maps are sampled in their bfloat16 (deform_sample's mixed precision: no float32 copies of them); the block
    returns its features' dtype."""
    import mtlfast.nn.sem as sem

    seen = []
    sample = sem.deform_sample

    def recording(values, points, weights):
        seen.append((tuple(v.dtype for v in values), points.dtype, weights.dtype, points.detach()))
        return sample(values, points, weights)

    monkeypatch.setattr(sem, "deform_sample", recording)
    gen = torch.Generator().manual_seed(fresh_seed())
    block = HierarchyAdaptiveAttention([4, 5], 8, heads=2).eval()
    stages = [randn(1, 4, 112, 112, gen=gen).float(), randn(1, 5, 56, 56, gen=gen).float()]
    with mtlfast.use_backend("reference"):
        double = copy.deepcopy(block).double()
        exact = double.offsets[0](double.unify[0](stages[0].double()))
    with mtlfast.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(stages).dtype == torch.bfloat16
    with mtlfast.use_backend("reference"):
        assert block.to(torch.bfloat16)([s.bfloat16() for s in stages]).dtype == torch.bfloat16
    f32, bf16 = torch.float32, torch.bfloat16
    assert [call[:3] for call in seen] == [((bf16,), f32, f32), ((bf16, bf16), f32, f32)] * 2, [c[:3] for c in seen]
    # the offsets come from bfloat16 convolutions (up to 5.4e-4 off over 13 draws), the cell centres are exact; with
    # the points rounded to bfloat16 (up to 2^-9 near 1) they were 5.4e-3 off
    assert (seen[0][3][:, :exact.shape[1]] - exact).abs().max() < 2 ** -9


@pytest.mark.parametrize("scale", [None, 0.3])
def test_projected_attention_is_the_literal_formula(scale):
    """Per head h: softmax(scale · Q_h K_hᵀ) V_h with Q = x W_q + b_q, K = LN(t) W_k, V = LN(t) W_v + b_v,
    heads concatenated, then W_o; scale=None is the head width^-0.5."""
    gen = torch.Generator().manual_seed(10)
    block = ProjectedAttention(8, 12, heads=2, scale=scale).double()
    queries, tokens = randn(2, 5, 8, gen=gen), randn(2, 7, 12, gen=gen)
    with mtlfast.use_backend("reference"):
        out = block(queries, tokens)
    assert out.shape == (2, 5, 8) and block.k.bias is None
    kv = F.layer_norm(tokens, (12,), block.kv_norm.weight, block.kv_norm.bias)
    q, k, v = queries @ block.q.weight.T + block.q.bias, kv @ block.k.weight.T, kv @ block.v.weight.T + block.v.bias
    s = scale if scale is not None else 4 ** -0.5
    heads = [torch.softmax(s * q[..., h] @ k[..., h].transpose(1, 2), -1) @ v[..., h]
             for h in (slice(0, 4), slice(4, 8))]
    want = torch.cat(heads, -1) @ block.proj.weight.T + block.proj.bias
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("queries, tokens, match", [
    ((2, 5, 6), (2, 7, 12), "queries: expected shape (B, Nq, dim) with dim=8 (from the module), got (2, 5, 6)"),
    ((2, 5, 8), (2, 7, 8), "kv_tokens: expected shape (B, Nk, kv_dim) with kv_dim=12 (from the module)"),
    ((2, 5, 8), (3, 7, 12), "kv_tokens: expected shape (B, Nk, kv_dim) with B=2 (from queries), got (3, 7, 12)"),
    ((5, 8), (2, 7, 12), "queries: expected a 3-d tensor of shape (B, Nq, dim), got shape (5, 8)"),
])
def test_projected_attention_bad_sizes(queries, tokens, match):
    block = ProjectedAttention(8, 12, heads=2)
    with pytest.raises(ValueError, match=re.escape(match)):
        block(torch.randn(queries), torch.randn(tokens))


def test_drop_path():
    """Stochastic depth: per sample the branch is zeroed or scaled by 1/(1-p); identity in eval and at p = 0."""
    torch.manual_seed(fresh_seed())
    x = torch.randn(4000, 3, 2, 2) + 3.0
    drop = DropPath(0.25).train()
    y = drop(x)
    kept = (y != 0).flatten(1).all(1)
    assert torch.equal((y == 0).flatten(1).all(1), ~kept)  # whole samples, never parts of one
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(kept.double().mean().item() - 0.75) < 6 * (0.25 * 0.75 / 4000) ** 0.5
    assert torch.equal(drop.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"drop_path: expected a probability in \[0, 1\), got {p}"):
            DropPath(p)


def test_tfr_drop_path_rises_linearly_and_is_off_in_eval():
    """The official TFR stages: drop-path rates from 0 at the first block to ``drop_path`` at the last; eval is
    unaffected (same output as without stochastic depth)."""
    tfr = TaskFeatureRefiner(TASKS, 8, layers=2, drop_path=0.15)
    assert [b.drop_path.p for b in tfr.refiners["depth"]] == pytest.approx([0.0, 0.03, 0.06, 0.09, 0.12, 0.15])
    plain = TaskFeatureRefiner(TASKS, 8, layers=2)
    plain.load_state_dict(tfr.state_dict())
    gen = torch.Generator().manual_seed(fresh_seed())
    feats = {t: torch.randn(2, 8, 5, 6, generator=gen) for t in TASKS}
    bridge = torch.randn(2, 8, 3, 3, generator=gen)
    with torch.no_grad():
        out, want = tfr.eval()(feats, bridge), plain.eval()(feats, bridge)
    for t in TASKS:
        torch.testing.assert_close(out[t], want[t], rtol=0, atol=0)


def test_tfr_sizes_and_ifb_alpha():
    assert [len(TaskFeatureRefiner(["semseg"], 8, size).refiners["semseg"]) for size in ("base", "large", "huge")] \
        == [6, 12, 18]
    assert len(TaskFeatureRefiner(["semseg"], 8, 3).refiners["semseg"]) == 9
    ifb = IterativeFusionBlock(18, "C")
    assert [n for n, _ in ifb.named_parameters()] == ["alpha"] and ifb.alpha.item() == pytest.approx(0.3)
    assert list(IterativeFusionBlock(4, "A").parameters()) == []


def _pool_cells(x, s):
    """Average of every s×s cell (row-major), a cell cut by the border averaging its valid positions -> tokens."""
    h, w = x.shape[-2:]
    cells = [x[..., i:i + s, j:j + s].mean((-2, -1)) for i in range(0, h, s) for j in range(0, w, s)]
    return torch.stack(cells, 1)


@pytest.mark.parametrize("size, factor", [((8, 6), 2), ((7, 5), 2), ((7, 9), 4), ((6, 6), 4), ((3, 4), 1)])
def test_pool_to_grid_windows(size, factor):
    """SEM's spatial reduction and TPIM's ↓sc: output cell (i, j) of the h×w = ⌈H/f⌉×⌈W/f⌉ grid averages rows
    ⌊i·H/h⌋ .. ⌈(i+1)·H/h⌉ − 1 and the columns alike: disjoint windows where h divides H (f×f blocks where f
    does), else windows that overlap."""
    x = randn(2, 3, *size, gen=torch.Generator().manual_seed(fresh_seed()))
    (hi, wi), (h, w) = size, (math.ceil(size[0] / factor), math.ceil(size[1] / factor))
    rows = [(i * hi // h, -(-(i + 1) * hi // h)) for i in range(h)]
    cols = [(j * wi // w, -(-(j + 1) * wi // w)) for j in range(w)]
    want = torch.stack([torch.stack([x[..., r0:r1, c0:c1].mean((-2, -1)) for c0, c1 in cols], -1)
                        for r0, r1 in rows], -2)
    torch.testing.assert_close(pool_to_grid(x, factor), want, rtol=1e-12, atol=1e-12)


def test_bridge_feature_extractor_is_eq3_to_6():
    """BridgeNet §3.3 written out (float64, eval-mode BN, random statistics and affine parameters):
    S̃ = Flat(BN(DWConv3×3 stride 2 (S))); P̃_j = Flat(AvgPool_l(LN(P_j))), every l×l cell (ceil mode, the
    border cells averaging their valid positions), tasks concatenated along the tokens (eq. 3);
    Q = S̃ W_q + b_q, K = P̃ W_k, V = P̃ W_v + b_v (eq. 4); per head softmax(Q_h K_hᵀ / √C) V_h (eq. 5–6, C the
    full width); W_o; bilinear up-sampling to H×W; depth-wise 3×3 conv (official); + S; + MLP(LN(·))."""
    gen = torch.Generator().manual_seed(fresh_seed())
    c, cp, heads, l = 8, 6, 2, 3
    block = BridgeFeatureExtractor(c, cp, heads=heads, kv_stride=l).double()
    block = random_norms(block, gen)
    generic = randn(2, c, 9, 7, gen=gen)
    tasks = {t: randn(2, cp, 8, 7, gen=gen) for t in TASKS}
    with mtlfast.use_backend("reference"):
        out = block(generic, tasks)
    conv = block.q_embed[0]
    s = batch_norm(block.q_embed[1], F.conv2d(generic, conv.weight, stride=2, padding=1, groups=c))
    grid = s.shape[-2:]
    assert grid == (5, 4)
    norm = block.kv_norm
    p = torch.cat([_pool_cells(F.layer_norm(x.permute(0, 2, 3, 1), (cp,), norm.weight, norm.bias).permute(0, 3, 1, 2),
                               l) for x in tasks.values()], 1)
    assert p.shape == (2, 3 * 3 * 3, cp)
    attn = block.attn
    q = s.flatten(2).transpose(1, 2) @ attn.q.weight.T + attn.q.bias
    k, v = p @ attn.k.weight.T, p @ attn.v.weight.T + attn.v.bias
    x = torch.cat([torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / math.sqrt(c), -1) @ v[..., h]
                   for h in (slice(0, 4), slice(4, 8))], -1) @ attn.proj.weight.T + attn.proj.bias
    x = F.interpolate(x.transpose(1, 2).reshape(2, c, *grid), size=(9, 7), mode="bilinear", align_corners=False)
    y = generic + F.conv2d(x, block.restore.weight, block.restore.bias, padding=1, groups=c)
    t = _ffn(block.ffn, y.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, t.transpose(1, 2).reshape(2, c, 9, 7), rtol=1e-10, atol=1e-10)


def _ffn(ffn, tokens):
    """x + W₂ GELU(W₁ LN(x)) with the functional ops."""
    hidden = F.gelu(F.linear(F.layer_norm(tokens, tokens.shape[-1:], ffn.norm.weight, ffn.norm.bias), ffn.fc1.weight,
                             ffn.fc1.bias))
    return tokens + F.linear(hidden, ffn.fc2.weight, ffn.fc2.bias)


def test_task_pattern_propagation_is_eq1_2():
    """BridgeNet eq. 1–2 written out (float64, random eval-mode BN and LayerNorms): per task j, Q_j from the
    stride-2 depth-wise conv + BN, LN, W_q; K_j, V_j from the 2×2 cell averages (ceil mode), LN, W_k, W_v; the
    T·H maps A_c = Q_j,h K_j,hᵀ / √dim (c = j·H + h); per task t and head o, Ā = Σ_c W[t, o, c] A_c, softmax,
    times V_t,o; then W_o, bilinear up-sampling, + P_t, + MLP(LN(·))."""
    gen = torch.Generator().manual_seed(fresh_seed())
    c, heads, t_count = 8, 2, len(TASKS)
    block = random_norms(TaskPatternPropagation(TASKS, c, c, heads=heads).double(), gen)
    feats = {t: randn(2, c, 9, 7, gen=gen) for t in TASKS}
    with mtlfast.use_backend("reference"):
        out = block(feats)
    qs, ks, vs = [], [], []
    for t in TASKS:
        conv = block.q_embed[t][0]
        qmap = batch_norm(block.q_embed[t][1], F.conv2d(feats[t], conv.weight, stride=2, padding=1, groups=c))
        grid = qmap.shape[-2:]
        qn, kvn = block.q_norm[t], block.kv_norm[t]
        q = F.layer_norm(qmap.flatten(2).transpose(1, 2), (c,), qn.weight, qn.bias)
        kv = F.layer_norm(_pool_cells(feats[t], 2), (c,), kvn.weight, kvn.bias)
        qs.append(F.linear(q, block.q[t].weight, block.q[t].bias))
        ks.append(F.linear(kv, block.k[t].weight))
        vs.append(F.linear(kv, block.v[t].weight, block.v[t].bias))
    width = c // heads
    maps = [qs[j][..., h * width:(h + 1) * width] @ ks[j][..., h * width:(h + 1) * width].transpose(1, 2) / math.sqrt(c)
            for j in range(t_count) for h in range(heads)]  # eq. 1, channel j·H + h
    for i, t in enumerate(TASKS):
        x = torch.cat([torch.softmax(sum(block.mix_weight[i, o, ch] * a for ch, a in enumerate(maps)), -1)
                       @ vs[i][..., o * width:(o + 1) * width] for o in range(heads)], -1)  # eq. 2
        up = F.interpolate(F.linear(x, block.proj[t].weight, block.proj[t].bias).transpose(1, 2).reshape(2, c, *grid),
                           size=(9, 7), mode="bilinear", align_corners=False)
        y = (feats[t] + up).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out[t], _ffn(block.ffn[t], y).transpose(1, 2).reshape(2, c, 9, 7),
                                   rtol=1e-10, atol=1e-10)


def test_task_feature_refiner_is_eq7():
    """BridgeNet eq. 7 with the official block: per task x <- x + W₃ GELU(BN(DWConv3×3_d(GELU(BN(W₁ [x, S']))))),
    d cycling 1, 2, 5 over the 3·M blocks (M = 2), S' resized bilinearly to the task features' size first."""
    gen = torch.Generator().manual_seed(fresh_seed())
    block = random_norms(TaskFeatureRefiner(TASKS, 8, layers=2).double(), gen)
    tasks = {t: randn(2, 8, 9, 11, gen=gen) for t in TASKS}
    bridge = randn(2, 8, 5, 6, gen=gen)
    out = block(tasks, bridge)
    guide = F.interpolate(bridge, size=(9, 11), mode="bilinear", align_corners=False)

    for t in TASKS:
        x = tasks[t]
        for i, b in enumerate(block.refiners[t]):
            conv1, bn1, _, dw, bn2, _, conv3 = b.body
            d = (1, 2, 5)[i % 3]
            assert conv1.bias is None and dw.dilation == (d, d)
            h = F.gelu(batch_norm(bn1, F.conv2d(torch.cat([x, guide], 1), conv1.weight)))
            h = F.gelu(batch_norm(bn2, F.conv2d(h, dw.weight, padding=d, dilation=d, groups=4)))
            x = x + F.conv2d(h, conv3.weight, conv3.bias)
        torch.testing.assert_close(out[t], x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("index", [0, 2, 3])
def test_scale_attentive_feature_fusion_is_eq2_to_5(index):
    """XL = BN(Conv1×1(X^i)); Y = BN(Conv1×1(Concat_{j≠i} up(X^j))) (eq. 2); SFX = SFF([XL, Y]) + XL with SFF =
    3×3 conv, ReLU, 3×3 conv (eq. 3); X̂ = Conv1×1(ReLU(depth-wise Conv3×3(SFX))) (eq. 4–5)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    channels = (4, 6, 8, 10)
    feats = [randn(2, c, 17 // 2 ** i, 21 // 2 ** i, gen=gen) for i, c in enumerate(channels)]
    block = random_norms(ScaleAttentiveFeatureFusion(channels, index, 12).double(), gen)
    size = feats[index].shape[-2:]
    low = conv_bn(block.low, feats[index])
    others = [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
              for j, f in enumerate(feats) if j != index]
    aligned = conv_bn(block.align, torch.cat(others, 1))
    c1, c2 = block.sff[0], block.sff[2]
    sfx = F.conv2d(F.relu(F.conv2d(torch.cat([low, aligned], 1), c1.weight, c1.bias, padding=1)), c2.weight,
                   c2.bias, padding=1) + low
    spatial = F.conv2d(sfx, block.spatial.weight, block.spatial.bias, padding=1, groups=12)
    want = F.conv2d(F.relu(spatial), block.mix.weight, block.mix.bias)
    torch.testing.assert_close(block(feats), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build, match", [
    (lambda: TaskFeatureRefiner(TASKS, 8, "giant"), "layers: unknown TFR size 'giant'; valid choices: base, large, huge"),
    (lambda: TaskFeatureRefiner(TASKS, 8, 0), "layers: expected >= 1"),
    (lambda: IterativeFusionBlock(4, "D"), "variant: unknown IFB variant 'D'; valid choices: A, B, C"),
    (lambda: IterativeFusionBlock(0), "n_iter: expected an integer >= 1"),
    (lambda: TaskPatternPropagation(TASKS, 8, 9, heads=2), "dim: attention width 9 is not divisible by heads=2"),
    (lambda: BridgeFeatureExtractor(9, heads=2), "channels: attention width 9 is not divisible by heads=2"),
    (lambda: HierarchyAdaptiveAttention([4, 4], 9, heads=2), "dim: attention width 9 is not divisible by heads=2"),
    (lambda: ProjectedAttention(9, 4, heads=2), "dim: attention width 9 is not divisible by heads=2"),
    (lambda: HierarchyAdaptiveAttention([4, 4], 8, strides=[2]), "strides/kernels: expected 2 values"),
    (lambda: ScaleAttentiveFeatureFusion([4, 4], 2, 8), "index: expected a scale in 0..1"),
    (lambda: MultiModalDistillation(["semseg", "depth"], 8, source_tasks=["semseg"]), "source_tasks: must contain"),
    (lambda: TaskPatternPropagation("semseg", 8), "tasks: expected a non-empty list of task names, got 'semseg'"),
    (lambda: EMInteraction([], 8), "tasks: expected a non-empty list of task names, got []"),
    (lambda: TaskPairInteraction(["depth", "depth"], 8), "tasks: expected distinct task names"),
    (lambda: TaskPatternPropagation(TASKS, 8, heads=0), "heads: expected an integer >= 1, got 0"),
    (lambda: BridgeFeatureExtractor(0), "channels: expected an integer >= 1, got 0"),
    (lambda: FeaturePropagation(TASKS, 8, se_reduction=0), "se_reduction: expected an integer >= 1, got 0"),
    (lambda: CrossTaskInteractionBlock(8, downscale=0), "downscale: expected an integer >= 1, got 0"),
    (lambda: SelfFeatureDistillation(0), "dim: expected an integer >= 1, got 0"),
    (lambda: HierarchyAdaptiveAttention([], 8), "in_channels: expected the channels of at least one stage"),
    (lambda: FeatureAggregation([8, 0], 3), "in_channels[1]: expected an integer >= 1, got 0"),
    (lambda: EMInteraction(TASKS, 8, tau=0.0), "tau: expected a finite float > 0, got 0.0"),
    (lambda: EMInteraction(TASKS, 8, n_iter=0), "n_iter: expected an integer >= 1, got 0"),
    (lambda: IterativeFusionBlock(3, mode="fast"), "mode: expected one of materialize, recompute, auto, got 'fast'"),
])
def test_bad_block_configuration(build, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build()


#: The blocks taking {task: (B, C, H, W)}, C = 8, as (build, call).
_TASK_BLOCKS = {
    "TaskPatternPropagation": (lambda: TaskPatternPropagation(TASKS, 8), lambda m, x: m(x)),
    "EMInteraction": (lambda: EMInteraction(TASKS, 8), lambda m, x: m(x)),
    "TaskPairInteraction": (lambda: TaskPairInteraction(TASKS, 8), lambda m, x: m(x)),
    "MultiModalDistillation": (lambda: MultiModalDistillation(TASKS[:1], 8, source_tasks=TASKS), lambda m, x: m(x)),
    "FeaturePropagation": (lambda: FeaturePropagation(TASKS, 8), lambda m, x: m(x)),
    "TaskFeatureRefiner": (lambda: TaskFeatureRefiner(TASKS, 8, 1), lambda m, x: m(x, torch.randn(1, 8, 3, 3))),
}


@pytest.mark.parametrize("name", _TASK_BLOCKS)
def test_blocks_check_their_task_features(name):
    """A missing task (a source task too), maps of different shapes, or of another width than the module's are
    named before any computation."""
    build, call = _TASK_BLOCKS[name]
    module = build()
    x = {t: torch.randn(1, 8, 5, 6) for t in TASKS}
    with pytest.raises(KeyError, match=re.escape(f"features: no feature map for tasks ['{TASKS[-1]}']")):
        call(module, {t: x[t] for t in TASKS[:-1]})
    with pytest.raises(ValueError, match=re.escape(f"features['{TASKS[1]}']: expected shape (B, C, H, W) with W=6")):
        call(module, {**x, TASKS[1]: torch.randn(1, 8, 5, 7)})
    with pytest.raises(ValueError, match=re.escape(f"features['{TASKS[0]}']: expected shape (B, C, H, W) with C=8 "
                                                   f"(from the module), got (1, 6, 5, 6)")):
        call(module, {t: torch.randn(1, 6, 5, 6) for t in TASKS})
    with pytest.raises(TypeError, match=re.escape("features: expected a dict {task: (B, C, H, W) tensor}, got list")):
        call(module, list(x.values()))
    call(module, x)


def _maps(*shapes):
    return [torch.randn(*shape) for shape in shapes]


def _lthd_factors(width):
    """LowToHighDiffusion's (fine, coarse) SFD factors for a 3×4 and a 2×2 grid, of ``width`` channels."""
    q2, q3 = torch.randn(1, 12, width), torch.randn(1, 4, width)
    return (q2, q2, (3, 4)), (q3, q3, (2, 2))


@pytest.mark.parametrize("call, error, match", [
    # list-taking blocks: one map per stage, of the module's channels per stage
    (lambda: FeatureAggregation([8, 16], 3)(_maps((1, 16, 5, 6), (1, 8, 3, 3))), ValueError,
     "features[0]: expected shape (B, 8, *, *) with size 8 at dim 1, got (1, 16, 5, 6)"),
    (lambda: FeatureAggregation([8, 16], 3)(_maps((1, 8, 5, 6))), ValueError,
     "features: expected 2 maps (one per stage, channels [8, 16]), got 1"),
    (lambda: ScaleAttentiveFeatureFusion([8, 16], 0, 8)(_maps((1, 8, 5, 6), (2, 16, 3, 3))), ValueError,
     "features[1]: expected shape (B, 16, *, *) with B=1 (from features[0]), got (2, 16, 3, 3)"),
    (lambda: HierarchyAdaptiveAttention([4, 6], 8)(_maps((1, 4, 8, 8), (1, 4, 4, 4))), ValueError,
     "features[1]: expected shape (B, 6, *, *) with size 6 at dim 1, got (1, 4, 4, 4)"),
    (lambda: HierarchyAdaptiveAttention([4, 6], 8)(torch.randn(1, 4, 8, 8)), TypeError,
     "features: expected a list of 2 (B, C_s, H_s, W_s) tensors (one per stage), got Tensor"),
    # BridgeNet's BFE (any task maps, a dict or a list) and TFR's bridge
    (lambda: BridgeFeatureExtractor(8, 12)(torch.randn(1, 8, 5, 6), {}), ValueError,
     "task_features: expected at least one (B, C, H, W) feature map, got none"),
    (lambda: BridgeFeatureExtractor(8, 12)(torch.randn(1, 8, 5, 6), _maps((1, 8, 5, 6))), ValueError,
     "task_features[0]: expected shape (B, C, H, W) with C=12 (from the module), got (1, 8, 5, 6)"),
    (lambda: BridgeFeatureExtractor(8, 12)(torch.randn(1, 6, 5, 6), {"depth": torch.randn(1, 12, 3, 3)}), ValueError,
     "generic: expected shape (B, 8, *, *) with size 8 at dim 1, got (1, 6, 5, 6)"),
    (lambda: BridgeFeatureExtractor(8)(torch.randn(1, 8, 5, 6), torch.randn(1, 8, 5, 6)), TypeError,
     "task_features: expected a dict {task: (B, C_p, H_p, W_p) tensor} or a list of such maps, got Tensor"),
    (lambda: TaskFeatureRefiner(TASKS, 8, 1)({t: torch.randn(1, 8, 5, 6) for t in TASKS}, torch.randn(2, 8, 3, 3)),
     ValueError, "bridge: expected shape (B, C, Hb, Wb) with B=1 (from features['semseg']), got (2, 8, 3, 3)"),
    # single maps
    (lambda: SelfFeatureDistillation(8)(torch.randn(1, 6, 3, 3)), ValueError,
     "x: expected shape (B, dim, H, W) with dim=8 (from the module), got (1, 6, 3, 3)"),
    (lambda: LowToHighDiffusion(8)(torch.randn(1, 6, 9, 9), *_lthd_factors(8)), ValueError,
     "x: expected shape (B, dim, H, W) with dim=8 (from the module), got (1, 6, 9, 9)"),
    (lambda: LowToHighDiffusion(8)(torch.randn(1, 8, 9, 9), *_lthd_factors(6)), ValueError,
     "fine[0]: expected shape (B, Nf, dim) with dim=8 (from the module), got (1, 12, 6)"),
    (lambda: CrossTaskInteractionBlock(8)(torch.randn(1, 8, 5, 6), torch.randn(1, 8, 5, 7)), ValueError,
     "target: expected shape (B, C, H, W) with W=6 (from source), got (1, 8, 5, 7)"),
])
def test_blocks_check_their_inputs(call, error, match):
    with pytest.raises(error, match=re.escape(match)):
        call()


def test_drop_in_example_runs():
    """The example in mtlfast.nn's docstring (for the README) runs as written."""
    doc = blocks.__doc__
    code = doc[doc.index("# example: drop-in"):doc.index("# end example")]
    namespace = {}
    lines = code.splitlines()[1:]  # the marker line itself starts mid-line
    exec(compile("\n".join(line[4:] for line in lines), "mtlfast.nn example", "exec"), namespace)
    out = namespace["out"]
    assert set(out) == {"semseg", "depth", "normals"} and all(o.shape == (2, 64, 15, 20) for o in out.values())
    assert namespace["tpp"].q["semseg"].weight.grad is not None
