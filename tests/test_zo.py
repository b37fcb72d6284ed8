"""zo.py: seeded directions, exact on-the-fly perturbation, the two-point estimate and the ZO-SGD update.

Every test uses tiny modules and fixed seeds, so the file is deterministic and runs in a few seconds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hosl_lightning.core.zo import (
    DIRECTIONS,
    ZOSGD,
    DirectionSampler,
    ZOEstimate,
    is_no_decay,
    mix_seed,
    two_point_estimate,
)

# --------------------------------------------------------------------------------------------- helpers


def _flat_direction(opt: ZOSGD, named: list[tuple[str, nn.Parameter]], step: int, query: int) -> torch.Tensor:
    """u(step, query) over all parameters, concatenated in the order the optimizer keys them."""
    parts = [opt.sampler.direction(step, query, opt.keys[id(p)], p).reshape(-1) for _, p in named]
    return torch.cat(parts)


def _snapshot(module: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    return {name: (param, param.detach().clone()) for name, param in module.named_parameters()}


def _assert_untouched(module: nn.Module, snapshot: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Bit-identical values, and the very same Parameter objects registered where they were."""
    assert dict(module.named_parameters()).keys() == snapshot.keys()
    by_id = {id(param): (name, value) for name, (param, value) in snapshot.items()}
    for sub_name, sub in module.named_modules():
        for local, param in sub._parameters.items():
            if param is None:  # e.g. Linear(bias=False)
                continue
            full = f"{sub_name}.{local}" if sub_name else local
            assert id(param) in by_id, f"{full} was replaced by another object"
            original_name, value = by_id[id(param)]
            original = snapshot[original_name][0]
            assert param is original and isinstance(param, nn.Parameter)
            if full in snapshot:  # a tied parameter is listed once, under its first name
                assert param is snapshot[full][0], f"{full} holds another parameter"
            assert torch.equal(param, value), f"{full} changed"
        assert not sub._forward_pre_hooks and not sub._forward_hooks, f"hooks left on {sub_name or 'root'}"


def _manually_perturbed(module: nn.Module, opt: ZOSGD, step: int, query: int, scale: float) -> nn.Module:
    """A copy of ``module`` whose ZO parameters hold ``w + scale * u(step, query)`` (computed the same way)."""
    named = dict(module.named_parameters())
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            original = named[name]
            if id(original) in opt.keys:
                u = opt.sampler.direction(step, query, opt.keys[id(original)], original)
                param.copy_(original + scale * u)
    return twin


