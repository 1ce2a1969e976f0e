"""A model split over two accelerators by accelerate gives the one-device model's tokens, with pyvene interventions.

No GPU is needed: ``tests/_virtual_devices.py`` runs every operation on the CPU
while reporting and checking device placement as two GPUs would (an operation
with operands on two devices fails, as on CUDA). The devices are torch's
PrivateUse1 backend, registered from Python under the name ``vgpu``.

What this catches: pyvene 0.1.8 builds its gather / scatter indices on
``model.device`` (the first device), so an intervention on a layer that runs on
the second device fails in pyvene itself; interventions (a DAS rotation, a
stored steering vector) and per-call source representations built on another
device than their layer's; cfgen's schedule masks made on the input device.

Registering the emulated backend is process-wide and cannot be undone (torch.accelerator
and accelerate would report ``vgpu`` to every later test), so ``test_devices.py`` runs
this file in its own process: ``python -m pytest tests/devices_cases.py``.
"""

import pytest
import pyvene as pv
import torch

import cfgen
import cfgen.tokens as ct

from ._virtual_devices import VirtualDevices, register
from .conftest import CharTokenizer, tiny_llama

accelerate = pytest.importorskip("accelerate")

TOK = CharTokenizer()
D = 16
# Embeddings, layer 0 and the rotary table on the first device; layer 1, the norm and the head on the second.
SPLIT = {"model.embed_tokens": "vgpu:0", "model.rotary_emb": "vgpu:0", "model.layers.0": "vgpu:0",
         "model.layers.1": "vgpu:1", "model.norm": "vgpu:1", "lm_head": "vgpu:1"}
ONE = {name: "vgpu:0" for name in SPLIT}


@pytest.fixture(scope="module", autouse=True)
def vgpu():
    if not register():
        pytest.skip(f"torch's PrivateUse1 backend already has another name: {torch._C._get_privateuse1_backend_name()}")
    import accelerate.utils.modeling as modeling

    # accelerate empties the device cache after each move; a Python backend has no allocator to empty
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling, "clear_device_cache", lambda *a, **k: None)
        yield


def model_on(device_map, dtype=torch.float32):
    model = tiny_llama(vocab_size=40, init=0.4).to(dtype).requires_grad_(False)
    if device_map is None:
        return model
    return accelerate.dispatch_model(model, device_map=device_map)


def steer(model):  # a stored vector, built on the CPU
    return pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention":
                                 pv.AdditionIntervention(embed_dim=D, source_representation=torch.linspace(-3, 3, D))},
                                model)


def patch(model):
    return pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.VanillaIntervention()},
                                model)


def das(model):  # a rotation whose weights sit on the CPU
    torch.manual_seed(0)
    iv = pv.RotatedSpaceIntervention(embed_dim=D, keep_last_dim=True)
    return pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": iv}, model)


def calls(build):
    """(name, function of a wrapped model) pairs covering the front-ends and the ways to give an intervention."""
    kw = dict(max_new_tokens=6, seed=1, temperature=1.0)
    prompts = ["abcd", "hello"]
    cases = []
    if build is steer:
        cases.append(("generate", lambda pm: cfgen.generate(pm, TOK, prompts, interventional=True, **kw)))
        cases.append(("counterfactual", lambda pm: cfgen.counterfactual(
            pm, TOK, prompts, [[5, 6, 7, 8, 9], [10, 11, 12]], num_samples=2, seed=3, temperature=1.0)))
        cases.append(("do", lambda pm: ct.do(pm, TOK, cfgen.generate(pm, TOK, prompts, **kw), {2: 7})))
    elif build is patch:
        cases.append(("interchange", lambda pm: cfgen.generate(
            pm, TOK, prompts, sources=["hello there", "zzzz"],
            unit_locations={"sources->base": ([[[3], [1]]], [[[2], [4]]])}, **kw)))
        cases.append(("per-call vector", lambda pm: cfgen.generate(
            pm.__class__({"layer": 1, "component": "block_output",
                          "intervention": pv.AdditionIntervention(embed_dim=D)}, pm.model),
            TOK, prompts, source_representations=torch.linspace(3, -3, D), intervene_on="all", **kw)))
    else:
        cases.append(("das", lambda pm: cfgen.generate(
            pm, TOK, prompts, sources=["hello there", "zzzz"], subspaces=[[[0, 1, 2, 3]]] * 2,
            unit_locations={"sources->base": ([[[3], [1]]], [[[3], [4]]])}, **kw)))
    return cases


def texts(result):
    return [result.factual_ids, result.counterfactual_ids, getattr(result, "interventional_ids", None)]


