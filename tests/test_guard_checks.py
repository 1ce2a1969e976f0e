"""Argument checks (cfgen.checks) and the model guard (locks, user hooks kept across pyvene's cleanup)."""

import doctest
import threading
import time

import numpy as np
import pytest
import torch

from cfgen import _guard, checks


def test_doctests():
    for mod in (checks, _guard):
        assert doctest.testmod(mod).failed == 0


@pytest.mark.parametrize("bad", [True, "12", [1.7], [True], 1.5, None, b"1", {"a": 1}])
def test_seeds_refuse_non_ints(bad):
    with pytest.raises(TypeError, match="seed"):
        checks.seeds(bad, 1)


def test_seeds_accept_ints_numpy_and_tensors():
    assert checks.seeds(np.int64(4), 2) == [4, 4]
    assert checks.seeds(torch.tensor([1, 2]), 2) == [1, 2]
    assert checks.seeds(np.array([3]), 1) == [3]
    with pytest.raises(ValueError, match="2 values for 3 prompts"):
        checks.seeds([1, 2], 3)


def test_seeds_leave_room_for_samples_below_2_63():
    assert checks.seeds(2**63 - 1, 1) == [2**63 - 1]
    with pytest.raises(ValueError, match="2\\*\\*63"):
        checks.seeds(2**63, 1)
    with pytest.raises(ValueError, match="seed \\+ j"):
        checks.seeds(2**63 - 2, 1, span=4)
    with pytest.raises(ValueError):
        checks.seeds(-1, 1)


def test_fresh_seeds_differ_and_leave_torch_rng_alone():
    state = torch.get_rng_state()
    a, b = checks.fresh_seed(), checks.fresh_seed()
    assert a != b and 0 <= a < 2**62
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("bad", [True, 0, -5, 1.5, "3"])
def test_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="max_new_tokens"):
        checks.positive_int(bad, "max_new_tokens")


@pytest.mark.parametrize("bad", [b"abc", [True, False], [1.0, 2.0], torch.tensor([1.0]), "ab"])
def test_token_ids_refuse_what_is_not_ids(bad):
    with pytest.raises(TypeError, match="observed"):
        checks.token_ids(bad, "observed[0]")


def test_token_ids_vocab_and_tensors():
    assert checks.token_ids(torch.tensor([1, 2]), "x", vocab_size=3) == [1, 2]
    assert checks.token_ids(np.array([0]), "x") == [0]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        checks.token_ids([5], "x", vocab_size=3)


def test_text_and_stop_strings():
    with pytest.raises(ValueError, match="empty"):
        checks.text("", "prompts[0]")
    with pytest.raises(ValueError, match="lone surrogate"):
        checks.text("ok \udc80", "prompts[0]")
    assert checks.stop_strings(None) == []
    assert checks.stop_strings(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="empty"):
        checks.stop_strings(["x", ""])
    with pytest.raises(TypeError):
        checks.stop_strings([1])


def test_memory_check_names_the_numbers():
    checks.check_memory(1, "x")
    with pytest.raises(MemoryError, match="GiB"):
        checks.check_memory(10 * 2**40, "the posterior noise")


def test_guard_restores_user_hooks_and_their_handles():
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    seen = []
    h1 = lin[0].register_forward_hook(lambda m, i, o: seen.append("post"))
    h2 = lin[0].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    h3 = lin[1].register_forward_hook(lambda m, a, k, o: seen.append("kw"), with_kwargs=True, always_call=True)
    with _guard.model_guard(lin):
        for m in lin.modules():  # pyvene's cleanup, plus a hook of its own that must not survive
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        lin[1].register_forward_hook(lambda m, i, o: seen.append("stray"))
    lin(torch.zeros(1, 2))
    assert seen == ["pre", "post", "kw"]
    for h in (h1, h2, h3):
        h.remove()
    seen.clear()
    lin(torch.zeros(1, 2))
    assert seen == []


def test_guard_restores_hooks_after_an_exception():
    lin = torch.nn.Linear(2, 2)
    h = lin.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(KeyboardInterrupt), _guard.model_guard(lin):
        lin._forward_hooks.clear()
        raise KeyboardInterrupt
    assert list(lin._forward_hooks) == [h.id]


def test_guard_serialises_calls_on_one_model():
    lin = torch.nn.Linear(2, 2)
    inside, overlaps = [0], []

    def work():
        with _guard.model_guard(lin):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.02)
            inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1] * 6
    assert _guard.model_lock(lin) is _guard.model_lock(lin)