class Scaled(nn.Module):
    """A module that owns a parameter *and* a child that owns more (hooks on both levels)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 7))
        self.inner = nn.Linear(7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), Scaled(), nn.LayerNorm(7), nn.Linear(7, 3))


# ------------------------------------------------------------------- 1. the estimate points along the gradient


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_averaged_estimate_aligns_with_true_gradient(direction: str) -> None:
    """Least squares over nn.Linear(8, 4): d = 36 parameters, loss exactly quadratic in them.

    Theory. For a quadratic loss the symmetric difference is exact: c_q = g . u_q (no O(mu^2) bias), so
    g_hat = (1/Q) sum_q (g . u_q) u_q with E[g_hat] = g. Gaussian u: E[(g.u)^2 u u^T] = |g|^2 I + 2 g g^T,
    so E|g_hat|^2 = |g|^2 (1 + (d+1)/Q) and cos(g_hat, g) ~ sqrt(Q / (Q + d + 1)); rademacher u:
    E|g_hat|^2 = |g|^2 (1 + (d-1)/Q), cos ~ sqrt(Q / (Q + d - 1)). With Q = 1000, d = 36 both are ~0.982.
    Fluctuation: the error orthogonal to g is ~ |g|^2/Q * chi2_{d-1}, so 1 - cos ~ chi2_35 / (2Q): mean
    0.0175, 99.99% quantile ~0.036. Threshold 0.95 needs chi2_35 >= 100 (p < 1e-8): wide margin, yet a
    wrong key, sign, step or query pairing between probe and sampler gives cos ~ N(0, 1/d), far below.
    Cosine is blind to scale, so the projection g_hat . g / |g|^2 (mean 1, std sqrt(2/Q) ~ 0.045, bound
    for rademacher too) must be within 0.2 of 1: a direction with the wrong variance or a missing 1/Q fails.
    """
    torch.manual_seed(1)
    model = nn.Linear(8, 4)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    named = list(model.named_parameters())
    d = sum(p.numel() for _, p in named)
    assert d == 36
    opt = ZOSGD(named, lr=0.0, direction=direction, seed=1234)
    step, queries, mu = 5, 1000, 1e-2

    def loss_of(m: nn.Module) -> torch.Tensor:
        return (m(x) - y).pow(2).mean()

    twin = copy.deepcopy(model)
    loss_of(twin).backward()
    g = torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).double()

    def probe(q: int, sign: float) -> torch.Tensor:
        with torch.no_grad(), opt.perturbed([model], step, q, sign * mu):
            return loss_of(model).reshape(1)

    coefficients, losses = two_point_estimate(probe, torch.cat, queries, mu)
    assert coefficients.shape == (queries,) and losses.shape == (2 * queries,)
    us = torch.stack([_flat_direction(opt, named, step, q) for q in range(queries)]).double()
    # exact for a quadratic, up to float32 rounding of L+- (~1e-7 / 2mu): every single c_q equals g . u_q
    torch.testing.assert_close(coefficients.double(), us @ g, rtol=1e-3, atol=2e-3)

    g_hat = (coefficients.double()[:, None] * us).mean(0)
    cosine = float(g_hat @ g / (g_hat.norm() * g.norm()))
    expected = math.sqrt(queries / (queries + d + (1 if direction == "gaussian" else -1)))
    assert cosine > 0.95, (cosine, expected)
    assert abs(float(g_hat @ g / (g @ g)) - 1.0) < 0.2
    # and fewer queries give a visibly worse estimate, as the theory says (Q = 10: cos ~ 0.47)
    few = (coefficients.double()[:10, None] * us[:10]).mean(0)
    assert float(few @ g / (few.norm() * g.norm())) < 0.8
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- 2. perturbation is exact


def test_perturbed_forward_sees_w_plus_scale_u_and_leaves_weights_bit_identical() -> None:
    model = _net()
    opt = ZOSGD(model.named_parameters(), lr=0.1, seed=7)
    x = torch.randn(4, 5)
    with torch.no_grad():
        clean = model(x)
    before = _snapshot(model)
    step, query, scale = 3, 2, 1e-2

    with torch.no_grad(), opt.perturbed([model], step, query, scale):
        inside = model(x)
        # between forwards the stored weights are the originals again
        for name, (param, value) in before.items():
            assert torch.equal(dict(model.named_parameters())[name], value)
        again = model(x)  # a module can run several times in one context: same perturbation each time
    _assert_untouched(model, before)

    assert not torch.allclose(inside, clean)
    assert torch.equal(inside, again)
    with torch.no_grad():
        manual = _manually_perturbed(model, opt, step, query, scale)(x)
        assert torch.equal(inside, manual)
        # the sign matters: -scale is a different point
        assert not torch.equal(inside, _manually_perturbed(model, opt, step, query, -scale)(x))
        # and after the context the forward is the clean one again
        assert torch.equal(model(x), clean)


def test_perturbed_restores_after_an_exception_inside_a_module_forward() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))
            self.fail = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x @ self.weight  # the weight is swapped in here; the forward hook never runs
            if self.fail:
                raise ValueError("boom")
            return y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Boom())
    opt = ZOSGD(model.named_parameters(), lr=0.1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="boom"):  # the original error, not the "not used" RuntimeError
        with torch.no_grad(), opt.perturbed([model], 0, 0, 0.5):
            model(torch.randn(2, 3))
    _assert_untouched(model, before)

    # an exception in the body before any forward is also propagated unchanged
    with pytest.raises(KeyError):
        with opt.perturbed([model], 0, 0, 0.5):
            raise KeyError("early")
    _assert_untouched(model, before)

    # and the module works normally afterwards, perturbed or not
    model[1].fail = False
    x = torch.randn(2, 3)
    with torch.no_grad(), opt.perturbed([model], 0, 0, 0.5):
        out = model(x)
    with torch.no_grad():
        assert torch.equal(out, _manually_perturbed(model, opt, 0, 0, 0.5)(x))
    _assert_untouched(model, before)


def test_perturbed_touches_only_optimizer_parameters_and_builds_no_graph_to_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].requires_grad_(False)  # a frozen layer the ZO optimizer does not own
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n != "0.bias"]
    opt = ZOSGD(named, lr=0.1)
    before = _snapshot(model)
    x = torch.randn(3, 4)
    seen: dict[str, torch.Tensor] = {}
    model[2].register_forward_pre_hook(lambda m, a: seen.update(w=m.weight, b=m.bias))
    model[0].register_forward_pre_hook(lambda m, a: seen.update(b0=m.bias))
    with opt.perturbed([model], 1, 0, 0.1):  # grad mode on: perturbed weights are detached temporaries
        out = model(x)
    assert seen["w"] is before["2.weight"][0] and seen["b"] is before["2.bias"][0]
    assert seen["b0"] is before["0.bias"][0]
    out.sum().backward()  # the graph reaches the trainable non-ZO bias, never a ZO parameter
    assert model[0].bias.grad is not None
    assert model[0].weight.grad is None
    model[0].bias.grad = None
    with torch.no_grad():
        assert torch.equal(out, _manually_perturbed(model, opt, 1, 0, 0.1)(x))
    model[2]._forward_pre_hooks.clear()
    model[0]._forward_pre_hooks.clear()
    _assert_untouched(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_tied_parameter_in_sibling_modules_gets_one_shared_perturbation() -> None:
    """Tied input/output embeddings (as in GPT-2 when not untied): both readers see the same w + s*u."""

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    model = TinyLM()
    opt = ZOSGD(model.named_parameters(), lr=0.1)
    assert len(opt.keys) == 1
    ids = torch.tensor([[1, 4, 9, 2]])
    before = _snapshot(model)
    with torch.no_grad(), opt.perturbed([model], 0, 0, 0.05):
        out = model(ids)
    twin = _manually_perturbed(model, opt, 0, 0, 0.05)
    assert twin.head.weight is twin.embed.weight
    with torch.no_grad():
        assert torch.equal(out, twin(ids))
    assert model.head.weight is model.embed.weight is before["embed.weight"][0]
    _assert_untouched(model, before)


def test_tied_parameter_read_by_a_nested_module_is_perturbed_for_every_reader() -> None:
    class Child(nn.Module):
        def __init__(self, weight: nn.Parameter) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))
            self.child = Child(self.weight)  # same Parameter, registered on parent and child

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x @ self.weight, self.child(x)

    torch.manual_seed(0)
    model = Parent()
    opt = ZOSGD(model.named_parameters(), lr=0.1)
    x = torch.randn(2, 3)
    with torch.no_grad(), opt.perturbed([model], 0, 0, 0.5):
        by_parent, by_child = model(x)
    # either both readers see w + s*u, or perturbed raises; silently mixing the two points is wrong
    assert torch.equal(by_parent, by_child)


# ------------------------------------------------------------------------------- 3. determinism / resume


# The reference splitmix64 (Vigna, xoshiro.di.unimi.it/splitmix64.c) seeded with 0 outputs these four numbers.
SPLITMIX64_FROM_0 = (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC)
GOLDEN = 0x9E3779B97F4A7C15


def test_mix_seed_of_one_part_is_the_reference_splitmix64_output() -> None:
    """One part p sets the generator's state to (GOLDEN ^ p) and takes one splitmix64 step: so the part that makes
    the state k * GOLDEN yields the reference generator's k-th output, kept to 63 bits. An independent check."""
    for k in (2, 3, 4):
        part = GOLDEN ^ (((k - 1) * GOLDEN) & (2**64 - 1))
        assert mix_seed(part) == SPLITMIX64_FROM_0[k - 1] >> 1, k