@pytest.mark.parametrize("build", [steer, patch, das], ids=["steer", "patch", "das"])
def test_split_model_gives_the_one_device_tokens(build):
    reference = {name: texts(fn(build(model_on(None)))) for name, fn in calls(build)}
    assert any(r[0] != r[1] for r in reference.values()), "the interventions change no token: a vacuous test"
    with VirtualDevices():
        for device_map in (ONE, SPLIT):
            model = model_on(device_map)
            assert {p.device for p in model.model.layers[1].parameters()} == {torch.device(device_map["model.layers.1"])}
            for name, fn in calls(build):
                pm = build(model)
                before = {k: _device(iv) for k, iv in pm.interventions.items()}
                got = texts(fn(pm))
                assert got == reference[name], (name, device_map is SPLIT)
                assert {k: _device(iv) for k, iv in pm.interventions.items()} == before  # left where they were
                assert "get_device" not in vars(pm)  # pyvene's own method again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_split_model(dtype):
    """bf16 / fp16 weights: the noise stays float32 on the logits' device, the tokens match the one-device model."""
    def steer_half(model):
        iv = pv.AdditionIntervention(embed_dim=D, source_representation=torch.linspace(-10, 10, D).to(dtype))
        return pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": iv}, model)

    kw = dict(max_new_tokens=6, seed=1, temperature=1.0, interventional=True)
    reference = texts(cfgen.generate(steer_half(model_on(None, dtype)), TOK, ["abcd", "hello"], **kw))
    assert reference[0] != reference[1]
    with VirtualDevices():
        got = texts(cfgen.generate(steer_half(model_on(SPLIT, dtype)), TOK, ["abcd", "hello"], **kw))
    assert got == reference


def test_scopes_on_a_device():
    """Jacobian scopes (a backward pass) on a model placed on the accelerator give the CPU's scores.

    One device only: torch's autograd engine knows one device of a Python backend, so a backward pass
    through ``vgpu:1`` cannot run in this emulation (on real GPUs it can)."""
    import cfgen.scopes

    ref = cfgen.scopes.jacobian_scopes(model_on(None), [5, 6, 7, 8], target=9, tokenizer=TOK)
    with VirtualDevices():
        got = cfgen.scopes.jacobian_scopes(model_on(ONE), [5, 6, 7, 8], target=9, tokenizer=TOK)
    assert set(got) == set(ref) == {"semantic", "temperature", "fisher"}
    for kind in ref:  # off the CPU transformers' forward differs in the last bits: equal up to rounding
        assert torch.allclose(got[kind].scores, ref[kind].scores, rtol=1e-4, atol=1e-5), kind


def test_a_model_on_two_devices_without_hooks_is_refused_up_front():
    with VirtualDevices():
        model = tiny_llama(vocab_size=40).requires_grad_(False)
        model.model.layers[1].to("vgpu:1")  # moved by hand: nothing moves the activations across
        with pytest.raises(ValueError, match=r"2 devices \(cpu, vgpu:1\).*dispatch_model"):
            cfgen.generate(steer(model), TOK, ["abcd"], max_new_tokens=2, seed=0)


def test_virtual_devices_refuse_mixed_operands():
    """The emulation is strict where CUDA is: without it the test above could not fail."""
    with VirtualDevices():
        a, b = torch.ones(3, device="vgpu:0"), torch.ones(3, device="vgpu:1")
        with pytest.raises(RuntimeError, match="same device"):
            a + b
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(3) * a  # a CPU vector with a device one
        assert (a + torch.tensor(2.0)).device == torch.device("vgpu:0")  # a 0-dim CPU scalar may join
        assert torch.equal((a * 2).to("cpu"), torch.full((3,), 2.0))


def test_noise_and_posterior_on_a_device_are_the_cpu_bits():
    """The device code paths (block sizes, int32 check per device type, no C kernel) give the CPU's bits."""
    seeds, steps = torch.tensor([0, 7, 2**40 + 3]), torch.tensor([0, 5, 9])
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)) * 3
    tokens = logits.argmax(-1)
    sampler = cfgen.Sampler(temperature=0.7, top_k=50)
    cpu = (cfgen.gumbel_noise(seeds, steps, 1000, stream=3), sampler.log_probs(logits),
           cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds, step=steps))
    with VirtualDevices():
        on = lambda t: t.to("vgpu:1")  # noqa: E731
        got = (cfgen.gumbel_noise(on(seeds), on(steps), 1000, stream=3, device="vgpu:1"),
               sampler.log_probs(on(logits)),
               cfgen.posterior_noise(on(logits), on(tokens), sampler=sampler, seed=on(seeds), step=on(steps)))
        assert all(g.device == torch.device("vgpu:1") for g in got)
        got = [g.to("cpu") for g in got]
    for c, g in zip(cpu, got):
        assert torch.equal(c, g)


def _device(iv):
    for t in list(iv.parameters()) + list(iv.buffers()):
        return t.device
    return None
