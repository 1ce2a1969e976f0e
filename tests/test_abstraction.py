"""DAS / MDAS on a toy two-attribute task with a tiny GPT-2 trained in the test.

Toy: 32 entities, each with two independent attributes A (4 values) and B
(4 values). Prompts are ``[entity, marker_A] -> value_A`` and
``[entity, marker_B] -> value_B``. The entity embeddings are fixed to
``a_vec[A] + b_vec[B] + small noise`` with ``a_vec`` / ``b_vec`` spanning
two orthogonal 3-dim subspaces in a random (non axis-aligned) basis of the
16-dim residual stream; the rest of the model is trained. Interventions sit on
layer 0's ``block_input`` at the entity token, where both attributes share the
residual stream. So:

* a rank-3 rotation can carry A alone (DAS finds it; a random one cannot);
* at rank 12, any subspace containing A still has 9 other dimensions: DAS,
  trained on Cause only, leaves them wherever they fall, which overlaps B's
  subspace, so B changes too (Isolate drops); MDAS must put them outside B
  (16 - 3 = 13 >= 12, so a perfect solution exists) and keeps Isolate high.

Examples are all ordered entity pairs whose label differs between base and
source (as in RAVEL, pairs that would trivially pass are dropped).
"""

from __future__ import annotations

import pytest
import torch

from cfgen.abstraction import (
    InterchangeExample,
    cause_score,
    disentangle_score,
    evaluate,
    isolate_score,
    make_examples,
    make_intervenable,
    rotation_config,
    train_das,
    train_mdas,
)

NA = NB = 4
PER = 2
ENT0 = 10
ENTS = [(a, b) for a in range(NA) for b in range(NB) for _ in range(PER)]
E = len(ENTS)
MARK_A, MARK_B = 3, 4
VA0 = ENT0 + E
VB0 = VA0 + NA
VOCAB = VB0 + NB
D = 16
STEPS = 150
LR = 3e-2


def _train_toy_model():
    import transformers

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=8, n_embd=D, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    a_vec = 2 * torch.randn(NA, 3, generator=g) @ basis[:, :3].T
    b_vec = 2 * torch.randn(NB, 3, generator=g) @ basis[:, 3:6].T
    with torch.no_grad():
        for e, (a, b) in enumerate(ENTS):
            model.transformer.wte.weight[ENT0 + e] = a_vec[a] + b_vec[b] + 0.1 * torch.randn(D, generator=g)
    frozen = torch.zeros(VOCAB, 1)
    frozen[ENT0 : ENT0 + E] = 1.0
    model.transformer.wte.weight.register_hook(lambda grad: grad * (1 - frozen))
    x = torch.tensor([[ENT0 + e, m] for e in range(E) for m in (MARK_A, MARK_B)])
    y = torch.tensor([v for a, b in ENTS for v in (VA0 + a, VB0 + b)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).logits[:, -1], y)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        acc = (model(x).logits[:, -1].argmax(-1) == y).float().mean().item()
    assert acc == 1.0, f"toy model did not learn the task (accuracy {acc})"
    return model


def _examples(marker: int, label_from: str) -> list[InterchangeExample]:
    out = []
    for i, (a, b) in enumerate(ENTS):
        for j, (a2, b2) in enumerate(ENTS):
            base_v, source_v, v0 = (a, a2, VA0) if marker == MARK_A else (b, b2, VB0)
            if base_v == source_v:
                continue
            label = v0 + (source_v if label_from == "source" else base_v)
            out.append(InterchangeExample([ENT0 + i, marker], [ENT0 + j, marker], label, 0, 0))
    return out


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    model = _train_toy_model()
    return model, _examples(MARK_A, "source"), _examples(MARK_B, "base")


def _config(rank: int):
    import pyvene as pv

    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=0, component="block_input", low_rank_dimension=rank,
                intervention_type=pv.LowRankRotatedSpaceIntervention,
            )
        ]
    )


