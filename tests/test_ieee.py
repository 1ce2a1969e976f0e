"""The portable float32 math (cfgen/_ieee.py) and its C twin (cfgen/_native.c).

Accuracy against float64 references, and bit-identity of the native kernels
with the eager torch code: the property that makes noise the same on every
backend.
"""

import os

import pytest
import torch

import cfgen
from cfgen import _ieee, _native


def ulps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Error in float32 ulps of the reference value."""
    ref32 = ref.to(torch.float32)
    spacing = (torch.nextafter(ref32.abs(), torch.tensor(float("inf"))) - ref32.abs()).double()
    return (got.double() - ref).abs() / spacing


def test_log32_accuracy():
    # every binade from 2**-126 to 2**127, and a dense sweep around 1
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.exp2(torch.empty(200_000).uniform_(-126, 127, generator=g)),
        1 + torch.empty(100_000).uniform_(-0.3, 0.42, generator=g),
    ]).to(torch.float32)
    assert ulps(_ieee.log32(x), x.double().log()).max() <= 3


def test_log1p32_accuracy_including_tiny_arguments():
    g = torch.Generator().manual_seed(1)
    t = torch.cat([torch.exp2(torch.empty(100_000).uniform_(-126, 0, generator=g)), torch.rand(100_000, generator=g)])
    t = t.to(torch.float32)
    assert ulps(_ieee.log1p32(t), t.double().log1p()).max() <= 3
    assert _ieee.log1p32(torch.zeros(3)).eq(0).all()


def test_exp32_accuracy_and_floor():
    g = torch.Generator().manual_seed(2)
    x = torch.empty(300_000).uniform_(-86, 0, generator=g).to(torch.float32)
    assert ulps(_ieee.exp32(x), x.double().exp()).max() <= 3
    assert _ieee.exp32(torch.tensor([0.0, -0.0])).eq(1).all()
    assert _ieee.exp32(torch.tensor([-86.5, -1e30, float("-inf")])).eq(0).all()


def test_gumbel_from_bits_matches_float64_transform():
    # the float64 transform, on a sample that includes both ends of each half
    x = torch.cat([torch.arange(0, 2**16), torch.randint(0, 2**32, (200_000,), generator=torch.Generator().manual_seed(3)),
                   2**31 + torch.arange(0, 2**16), 2**31 - 1 - torch.arange(0, 2**16)])
    # the top bit picks the half and the low 31 bits the distance t from that half's end:
    # u = t below 1/2 and u = 1 - t above, so -log(1 - u) is log1p(-t) or log(t)
    t = ((x & 0x7FFFFFFF).double() + 0.5) * 2.0**-32
    exp1 = torch.where(x < 2**31, -torch.log1p(-t), -torch.log(t))
    ref = -torch.log(exp1)
    got = _ieee.gumbel_from_bits(x)
    assert torch.isfinite(got).all()
    # relative precision of u near 1 is 2**-24 after the float32 conversion, so compare
    # with a tolerance in absolute terms near G = 0 and in ulps elsewhere
    err = (got.double() - ref).abs()
    assert (err <= 4e-7 * ref.abs().clamp(min=1.0)).all(), float(err.max())


def test_log_softmax32_close_to_torch_and_order_independent():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(16, 49152, generator=g) * 5
    z[3, ::7] = float("-inf")
    ours = _ieee.log_softmax32(z)
    ref = torch.log_softmax(z.double(), -1)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours))
    assert (ours[finite].double() - ref[finite]).abs().max() < 1e-5
    perm = torch.randperm(z.shape[1], generator=g)
    # exact: the fixed-point sum does not depend on the order of the vocabulary
    assert torch.equal(_ieee.log_softmax32(z[:, perm]), ours[:, perm])


def test_truncated_gumbel_matches_float64_formula():
    # U = g - softplus(a + g - m) across the series tail (z <= -9), the exact region and z > 0
    g_ = torch.Generator().manual_seed(5)
    a = -torch.rand(200_000, generator=g_) * 60
    g = -torch.log(-torch.log(torch.rand(200_000, generator=g_).clamp(1e-30, 1 - 1e-7)))
    m = torch.randn(200_000, generator=g_) * 2
    ref = g.double() - torch.nn.functional.softplus((a.double() + g.double()) - m.double())
    got = _ieee.truncated_gumbel(a, g, m)
    # a few ulps of the operands, plus float32's rounding of z = a + g - m carried by softplus' slope
    z = (a.double() + g.double()) - m.double()
    tol = 2.0**-22 * (ref.abs() + g.double().abs() + z.abs() * torch.sigmoid(z)) + 2.0**-60
    assert ((got.double() - ref).abs() <= tol).all()
    assert torch.equal(_ieee.truncated_gumbel(torch.tensor([float("-inf")]), g[:1], m[:1]), g[:1])


def test_fixed_point_bits_never_overflow():
    for vocab in (1, 2, 50257, 2**16, 2**16 + 1, 151936, 262144, 2**23):
        bits = _ieee.fixed_point_bits(vocab)
        assert vocab * 2**bits <= 2**62 and 23 <= bits <= 46
    with pytest.raises(ValueError, match="larger than cfgen supports"):
        _ieee.fixed_point_bits(2**23 + 1)


needs_native = pytest.mark.skipif(_native.library() is None, reason="native kernels unavailable (no C compiler)")


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a C compiler")
def test_native_kernels_build_in_ci():
    # otherwise every native test above would silently skip
    assert _native.library() is not None


def _with(monkeypatch, backend, fn):
    monkeypatch.setenv("CFGEN_BACKEND", backend)
    try:
        return fn()
    finally:
        monkeypatch.delenv("CFGEN_BACKEND")


@needs_native
@pytest.mark.parametrize("vocab", [1, 7, 8, 13, 1024, 5000])
def test_native_gumbel_bit_identical_to_eager(monkeypatch, vocab):
    seeds, steps = torch.arange(6) * 977 + 2**40, torch.arange(6)
    eager = _with(monkeypatch, "eager", lambda: cfgen.gumbel_noise(seeds, steps, vocab))
    native = _with(monkeypatch, "native", lambda: cfgen.gumbel_noise(seeds, steps, vocab))
    assert torch.equal(eager, native)


@needs_native
def test_native_gumbel_bit_identical_on_many_rows_and_threads(monkeypatch):
    # 64 x 49152 values, split across threads by the native path
    torch.set_num_threads(2)
    try:
        seeds = torch.arange(64)
        eager = _with(monkeypatch, "eager", lambda: cfgen.gumbel_noise(seeds, 5, 49152))
        native = _with(monkeypatch, "native", lambda: cfgen.gumbel_noise(seeds, 5, 49152))
    finally:
        torch.set_num_threads(1)
    assert torch.equal(eager, native)


SAMPLERS = [
    cfgen.Sampler(),
    cfgen.Sampler(temperature=0.7),
    cfgen.Sampler(top_k=3),
    cfgen.Sampler(temperature=1.3, top_p=0.8),
    cfgen.Sampler(temperature=0.0),
]


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
@pytest.mark.parametrize("vocab", [2, 9, 1031])
def test_native_posterior_bit_identical_to_eager(monkeypatch, sampler, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, 6, vocab, generator=g) * 4
    logits[0, 0] = 0.0  # all tied
    logits[1, 1, : vocab // 2] = -1e4  # extreme values
    noise = cfgen.gumbel_noise(torch.arange(30), 0, vocab).reshape(5, 6, vocab)
    tokens = sampler.sample(logits, noise)
    seeds = torch.arange(5)[:, None] + 100
    eager = _with(monkeypatch, "eager", lambda: cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds))
    native = _with(monkeypatch, "native", lambda: cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds))
    assert torch.equal(eager, native)
    assert torch.equal(sampler.sample(logits, native), tokens)


@needs_native
def test_native_posterior_skips_far_tokens_without_changing_bits(monkeypatch):
    # wide logits: whole vectors of tokens far below the maximum take the kernel's shortcut,
    # others the series tail or the exact formula; all must equal the eager result
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(12, 4096, generator=g) * 12
    tokens = cfgen.Sampler().sample(logits, cfgen.gumbel_noise(torch.arange(12), 0, 4096))
    eager = _with(monkeypatch, "eager", lambda: cfgen.posterior_noise(logits, tokens, seed=torch.arange(12)))
    native = _with(monkeypatch, "native", lambda: cfgen.posterior_noise(logits, tokens, seed=torch.arange(12)))
    assert torch.equal(eager, native)


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_native_log_probs_bit_identical_to_eager(monkeypatch, sampler):
    logits = torch.randn(3, 4, 1001, generator=torch.Generator().manual_seed(7)) * 6
    eager = _with(monkeypatch, "eager", lambda: sampler.log_probs(logits))
    native = _with(monkeypatch, "native", lambda: sampler.log_probs(logits))
    assert torch.equal(eager, native)


@needs_native
def test_native_posterior_reports_impossible_observation(monkeypatch):
    logits = torch.tensor([[0.0, 1.0, 5.0]])
    monkeypatch.setenv("CFGEN_BACKEND", "native")
    with pytest.raises(cfgen.ImpossibleObservation, match="token 0"):
        cfgen.posterior_noise(logits, torch.tensor([0]), sampler=cfgen.Sampler(top_k=1))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CFGEN_BACKEND", "turbo")
    with pytest.raises(ValueError, match="use one of auto, native, eager, compiled"):
        cfgen.gumbel_noise(0, 0, 4)


def test_prior_noise_is_pinned():
    # Regression pin of the transform on top of the pinned hash: changing either changes every text.
    got = cfgen.gumbel_noise(0, 0, 4)[0].tolist()
    assert got == [-0.30085623264312744, 0.21527479588985443, -0.5225127935409546, 0.6053664684295654]


def test_without_a_compiler_falls_back_to_eager_with_one_warning(tmp_path):
    # a fresh process whose C compiler always fails: auto warns once and gives the eager bits,
    # native raises and says why
    import subprocess
    import sys

    code = (
        "import os, warnings, torch, cfgen\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = cfgen.gumbel_noise(torch.arange(3), 0, 50)\n"
        "    b = cfgen.gumbel_noise(torch.arange(3), 1, 50)\n"
        "print(len(w), 'native CPU kernels are unavailable' in str(w[0].message))\n"
        "os.environ['CFGEN_BACKEND'] = 'eager'\n"
        "print(torch.equal(a, cfgen.gumbel_noise(torch.arange(3), 0, 50)))\n"
        "os.environ['CFGEN_BACKEND'] = 'native'\n"
        "try:\n"
        "    cfgen.gumbel_noise(0, 0, 5)\n"
        "except RuntimeError as err:\n"
        "    print('CFGEN_BACKEND=native' in str(err))\n"
    )
    env = {**os.environ, "CC": "false", "CFGEN_CACHE_DIR": str(tmp_path)}
    env.pop("CFGEN_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "True", "True"], out.stdout + out.stderr


# ---- the fast eager kernels (cfgen/_eager.py) against _ieee's whole-tensor formulas, bit for bit


def _reference_posterior(z, y, k1, k2, m):
    """The posterior as _ieee states it, whole tensors at once (the eager path before blocking)."""
    from cfgen import _eager

    a = _ieee.log_softmax32(z)
    a_y = a.gather(1, y[:, None])[:, 0]
    g = _ieee.gumbel_from_bits(_eager.bits(k1, k2, torch.arange(z.shape[1])))
    u = _ieee.truncated_gumbel(a, g, m[:, None])
    u.scatter_(1, y[:, None], (m - a_y)[:, None])
    _eager.ensure_argmax(a, u, y)
    return u


def _keys(n, stream=0):
    from cfgen import _eager

    seeds = torch.cat([torch.tensor([0, 1, -1, 2**40 + 3, 2**63 - 1]), torch.arange(n) * 7919])
    return _eager.row_keys(seeds, seeds % 101, stream)


@pytest.mark.parametrize("vocab", [1, 7, 8, 63, 64, 65, 1031, 49152])
def test_eager_gumbel_equals_reference_formula(vocab):
    from cfgen import _eager

    k1, k2 = _keys(11)
    ref = _ieee.gumbel_from_bits(_eager.bits(k1, k2, torch.arange(vocab)))
    assert torch.equal(_eager.gumbel(k1, k2, vocab), ref)


def test_eager_int32_hash_equals_int64_hash_and_block_size_changes_nothing(monkeypatch):
    # the int32 lanes wrap modulo 2**32 here (else the int64 fallback runs); both give the pinned bits
    from cfgen import _eager

    assert _eager._int32_wraps("cpu")
    k1, k2 = _keys(40)
    fast = _eager.gumbel(k1, k2, 3001)
    monkeypatch.setattr(_eager, "_int32_wraps", lambda device_type: False)
    assert torch.equal(_eager.gumbel(k1, k2, 3001), fast)
    monkeypatch.setattr(_eager, "_BLOCK", 3001 * 3)  # ragged last block of 3 rows
    assert torch.equal(_eager.gumbel(k1, k2, 3001), fast)


def test_eager_exp32_and_log_softmax_edge_cases():
    from cfgen import _eager

    x = torch.tensor([0.0, -0.0, -1e-30, -1e-7, -0.5, -1.0, -85.99, -86.0, -86.00001, -87.0, -1e30, float("-inf")])
    x = torch.cat([x, -torch.rand(5000, generator=torch.Generator().manual_seed(9)) * 100])[None]
    w = _eager._Work(x.shape, "cpu")
    out = torch.empty_like(x)
    _eager._exp32_(x, out, w.f[0], w.f[1], w.i[0])
    assert torch.equal(out, _ieee.exp32(x))
    z = torch.randn(6, 777, generator=torch.Generator().manual_seed(10)) * 30
    z[1, 1:] = float("-inf")  # one token in the support
    z[2, ::3] = float("-inf")
    z[3] = 0.0  # all tied
    z[4, :5] = 1e4
    assert torch.equal(_eager.log_softmax(z), _ieee.log_softmax32(z))
    assert torch.equal(_eager.log_softmax(z.reshape(2, 3, 777)), _ieee.log_softmax32(z).reshape(2, 3, 777))


def test_eager_truncated_equals_reference_across_regions():
    # z = a + g - m on both sides of the tail boundary -9 (exactly -9 included), above 0, and a = -inf
    from cfgen import _eager

    gen = torch.Generator().manual_seed(11)
    n = 4096
    g = _eager.gumbel(*_keys(3), n)[:4]
    m = torch.tensor([[0.0], [1.5], [-2.0], [7.0]])
    a = torch.empty(4, n).uniform_(-40.0, 0.0, generator=gen)
    a[:, :64] = (-9.0 + m - g[:, :64])  # z lands on or next to the boundary
    a[:, 64:128] = (m - g[:, 64:128]) + torch.linspace(-9.5, 3.0, 64)
    a[:, 128:160] = float("-inf")
    w = _eager._Work(a.shape, "cpu")
    got = g.clone()
    _eager._truncated_(a, got, m, w)
    assert torch.equal(got, _ieee.truncated_gumbel(a, g, m))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_eager_posterior_equals_reference_formula(sampler, monkeypatch):
    from cfgen import _eager

    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(9, 2053, generator=gen) * 6
    logits[0] = 0.0
    logits[1, :1000] = -1e4
    z = sampler.support_logits(logits)
    y = sampler.sample(logits, cfgen.gumbel_noise(torch.arange(9), 3, 2053))
    k1, k2 = _keys(4, stream=2)
    m = torch.randn(9, generator=gen)
    ref = _reference_posterior(z, y, k1, k2, m)
    assert torch.equal(_eager.posterior(z, y, k1, k2, m)[0], ref)
    monkeypatch.setattr(_eager, "_BLOCK", 2053 * 2)
    assert torch.equal(_eager.posterior(z, y, k1, k2, m)[0], ref)


@needs_native
@pytest.mark.parametrize("sampler", SAMPLERS[:4], ids=lambda s: s.describe())
def test_native_posterior_bit_identical_to_eager_at_bench_vocabulary(monkeypatch, sampler):
    # the benchmark's vocabulary (49152) with model-like and extreme logits: 2 rows x 12 steps
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 12, 49152, generator=gen) * 3
    logits[0, :4] = torch.randn(4, 49152, generator=gen) * 15
    logits[1, :2] = (torch.rand(2, 49152, generator=gen) * 2 - 1) * 1e4
    tokens = sampler.sample(logits, cfgen.gumbel_noise(torch.arange(24), 0, 49152).reshape(2, 12, 49152))
    seeds = torch.tensor([[5], [2**40]])
    eager = _with(monkeypatch, "eager", lambda: cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds))
    native = _with(monkeypatch, "native", lambda: cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds))
    assert torch.equal(eager, native)
    assert torch.equal(sampler.sample(logits, eager), tokens)