def test_mix_seed_is_pinned_order_sensitive_and_63_bit() -> None:
    # mix_seed(0) is the reference splitmix64's second output from seed 0 (above): a change here silently changes
    # every run's directions
    assert mix_seed(0) == SPLITMIX64_FROM_0[1] >> 1
    assert mix_seed(0) == 3980143261097177850
    assert mix_seed(1, 2, 3, 4) == 6990634552898421246
    assert mix_seed(123, 7, 2, 5) == 8924058439714710965
    assert DirectionSampler("gaussian", 123).seed_for(7, 2, 5) == mix_seed(123, 7, 2, 5, 0)
    assert DirectionSampler("gaussian", 123).seed_for(7, 2, 5, 9) == mix_seed(123, 7, 2, 5, 9)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert mix_seed(0) != mix_seed(0, 0)
    assert mix_seed(-1) == mix_seed(2**64 - 1)  # parts are taken modulo 2**64, by design
    values = [mix_seed(a, b, c) for a in (0, 1, -1, 2**63, 10**30) for b in range(4) for c in range(3)]
    assert all(isinstance(v, int) and 0 <= v < 2**63 for v in values)
    assert len(set(values)) == len(values)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_directions_depend_only_on_seed_step_query_key(direction: str) -> None:
    like = torch.empty(4, 5)
    a = DirectionSampler(direction, seed=11)
    u = a.direction(3, 1, 2, like)
    assert u.shape == like.shape and u.dtype == like.dtype
    # a fresh sampler (a resumed run) regenerates the very same tensor; contents of `like` are irrelevant
    assert torch.equal(DirectionSampler(direction, seed=11).direction(3, 1, 2, torch.randn(4, 5)), u)
    assert torch.equal(a.direction(3, 1, 2, like), u)
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(a.direction(3, 1, 2, like), u)
    for other in (
        a.direction(4, 1, 2, like),
        a.direction(3, 0, 2, like),
        a.direction(3, 1, 3, like),
        DirectionSampler(direction, seed=12).direction(3, 1, 2, like),
    ):
        assert not torch.equal(other, u)
    assert a.direction(0, 0, 0, torch.empty(3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_direction_assembles_and_any_rows_regenerate_alone(direction: str) -> None:
    table = torch.empty(37, 6)
    small = DirectionSampler(direction, seed=5, chunk=24)  # 4 rows per chunk: 10 chunks, the last one short
    assert small.rows_per_chunk(table) == 4
    u = small.direction(2, 1, 3, table)
    chunks = list(small.chunks(2, 1, 3, table))
    assert len(chunks) == 10 and chunks[-1][1].shape == (1, 6)
    assert torch.equal(torch.cat([part for _, part in chunks]), u)
    # each chunk has its own seed: not one stream cut in pieces, so chunks differ from each other
    assert not torch.equal(chunks[0][1], chunks[1][1])
    index = torch.tensor([[36, 0, 5], [5, 17, 36]])  # repeats, first and last rows, 2-D index
    assert torch.equal(small.rows(2, 1, 3, table, index), u[index])
    # rows of a chunk are drawn without the chunks the index does not touch
    drawn: list[int] = []
    original = small._draw
    small._draw = lambda *args: drawn.append(args[3]) or original(*args)  # type: ignore[method-assign]
    small.rows(2, 1, 3, table, torch.tensor([0, 1, 33]))
    assert sorted(drawn) == [0, 8]
    # a row wider than a chunk is one chunk per row; 1-D and 0-D tensors work too
    assert DirectionSampler(direction, chunk=4).rows_per_chunk(table) == 1
    assert DirectionSampler(direction, chunk=4).direction(0, 0, 0, torch.empty(9)).shape == (9,)
    scalar = DirectionSampler(direction).direction(0, 0, 0, torch.tensor(1.0))
    assert scalar.shape == () and torch.equal(scalar, DirectionSampler(direction).direction(0, 0, 0, torch.tensor(2.0)))


def test_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk=0 is not valid: it must be an integer >= 1"):
        DirectionSampler("gaussian", chunk=0)


class _Lookup(nn.Module):
    """A token embedding (perturbed by rows) feeding a head (perturbed by a swapped copy)."""

    def __init__(self, vocab: int = 300, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_embedding_probe_perturbs_looked_up_rows_exactly_without_a_table_sized_temporary() -> None:
    torch.manual_seed(0)
    model = _Lookup()
    opt = ZOSGD(model.named_parameters(), lr=0.1, seed=3)
    opt.sampler.chunk = 64  # 8 rows per chunk, so a lookup of a few ids touches a few chunks
    ids = torch.tensor([[1, 7, 299, 7], [150, 2, 3, 1]])
    before = _snapshot(model)
    with torch.no_grad(), opt.perturbed([model], 4, 1, 1e-2):
        mode = _LargestAllocation()
        with mode:
            inside = model(ids)
    _assert_untouched(model, before)
    with torch.no_grad():
        manual = _manually_perturbed(model, opt, 4, 1, 1e-2)(ids)
    assert torch.equal(inside, manual)  # the very same floats as a lookup in the perturbed table
    table = model.embed.weight.numel()
    assert mode.largest < table // 4, f"a {mode.largest}-element temporary for a {table}-element table"


def test_embedding_subclass_that_changes_its_output_takes_the_swapped_copy() -> None:
    class Scaled(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 3.0

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(50, 4), nn.Linear(4, 2))
    opt = ZOSGD(model.named_parameters(), lr=0.1, seed=3)
    ids = torch.tensor([[3, 49, 0]])
    with torch.no_grad(), opt.perturbed([model], 0, 0, 1e-2):
        inside = model(ids)
    with torch.no_grad():
        assert torch.equal(inside, _manually_perturbed(model, opt, 0, 0, 1e-2)(ids))


def test_direction_distributions() -> None:
    big = torch.empty(200, 100)
    r = DirectionSampler("rademacher", 3).direction(0, 0, 0, big)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 0.03  # 20000 signs: std of the mean 0.007
    g = DirectionSampler("gaussian", 3).direction(0, 0, 0, big)
    assert abs(float(g.mean())) < 0.03 and abs(float(g.std()) - 1.0) < 0.03
    assert len(g.unique()) > 19_000  # continuous, not signs


def test_probes_and_steps_leave_the_global_rng_alone() -> None:
    model = _net()
    opt = ZOSGD(model.named_parameters(), lr=0.1, direction="rademacher")
    state = torch.random.get_rng_state()
    with torch.no_grad(), opt.perturbed([model], 0, 0, 1e-3):
        model(torch.zeros(2, 5))
    opt.step(estimate=ZOEstimate(0, torch.tensor([0.5, -0.25])))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_resumed_optimizer_reproduces_the_uninterrupted_run() -> None:
    model = _net()
    resumed_model = copy.deepcopy(model)
    opt = ZOSGD(model.named_parameters(), lr=0.05, weight_decay=0.1, seed=5)
    estimates = [ZOEstimate(t, torch.tensor([0.3 * (t + 1), -0.7])) for t in range(4)]
    for estimate in estimates[:2]:
        opt.step(estimate=estimate)
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(q)
    state = copy.deepcopy(opt.state_dict())
    resumed = ZOSGD(resumed_model.named_parameters(), lr=123.0, weight_decay=0.1, seed=5)
    resumed.load_state_dict(state)  # restores the lr too
    assert resumed.param_groups[0]["lr"] == 0.05
    for estimate in estimates[2:]:
        opt.step(estimate=estimate)
        resumed.step(estimate=estimate)
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------- 4. ZOSGD.step


def test_is_no_decay() -> None:
    assert not is_no_decay("layer.weight", torch.empty(3, 4))
    assert not is_no_decay("embed.weight", torch.empty(10, 4))
    assert is_no_decay("layer.bias", torch.empty(3))
    assert is_no_decay("ln.weight", torch.empty(3))
    assert is_no_decay("odd.bias", torch.empty(3, 4))  # named a bias: exempt whatever its shape
    assert is_no_decay("scalar", torch.empty(()))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_step_applies_the_averaged_estimate_and_decoupled_decay(direction: str) -> None:
    model = _net(3)
    named = list(model.named_parameters())
    lr, wd = 0.1, 0.5
    opt = ZOSGD(named, lr=lr, weight_decay=wd, direction=direction, seed=42)
    decayed = {n for n, p in named if p.ndim >= 2}
    assert decayed == {"0.weight", "2.inner.weight", "4.weight"}
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for n, p in named if n in decayed]
    assert opt.param_groups[0]["weight_decay"] == wd and opt.param_groups[1]["weight_decay"] == 0.0
    assert {n for n, p in named if any(p is q for q in opt.param_groups[1]["params"])} == {
        "0.bias", "2.gain", "2.inner.bias", "3.weight", "3.bias", "4.bias"
    }

    coefficients = torch.tensor([0.7, -1.3, 2.0])
    step = 9
    before = {n: p.detach().clone() for n, p in named}
    opt.step(estimate=ZOEstimate(step, coefficients))
    for index, (name, param) in enumerate(named):
        update = sum(
            float(c) * opt.sampler.direction(step, q, index, param) for q, c in enumerate(coefficients)
        ) / len(coefficients)
        start = before[name] * (1 - lr * wd) if name in decayed else before[name]
        torch.testing.assert_close(param.detach(), start - lr * update, msg=name)
        assert param.grad is None
    # the decay really happened (not just within tolerance): 5% of the weight is ~1e-2, tolerance 1e-5
    w = before["0.weight"]
    u_sum = sum(float(c) * opt.sampler.direction(step, q, 0, w) for q, c in enumerate(coefficients)) / 3
    assert (dict(named)["0.weight"].detach() - (w - lr * u_sum)).abs().max() > 1e-3


def test_step_uses_the_current_group_lr_and_returns_the_closure_loss() -> None:
    model = nn.Linear(3, 2)
    opt = ZOSGD(model.named_parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0  # what a scheduler would do
    assert opt.step(lambda: torch.tensor(2.5), estimate=ZOEstimate(0, torch.tensor([3.0]))) == 2.5
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    with pytest.raises(ValueError, match="estimate"):
        opt.step()
    assert all(p.grad is None for p in model.parameters())


def test_full_probe_and_step_cycle_never_creates_grads() -> None:
    model = _net()
    opt = ZOSGD(model.named_parameters(), lr=1e-2)
    x = torch.randn(3, 5)

    def probe(q: int, sign: float) -> torch.Tensor:
        with opt.perturbed([model], 0, q, sign * 1e-3):  # grad mode left on on purpose
            return model(x).square().mean().reshape(1)

    coefficients, _ = two_point_estimate(probe, torch.cat, 3, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(estimate=ZOEstimate(0, coefficients))
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------- 5. errors


def test_bad_direction_name_lists_the_choices() -> None:
    makers = (
        lambda: DirectionSampler("uniform"),
        lambda: ZOSGD(nn.Linear(2, 2).named_parameters(), direction="sphere"),
    )
    for make in makers:
        with pytest.raises(ValueError) as info:
            make()
        assert "gaussian" in str(info.value) and "rademacher" in str(info.value)


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        ZOSGD([])
    with pytest.raises(ValueError, match="lr"):
        ZOSGD(nn.Linear(2, 2).named_parameters(), lr=-1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        ZOSGD(nn.Linear(2, 2).named_parameters(), weight_decay=-0.1)
    ZOSGD(nn.Linear(2, 2).named_parameters(), lr=0.0, weight_decay=0.0)  # zero is fine
    ZOSGD(nn.Linear(2, 2).double().named_parameters())  # float64 is fine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_parameters_are_rejected(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(dtype))
    with pytest.raises(TypeError, match="float32") as info:
        ZOSGD(model.named_parameters())
    assert "'1.weight'" in str(info.value)


def test_integer_parameters_are_rejected() -> None:
    with pytest.raises(TypeError, match="float32"):
        ZOSGD([("steps", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))])


def test_parameter_read_by_another_module_escapes_and_raises() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child = nn.Linear(3, 3)
            self.proj = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(F.linear(x, self.child.weight, self.child.bias))  # child never called

    torch.manual_seed(0)
    model = Parent()
    opt = ZOSGD(model.named_parameters(), lr=0.1)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"child\.weight") as info:
        with torch.no_grad(), opt.perturbed([model], 0, 0, 1e-3):
            model(torch.randn(2, 3))
    assert "child.bias" in str(info.value) and "proj" not in str(info.value)
    _assert_untouched(model, before)

    # same for a module outside the given roots: its parameters cannot be perturbed
    other = nn.Linear(3, 3)
    pair = ZOSGD(list(model.named_parameters()) + [("other.weight", other.weight)], lr=0.1)
    with pytest.raises(RuntimeError, match=r"other\.weight"):
        with torch.no_grad(), pair.perturbed([model.proj], 0, 0, 1e-3):
            model.proj(torch.randn(2, 3))


# ------------------------------------------------------------------------------- 6. two_point_estimate


def test_two_point_estimate_coefficients_and_probe_order() -> None:
    queries, mu = 4, 0.25
    slopes = torch.tensor([0.5, -2.0, 3.25, 0.0])
    calls: list[tuple[int, float]] = []

    def probe(q: int, sign: float) -> torch.Tensor:
        calls.append((q, sign))
        return (1.0 + slopes[q] * sign).reshape(1).requires_grad_(True)  # loss = 1 + a_q * sign

    seen: list[list[torch.Tensor]] = []

    def losses(outputs: list[torch.Tensor]) -> torch.Tensor:
        seen.append(outputs)
        return torch.cat(outputs).double().reshape(queries, 2)  # any shape with 2Q values is accepted

    coefficients, values = two_point_estimate(probe, losses, queries, mu)
    assert calls == [(q, s) for q in range(queries) for s in (1.0, -1.0)]
    assert len(seen) == 1 and len(seen[0]) == 2 * queries  # all 2Q outputs reach losses() at once
    plus, minus = 1.0 + slopes, 1.0 - slopes
    assert torch.equal(values, torch.stack([plus, minus], 1).reshape(-1))
    assert values.dtype == torch.float32 and not values.requires_grad
    assert torch.equal(coefficients, (plus - minus) / (2 * mu))
    assert torch.equal(coefficients, slopes / mu)  # exact in binary for these values
    assert not coefficients.requires_grad


@pytest.mark.parametrize("count", [5, 7, 1])
def test_two_point_estimate_rejects_the_wrong_number_of_losses(count: int) -> None:
    with pytest.raises(ValueError, match="6 probes"):
        two_point_estimate(lambda q, s: q, lambda outs: torch.zeros(count), 3, 1e-3)


def test_bf16_mixed_probe_losses_give_the_float32_coefficients() -> None:
    """c_q of one batch over 64 directions under bf16 autocast (bf16-mixed) and in float32 must correlate.

    The model's logits share an offset of ~8 per position, as a trained model's do (softmax ignores it): bf16
    logits of that size round by ~3e-2, more than L+ - L- = 2 mu g.u at mu = 1e-3. With the LM head in bf16
    the correlation was 0.53; with the head in float32 it is above 0.99.
    """
    from contextlib import nullcontext

    from transformers import LlamaConfig, LlamaForCausalLM

    from hosl_lightning import SplitCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.weight.add_(10.0 * torch.randn(1, 32) / 32**0.5)
    split = SplitCausalLM(model, 1).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = ZOSGD(split.client.named_parameters(), lr=0.0, seed=3)
    assert split(ids).logits.abs().mean() > 5  # logits of a trained model's size

    def coefficients(precision) -> torch.Tensor:
        values = []
        for query in range(64):
            losses = []
            for sign in (1.0, -1.0):
                with torch.no_grad(), precision(), optimizer.perturbed([split.client], 0, query, sign * 1e-3):
                    losses.append(split.server_losses(split.client_forward(ids), {"labels": ids})[0].float())
            values.append((losses[0] - losses[1]) / 2e-3)
        return torch.stack(values)

    float32 = coefficients(nullcontext)
    bf16 = coefficients(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.corrcoef(torch.stack([float32, bf16]))[0, 1] > 0.9