def test_das_small_rank_finds_the_attribute(toy):
    model, cause, isolate = toy
    untrained = make_intervenable(model, _config(3), seed=0)
    assert cause_score(untrained, cause, batch_size=1024) <= 0.3
    trained = train_das(model, cause, config=_config(3), steps=STEPS, lr=LR, batch_size=64, seed=0, progress=False)
    assert cause_score(trained, cause, batch_size=1024) >= 0.95


def test_mdas_isolates_where_das_does_not(toy):
    model, cause, isolate = toy
    das = train_das(model, cause, config=_config(12), steps=STEPS, lr=LR, batch_size=64, seed=0, progress=False)
    mdas = train_mdas(
        model, cause, isolate, config=_config(12), steps=STEPS, lr=LR, batch_size=64, seed=0, progress=False
    )
    d, m = evaluate(das, cause, isolate, batch_size=1024), evaluate(mdas, cause, isolate, batch_size=1024)
    assert d["cause"] >= 0.95 and m["cause"] >= 0.95, (d, m)
    assert m["isolate"] >= 0.95, m
    assert d["isolate"] <= 0.6, d  # DAS's extra dimensions move B as well
    assert m["disentangle"] == pytest.approx(disentangle_score(mdas, cause, isolate, batch_size=1024))
    assert m["disentangle"] == pytest.approx(0.5 * (m["cause"] + isolate_score(mdas, isolate)))


def test_training_is_seeded_and_leaves_global_rng_alone(toy):
    model, cause, isolate = toy
    state = torch.get_rng_state()
    runs = [
        train_mdas(model, cause[:64], isolate[:64], config=_config(2), steps=5, batch_size=16, seed=7, progress=False)
        for _ in range(2)
    ]
    assert torch.equal(state, torch.get_rng_state())
    w = [next(iter(r.interventions.values())).rotate_layer.weight for r in runs]
    assert torch.equal(w[0], w[1])
    other = train_das(model, cause[:64], config=_config(2), steps=5, batch_size=16, seed=8, progress=False)
    assert not torch.equal(w[0], next(iter(other.interventions.values())).rotate_layer.weight)
    # the model gets no gradients; its requires_grad flags and mode are as wrapping left them
    # (pyvene's IntervenableModel freezes the model on construction)
    intervenable = make_intervenable(model, _config(2), seed=0)
    flags = [p.requires_grad for p in model.parameters()]
    train_das(intervenable, cause[:32], steps=2, batch_size=16, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert not model.training


def test_full_rotation_uses_rank_as_interchange_dim(toy):
    model, cause, _ = toy
    config = rotation_config(0, rank=3, component="block_input", low_rank=False)
    intervenable = make_intervenable(model, config, seed=0)
    assert int(next(iter(intervenable.interventions.values())).interchange_dim) == 3
    train_das(intervenable, cause[:32], steps=2, batch_size=16, progress=False)


def test_bad_input_is_rejected(toy):
    model, cause, isolate = toy
    with pytest.raises(ValueError, match="outside the base prompt"):
        InterchangeExample([1, 2], [3, 4], label=5, base_position=2)
    with pytest.raises(ValueError, match="outside the source prompt"):
        InterchangeExample([1, 2], [3, 4], label=5, source_position=-3)
    with pytest.raises(ValueError, match="non-negative token id"):
        InterchangeExample([1, 2], [3, 4], label=-1)
    with pytest.raises(ValueError, match="same length"):
        make_examples(lambda s: {"input_ids": [1, 2]}, ["a", "b"], ["c"], [1, 2])
    with pytest.raises(ValueError, match="base_positions has 1 entries"):
        make_examples(lambda s, add_special_tokens=True: {"input_ids": [1]}, ["a", "b"], ["c", "d"], [1, 2],
                      base_positions=[0])
    with pytest.raises(ValueError, match="empty"):
        train_das(model, [], config=_config(2), progress=False)
    with pytest.raises(ValueError, match="needs config"):
        train_das(model, cause, progress=False)
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        make_intervenable(model, rotation_config(5, rank=2))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        cause_score(make_intervenable(model, _config(2)), [InterchangeExample([ENT0], [ENT0], VOCAB + 1)])
    with pytest.raises(ValueError, match="steps"):
        train_das(model, cause, config=_config(2), steps=-1, progress=False)
