import doctest
import functools
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cfgen
from cfgen import metrics
from cfgen.metrics import (
    EffectSummary,
    SequenceLogProb,
    changed_fraction,
    effect_summary,
    first_divergence,
    levenshtein,
    normalized_levenshtein,
    normalized_shared_prefix,
    sequence_log_prob,
    shared_prefix,
)

PAIR_FUNCS = [shared_prefix, normalized_shared_prefix, first_divergence, levenshtein, normalized_levenshtein, changed_fraction]
START_FUNCS = [shared_prefix, normalized_shared_prefix, levenshtein, normalized_levenshtein, changed_fraction]
PROPS = settings(max_examples=150, deadline=None)


# --------------------------------------------------------------------------- references


def brute_levenshtein(a, b):
    """The recursive definition, memoised (independent of the library's bit-parallel code)."""
    a, b = tuple(a), tuple(b)

    @functools.cache
    def d(i, j):
        if i == 0:
            return j
        if j == 0:
            return i
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def matrix_levenshtein(a, b):
    """Full-matrix Wagner-Fischer for longer inputs."""
    D = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        D[i][0] = i
    for j in range(len(b) + 1):
        D[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = min(D[i - 1][j] + 1, D[i][j - 1] + 1, D[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return D[-1][-1]


tokens = st.lists(st.integers(0, 3), max_size=12)
texts = st.text(alphabet="abc", max_size=12)
seqs = st.one_of(tokens, texts)


# --------------------------------------------------------------------------- hand-computed cases

CASES = [
    # a, b, shared, norm_shared, first_div, lev, norm_lev, changed
    ([], [], 0, 1.0, None, 0, 0.0, 0.0),
    ("", "", 0, 1.0, None, 0, 0.0, 0.0),
    ([1, 2, 3], [1, 2, 3], 3, 1.0, None, 0, 0.0, 0.0),
    ("abc", "abc", 3, 1.0, None, 0, 0.0, 0.0),
    ([], [4, 5], 0, 0.0, 0, 2, 1.0, 1.0),
    ([4, 5, 6], [], 0, 0.0, 0, 3, 1.0, 1.0),
    ("", "xy", 0, 0.0, 0, 2, 1.0, 1.0),
    ([1, 2], [1, 2, 3, 4], 2, 0.5, 2, 2, 0.5, 0.5),
    ([5, 6, 7, 8], [5, 6, 9], 2, 0.5, 2, 2, 0.5, 0.5),
    ([1, 2, 3, 4], [1, 3, 4, 5], 1, 0.25, 1, 2, 0.5, 0.75),
    ([1, 2, 3, 4], [2, 3, 4], 0, 0.0, 0, 1, 0.25, 1.0),
    ("kitten", "sitting", 0, 0.0, 0, 3, 3 / 7, 3 / 7),
    ("the cat", "the dog", 4, 4 / 7, 4, 3, 3 / 7, 3 / 7),
    ("flaw", "lawn", 0, 0.0, 0, 2, 0.5, 1.0),
    ([7], [8], 0, 0.0, 0, 1, 1.0, 1.0),
]


@pytest.mark.parametrize("a,b,sp,nsp,fd,lev,nlev,cf", CASES)
def test_hand_computed(a, b, sp, nsp, fd, lev, nlev, cf):
    assert shared_prefix(a, b) == sp
    assert normalized_shared_prefix(a, b) == pytest.approx(nsp)
    assert first_divergence(a, b) == fd
    assert levenshtein(a, b) == lev
    assert normalized_levenshtein(a, b) == pytest.approx(nlev)
    assert changed_fraction(a, b) == pytest.approx(cf)
    # and the same with the roles swapped (all six are symmetric)
    assert (shared_prefix(b, a), first_divergence(b, a), levenshtein(b, a)) == (sp, fd, lev)
    assert changed_fraction(b, a) == pytest.approx(cf)


def test_return_types():
    assert type(shared_prefix([1], [1])) is int
    assert type(levenshtein("a", "b")) is int
    for f in (normalized_shared_prefix, normalized_levenshtein, changed_fraction):
        assert type(f([1, 2], [1, 3])) is float
        assert type(f([], [])) is float


def test_strings_match_their_code_points():
    pairs = [("kitten", "sitting"), ("abc", ""), ("naïve ☃", "naive ☃!")]
    for a, b in pairs:
        ta, tb = [ord(c) for c in a], [ord(c) for c in b]
        for f in PAIR_FUNCS:
            assert f(a, b) == f(ta, tb)


def test_start():
    a, b = [9, 9, 1, 2], [8, 8, 1, 3]
    assert shared_prefix(a, b) == 0
    assert shared_prefix(a, b, start=2) == 1
    assert normalized_shared_prefix(a, b, start=2) == 0.5
    assert levenshtein(a, b, start=2) == 1
    assert normalized_levenshtein(a, b, start=2) == 0.5
    assert changed_fraction(a, b, start=2) == 0.5
    assert changed_fraction(a, b, start=3) == 1.0
    # start at one length: the other suffix is all changed
    assert changed_fraction([1, 2], [1, 2, 3, 4], start=2) == 1.0
    assert normalized_levenshtein([1, 2], [1, 2, 3, 4], start=2) == 1.0
    assert normalized_shared_prefix([1, 2], [1, 2, 3, 4], start=2) == 0.0


@pytest.mark.parametrize("start", [4, 5, 100])
def test_start_beyond_length(start):
    a, b = [1, 2, 3, 4], "abcd"
    for x in (a, b):
        assert shared_prefix(x, x[::-1], start=start) == 0
        assert normalized_shared_prefix(x, x[::-1], start=start) == 1.0
        assert levenshtein(x, x[::-1], start=start) == 0
        assert normalized_levenshtein(x, x[::-1], start=start) == 0.0
        assert changed_fraction(x, x[::-1], start=start) == 0.0
    # beyond one sequence only
    assert changed_fraction([1, 2], [1, 2, 3, 4, 5, 6], start=4) == 1.0
    assert levenshtein([1, 2], [1, 2, 3, 4, 5, 6], start=4) == 2


def test_start_zero_is_default():
    a, b = [1, 2, 3, 4], [1, 3, 4, 5]
    for f in START_FUNCS:
        assert f(a, b) == f(a, b, start=0) == f(a, b, start=None)


# --------------------------------------------------------------------------- input forms and batches


def test_sequence_types_agree():
    a, b = [1, 2, 3, 4], [1, 3, 4, 5]
    forms = [
        (a, b),
        (tuple(a), tuple(b)),
        (torch.tensor(a), torch.tensor(b)),
        (np.array(a), np.array(b)),
        ([np.int64(x) for x in a], [torch.tensor(x) for x in b]),
    ]
    for f in PAIR_FUNCS:
        expected = f(a, b)
        for x, y in forms:
            assert f(x, y) == expected, (f.__name__, type(x))


BATCH_A = [[1, 2, 3, 4], [], [5], [1, 2], [3, 3, 3], [7, 8, 9]]
BATCH_B = [[1, 3, 4, 5], [], [], [1, 2, 3, 4], [3, 3, 3], [9, 8, 7]]
STR_A = ["kitten", "", "the cat", "same", "ab"]
STR_B = ["sitting", "x", "the dog", "same", ""]


@pytest.mark.parametrize("f", PAIR_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("A,B", [(BATCH_A, BATCH_B), (STR_A, STR_B)], ids=["tokens", "strings"])
def test_batch_equals_per_row(f, A, B):
    assert f(A, B) == [f(a, b) for a, b in zip(A, B, strict=True)]
    assert f(tuple(A), tuple(B)) == f(A, B)


@pytest.mark.parametrize("f", START_FUNCS, ids=lambda f: f.__name__)
def test_batch_start_int_and_per_row(f):
    assert f(BATCH_A, BATCH_B, start=1) == [f(a, b, start=1) for a, b in zip(BATCH_A, BATCH_B, strict=True)]
    starts = [0, 3, 1, 2, 0, 10]
    assert f(BATCH_A, BATCH_B, start=starts) == [
        f(a, b, start=s) for a, b, s in zip(BATCH_A, BATCH_B, starts, strict=True)
    ]
    assert f(BATCH_A, BATCH_B, start=torch.tensor(starts)) == f(BATCH_A, BATCH_B, start=starts)


def test_batch_tensor_forms():
    A = torch.tensor([[1, 2, 3], [4, 5, 6]])
    B = torch.tensor([[1, 2, 4], [4, 5, 6]])
    assert levenshtein(A, B) == [1, 0]
    assert first_divergence(A, B) == [2, None]
    assert shared_prefix(list(A), list(B)) == [2, 3]  # a list of 1-D tensors
    assert shared_prefix(np.array([[1, 2]]), np.array([[1, 3]])) == [1]


def test_mixed_string_and_token_batch_rows():
    # Rows may differ in kind as long as each pair agrees.
    assert levenshtein(["ab", [1, 2]], ["ac", [1, 2, 3]]) == [1, 1]


def test_empty_batches_and_empty_list_reading():
    assert levenshtein([], []) == 0  # two empty token sequences
    assert shared_prefix([[]], [[]]) == [0]
    assert normalized_shared_prefix([[]], [[]]) == [1.0]
    with pytest.raises(ValueError, match="batch lengths differ"):
        levenshtein([], [[1, 2]])  # next to a batch, [] is an empty batch


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("f", PAIR_FUNCS, ids=lambda f: f.__name__)
def test_errors(f):
    with pytest.raises(ValueError, match="batch lengths differ: 2 factual and 1"):
        f([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="batch lengths differ"):
        f(["a", "b"], ["a"])
    for bad in (5, None, 1.5, {1, 2}, {1: 2}, b"bytes", iter([1, 2])):
        with pytest.raises(TypeError, match="must be a string"):
            f(bad, [1, 2])
        with pytest.raises(TypeError, match="must be a string"):
            f([1, 2], bad)
    with pytest.raises(TypeError, match="both be strings or both be token-id"):
        f("abc", [1, 2, 3])
    with pytest.raises(TypeError, match=r"a\[1\] and b\[1\]"):
        f(["ab", "cd"], ["ab", [1, 2]])
    with pytest.raises(TypeError, match="both be single sequences or both be batches"):
        f([1, 2], [[1, 2]])
    with pytest.raises(TypeError, match="mixes token ids"):
        f([1, [2]], [1, 2])
    with pytest.raises(TypeError, match=r"a\[1\] must be an integer token id"):
        f([1, 2.5], [1, 2])
    with pytest.raises(TypeError, match="integer token ids"):
        f(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        f(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long))


@pytest.mark.parametrize("f", START_FUNCS, ids=lambda f: f.__name__)
def test_start_errors(f):
    with pytest.raises(ValueError, match="start must be >= 0"):
        f([1, 2], [1, 2], start=-1)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="start must be a non-negative int"):
            f([1, 2], [1, 2], start=bad)
    with pytest.raises(TypeError, match="needs batches"):
        f([1, 2], [1, 2], start=[0, 1])
    with pytest.raises(ValueError, match="start has 1 values for a batch of 2"):
        f([[1], [2]], [[1], [2]], start=[0])
    with pytest.raises(ValueError, match=r"start\[1\] must be >= 0"):
        f([[1], [2]], [[1], [2]], start=[0, -2])


# --------------------------------------------------------------------------- levenshtein properties


@PROPS
@given(seqs, seqs)
def test_levenshtein_matches_brute_force(a, b):
    if isinstance(a, str) != isinstance(b, str):
        b = [ord(c) % 4 for c in b] if isinstance(b, str) else "".join("abcd"[x] for x in b)
    assert levenshtein(a, b) == brute_levenshtein(a, b)


def test_levenshtein_long_inputs_match_matrix():
    # Lengths well past 64 exercise multi-word bit vectors; small alphabets give many matches.
    rng = random.Random(0)
    for _ in range(40):
        k = rng.choice([2, 3, 5, 50])
        a = [rng.randrange(k) for _ in range(rng.randint(0, 180))]
        b = [rng.randrange(k) for _ in range(rng.randint(0, 180))]
        if rng.random() < 0.3:  # near-duplicates: shared prefix/suffix stripping
            b = a[:] if a else b
            for _ in range(rng.randint(0, 4)):
                if b:
                    b[rng.randrange(len(b))] = k
        assert levenshtein(a, b) == matrix_levenshtein(a, b)


def test_levenshtein_is_fast():
    rng = random.Random(1)
    a = [rng.randrange(50000) for _ in range(500)]
    b = [rng.randrange(50000) for _ in range(500)]
    import time

    t = time.perf_counter()
    assert levenshtein([a] * 20, [b] * 20) == [levenshtein(a, b)] * 20
    assert time.perf_counter() - t < 2.0
    assert levenshtein(a, a[:250] + [0] + a[250:]) == 1


@PROPS
@given(tokens, tokens, tokens)
def test_levenshtein_metric_properties(a, b, c):
    dab = levenshtein(a, b)
    assert dab == levenshtein(b, a)
    assert (dab == 0) == (a == b)
    assert abs(len(a) - len(b)) <= dab <= max(len(a), len(b))
    assert levenshtein(a, c) <= dab + levenshtein(b, c)
    assert 0.0 <= normalized_levenshtein(a, b) <= 1.0


@PROPS
@given(texts, texts)
def test_string_metric_properties(a, b):
    d = levenshtein(a, b)
    assert d == levenshtein(b, a)
    assert (d == 0) == (a == b)
    assert d <= max(len(a), len(b))


@PROPS
@given(seqs, seqs, st.integers(0, 15))
def test_pair_metric_relations(a, b, start):
    if isinstance(a, str) != isinstance(b, str):
        b = [ord(c) % 4 for c in b] if isinstance(b, str) else "".join("abcd"[x] for x in b)
    x, y = a[start:], b[start:]
    n = max(len(x), len(y))
    sp = shared_prefix(a, b, start=start)
    assert sp == shared_prefix(x, y) and sp <= min(len(x), len(y))
    assert all(x[i] == y[i] for i in range(sp))
    fd = first_divergence(x, y)
    assert (fd is None) == (x == y)
    assert fd is None or fd == sp
    nsp = normalized_shared_prefix(a, b, start=start)
    cf = changed_fraction(a, b, start=start)
    nlev = normalized_levenshtein(a, b, start=start)
    assert 0.0 <= nsp <= 1.0 and 0.0 <= cf <= 1.0 and 0.0 <= nlev <= 1.0
    assert nlev == (levenshtein(x, y) / n if n else 0.0)
    # Hamming distance with the length tail is an upper bound on the edit distance.
    assert cf * n == pytest.approx(sum(p != q for p, q in zip(x, y, strict=False)) + abs(len(x) - len(y)))
    assert nlev <= cf + 1e-12
    if x == y:
        assert (nsp, cf, nlev) == (1.0, 0.0, 0.0)
    else:
        assert nsp < 1.0 and cf > 0.0 and nlev > 0.0


# --------------------------------------------------------------------------- sequence_log_prob


def _logits(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def test_log_prob_manual_sum():
    logits = _logits(5, 11)
    toks = [3, 0, 10, 7, 7]
    lp = sequence_log_prob(logits, toks)
    assert isinstance(lp, SequenceLogProb)
    manual = [torch.log_softmax(logits[t], -1)[toks[t]].item() for t in range(5)]
    probs = [torch.softmax(logits[t].double(), -1)[toks[t]].item() for t in range(5)]
    assert lp.per_token.shape == (5,) and lp.total.shape == ()
    assert lp.per_token.tolist() == pytest.approx(manual, abs=1e-5)
    assert lp.total.item() == pytest.approx(sum(manual), abs=1e-4)
    assert lp.total.item() == pytest.approx(math.log(math.prod(probs)), abs=1e-4)
    assert lp.per_token.dtype == torch.float32
    # tensors and lists agree
    assert torch.equal(sequence_log_prob(logits, torch.tensor(toks)).per_token, lp.per_token)


def test_log_prob_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    lp = sequence_log_prob(logits, [1, 2])
    assert lp.per_token.tolist() == pytest.approx([math.log(0.25), math.log(0.8)], abs=1e-6)
    assert lp.total.item() == pytest.approx(math.log(0.2), abs=1e-6)
    empty = sequence_log_prob(torch.zeros(0, 3), [])
    assert empty.total.item() == 0.0 and empty.per_token.shape == (0,)


@pytest.mark.parametrize(
    "sampler",
    [cfgen.Sampler(), cfgen.Sampler(temperature=0.7), cfgen.Sampler(top_k=3), cfgen.Sampler(top_p=0.8),
     cfgen.Sampler(temperature=0.0)],
    ids=lambda s: s.describe(),
)
def test_log_prob_under_sampler(sampler):
    logits = _logits(6, 9, seed=1)
    lp_all = sampler.log_probs(logits)
    toks = lp_all.argmax(-1).tolist()  # always inside the support
    toks[2] = int(logits[2].argsort()[-2])  # second most likely: outside top-1 / greedy
    lp = sequence_log_prob(logits, toks, sampler)
    manual = [lp_all[t, toks[t]].item() for t in range(6)]
    assert lp.per_token.tolist() == pytest.approx(manual, abs=1e-5)
    expected = sum(manual)
    if math.isinf(expected):
        assert lp.total.item() == -math.inf
    else:
        assert lp.total.item() == pytest.approx(expected, abs=1e-4)
    if sampler == cfgen.Sampler():
        assert torch.allclose(lp.per_token, sequence_log_prob(logits, toks).per_token)


def test_log_prob_outside_support_is_minus_inf():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sequence_log_prob(logits, [2], cfgen.Sampler(top_k=2)).total.item() == -math.inf
    assert math.isfinite(sequence_log_prob(logits, [2]).total.item())


def test_log_prob_batch_with_mask():
    logits = _logits(3, 4, 7, seed=2)
    toks = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lp = sequence_log_prob(logits, toks, mask=mask)
    assert lp.total.shape == (3,) and lp.per_token.shape == (3, 4)
    for b, n in enumerate([4, 2, 0]):
        row = sequence_log_prob(logits[b, :n], toks[b, :n])
        assert lp.total[b].item() == pytest.approx(row.total.item(), abs=1e-5)
        assert torch.allclose(lp.per_token[b, :n], row.per_token)
        assert (lp.per_token[b, n:] == 0).all()
    # int 0/1 masks and lists work too
    assert torch.equal(sequence_log_prob(logits, toks.tolist(), mask=mask.int().tolist()).total, lp.total)
    # no mask: every position counts
    full = sequence_log_prob(logits, toks)
    assert torch.allclose(full.total, full.per_token.sum(-1))


def test_log_prob_ragged_lists_build_the_mask():
    logits = _logits(3, 4, 7, seed=3)
    rows = [[1, 2, 3, 4], [6, 5], []]
    lp = sequence_log_prob(logits, rows)
    for b, r in enumerate(rows):
        ref = sequence_log_prob(logits[b, : len(r)], r)
        assert lp.total[b].item() == pytest.approx(ref.total.item(), abs=1e-5)
    assert lp.per_token[1, 2:].tolist() == [0.0, 0.0]


def test_log_prob_padding_outside_support_is_not_nan():
    # Padded positions whose (pad) token has probability 0 under the sampler must not poison the total.
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    lp = sequence_log_prob(logits, [[0]], cfgen.Sampler(top_k=1))
    assert lp.total.item() == 0.0 and not torch.isnan(lp.per_token).any()


def test_log_prob_dtypes_and_grad():
    l64 = _logits(4, 5, dtype=torch.float64)
    assert sequence_log_prob(l64, [0, 1, 2, 3]).total.dtype == torch.float64
    l16 = _logits(4, 5).to(torch.bfloat16)
    lp16 = sequence_log_prob(l16, [0, 1, 2, 3])
    assert lp16.total.dtype == torch.float32
    assert lp16.total.item() == pytest.approx(sequence_log_prob(l16.float(), [0, 1, 2, 3]).total.item())
    lg = _logits(4, 5).requires_grad_()
    sequence_log_prob(lg, [0, 1, 2, 3]).total.backward()
    assert lg.grad is not None and torch.allclose(lg.grad.sum(-1), torch.zeros(4), atol=1e-6)


def test_log_prob_errors():
    logits = _logits(3, 5)
    with pytest.raises(ValueError, match="tokens shape"):
        sequence_log_prob(logits, [1, 2])
    with pytest.raises(ValueError, match=r"token id 5 is outside the vocabulary \[0, 5\)"):
        sequence_log_prob(logits, [1, 2, 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence_log_prob(logits, [1, -1, 2])
    with pytest.raises(TypeError, match="not a string"):
        sequence_log_prob(logits, "abc")
    with pytest.raises(TypeError, match="integer token ids"):
        sequence_log_prob(logits, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"\[T, V\] or \[B, T, V\]"):
        sequence_log_prob(_logits(5), [1])
    with pytest.raises(ValueError, match="mask shape"):
        sequence_log_prob(logits, [1, 2, 3], mask=[1, 1])
    with pytest.raises(ValueError, match="NaN"):
        sequence_log_prob(torch.tensor([[0.0, float("nan")]]), [0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        sequence_log_prob([[0.0, 1.0]], [0])
    with pytest.raises(TypeError, match="cfgen.Sampler"):
        sequence_log_prob(logits, [1, 2, 3], sampler={"top_k": 2})
    batch = _logits(2, 3, 5)
    with pytest.raises(ValueError, match="3 rows but logits has batch size 2"):
        sequence_log_prob(batch, [[1], [2], [3]])
    with pytest.raises(ValueError, match=r"tokens\[1\] has 4 tokens but logits only 3 steps"):
        sequence_log_prob(batch, [[1], [2, 2, 2, 2]])
    with pytest.raises(TypeError, match="not strings"):
        sequence_log_prob(batch, ["ab", "cd"])


# --------------------------------------------------------------------------- effect_summary


def test_effect_summary_hand_computed():
    s = effect_summary([[1, 2, 3, 4], [5, 6], [], [1, 2]], [[1, 2, 9, 4], [5, 6], [], [3]])
    assert isinstance(s, EffectSummary) and len(s) == 4
    assert s.identical == [False, True, True, False]
    assert s.first_divergence == [2, None, None, 0]
    assert s.shared_prefix == [2, 2, 0, 0]
    assert s.normalized_shared_prefix == [0.5, 1.0, 1.0, 0.0]
    assert s.levenshtein == [1, 0, 0, 2]
    assert s.normalized_levenshtein == [0.25, 0.0, 0.0, 1.0]
    assert s.changed_fraction == [0.25, 0.0, 0.0, 1.0]
    assert s.factual_length == [4, 2, 0, 2] and s.counterfactual_length == [4, 2, 0, 1]
    agg = s.aggregate()
    assert agg["fraction_identical"] == 0.5
    assert agg["mean_shared_prefix"] == 1.0
    assert agg["mean_normalized_shared_prefix"] == pytest.approx(0.625)
    assert agg["median_normalized_shared_prefix"] == 0.75
    assert agg["mean_levenshtein"] == 0.75
    assert agg["mean_normalized_levenshtein"] == pytest.approx(0.3125)
    assert agg["mean_changed_fraction"] == pytest.approx(0.3125)
    assert agg["mean_first_divergence"] == 1.0


@pytest.mark.parametrize("start", [None, 0, 1, 3, [0, 3, 1, 2, 0, 10]])
def test_effect_summary_matches_functions(start):
    s = effect_summary(BATCH_A, BATCH_B, start=start)
    assert s.shared_prefix == shared_prefix(BATCH_A, BATCH_B, start=start)
    assert s.normalized_shared_prefix == normalized_shared_prefix(BATCH_A, BATCH_B, start=start)
    assert s.levenshtein == levenshtein(BATCH_A, BATCH_B, start=start)
    assert s.normalized_levenshtein == normalized_levenshtein(BATCH_A, BATCH_B, start=start)
    assert s.changed_fraction == changed_fraction(BATCH_A, BATCH_B, start=start)
    starts = s.start
    assert starts == ([0] * 6 if start is None else [start] * 6 if isinstance(start, int) else start)
    for i, (a, b) in enumerate(zip(BATCH_A, BATCH_B, strict=True)):
        d = first_divergence(a[starts[i]:], b[starts[i]:])
        assert s.first_divergence[i] == (None if d is None else d + starts[i])
        assert s.identical[i] == (a[starts[i]:] == b[starts[i]:])


def test_effect_summary_strings_single_pair_and_records():
    s = effect_summary(STR_A, STR_B)
    assert s.levenshtein == levenshtein(STR_A, STR_B)
    one = effect_summary([1, 2, 3], [1, 2, 4], start=2)
    assert len(one) == 1 and one.first_divergence == [2] and one.changed_fraction == [1.0]
    assert effect_summary("abc", "abc").identical == [True]
    recs = s.to_records()
    assert len(recs) == len(STR_A) and recs[0]["levenshtein"] == 3 and set(recs[0]) == set(s.to_dict()["per_row"])


def test_effect_summary_to_dict_is_json():
    s = effect_summary(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 0, 6]]))
    d = s.to_dict()
    assert d["n"] == 2 and d["fraction_identical"] == 0.5
    assert d["per_row"]["first_divergence"] == [None, 1]
    assert json.loads(json.dumps(d, allow_nan=False)) == d


def test_effect_summary_empty_batch_and_no_divergence():
    s = effect_summary([[]], [[]])
    assert s.aggregate()["mean_first_divergence"] is None and s.aggregate()["fraction_identical"] == 1.0
    empty = EffectSummary(*([[]] * 10))
    assert len(empty) == 0 and all(v is None for v in empty.aggregate().values())
    json.dumps(empty.to_dict(), allow_nan=False)


def test_effect_summary_errors():
    with pytest.raises(ValueError, match="batch lengths differ"):
        effect_summary([[1], [2]], [[1]])
    with pytest.raises(TypeError):
        effect_summary(None, [[1]])
    with pytest.raises(ValueError, match="start has 1 values"):
        effect_summary([[1], [2]], [[1], [2]], start=[0])


# --------------------------------------------------------------------------- docs


def test_doctests():
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 15 and result.failed == 0


def test_every_public_function_has_an_example():
    for name in metrics.__all__:
        doc = getattr(metrics, name).__doc__ or ""
        if callable(getattr(metrics, name)) and not isinstance(getattr(metrics, name), type):
            assert ">>>" in doc, name
