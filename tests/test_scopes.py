"""Tests for cfgen.scopes (Jacobian Scopes).

References are computed from the full Jacobian ``J = d h_T / d x`` given by
``torch.autograd.functional.jacobian`` of the base model's last hidden state
(``model.base_model(inputs_embeds=x).last_hidden_state``, i.e. after the final
norm) and ``F`` formed literally as ``W^T (diag p - p p^T) W``. The models are
tiny random Llama / GPT-2 configs in float64 (Llama's RMSNorm, which computes
in float32 whatever the dtype, is swapped for a float64 one), so agreement is
asserted to ``rtol=1e-9`` with ``atol=1e-9 x max score`` -- far tighter than
float32 (~1e-7). Float32 models are checked against their own float32
reference and the float64 one with ``rtol=1e-5, atol=1e-5 x max score``.
"""

import types

import pytest
import torch
import transformers

from cfgen.scopes import (
    DivergenceAttribution,
    ScopeResult,
    divergence_attribution,
    divergence_from_result,
    fisher_scope,
    jacobian_scopes,
    semantic_scope,
    temperature_scope,
)

IDS = [3, 17, 5, 29, 8, 11, 36, 2]
V, D = 40, 16


def _rms_norm_float64(self, hidden):
    return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def make_model(arch: str, *, tied: bool = True, bias: bool = False, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=tied,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
        model = transformers.GPT2LMHeadModel(cfg)
    model = model.eval().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # large enough that p is not near-uniform
            else:  # norms initialise to weight 1, bias 0, which pins ||h_T|| (Temperature would be ~0)
                p.add_(0.5 * torch.randn(p.shape, dtype=torch.float32).to(p.dtype))
    if arch == "llama" and dtype == torch.float64:
        # LlamaRMSNorm computes in float32 whatever the model dtype; make it float64 so that the
        # references (and finite differences) are exact to float64 precision.
        for module in model.modules():
            if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                module.forward = types.MethodType(_rms_norm_float64, module)
    if bias:
        old = model.get_output_embeddings()
        head = torch.nn.Linear(D, V, bias=True)  # float32 init, so float32 / float64 models match
        with torch.no_grad():
            head.bias.normal_(0.0, 1.0)
        head = head.to(dtype)
        head.weight = model.get_input_embeddings().weight if tied else torch.nn.Parameter(old.weight.detach().clone())
        model.set_output_embeddings(head)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def reference(model, ids, position, target=None, contrast=None, add=None, freeze=None):
    """Full-Jacobian reference scores.

    ``add``: (positions, vector) added to layer 0's output there; ``freeze``: positions where layer 0's
    output is replaced by its own value detached (an interchange from an identical source).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    W = head.weight.detach()
    b = head.bias.detach() if getattr(head, "bias", None) is not None else torch.zeros(W.shape[0], dtype=W.dtype)
    x0 = emb(torch.tensor([ids])).detach()[0]
    handle = None
    if add is not None or freeze is not None:
        layer = model.base_model.layers[0] if hasattr(model.base_model, "layers") else model.base_model.h[0]

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.clone()
            if add is not None:
                out[:, add[0]] += add[1]
            if freeze is not None:
                out[:, freeze] = out[:, freeze].detach()
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handle = layer.register_forward_hook(hook)
    try:
        def h_T(x):
            return model.base_model(inputs_embeds=x[None]).last_hidden_state[0, position]

        J = torch.autograd.functional.jacobian(h_T, x0)  # [d_out, n, d_in]
        with torch.no_grad():
            h = h_T(x0)
    finally:
        if handle is not None:
            handle.remove()
    logits = W @ h + b
    p = torch.softmax(logits, -1)
    y = int(logits.argmax()) if target is None else target
    w = W[y] - (W[contrast] if contrast is not None else 0)
    Jt = J.permute(1, 0, 2)  # [n, d_out, d_in]
    semantic = torch.einsum("tij,i->tj", Jt, w).norm(dim=-1)
    temperature = torch.einsum("tij,i->tj", Jt, h / h.norm()).norm(dim=-1)
    F = W.T @ (torch.diag(p) - torch.outer(p, p)) @ W
    fisher = torch.einsum("tij,ik,tkj->t", Jt, F, Jt)
    return {"semantic": semantic, "temperature": temperature, "fisher": fisher, "target": y, "logits": logits}


def close(a, b, rtol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("position", [3, -1])
def test_scopes_match_full_jacobian(arch, tied, bias, position):
    model = make_model(arch, tied=tied, bias=bias)
    ref = reference(model, IDS, position)
    out = jacobian_scopes(model, IDS, position=position)
    assert out["semantic"].target == ref["target"]  # default target: the top prediction
    for kind in ("semantic", "temperature", "fisher"):
        assert out[kind].kind == kind and out[kind].position == position % len(IDS)
        close(out[kind].scores, ref[kind])
    # tokens after T cannot influence h_T: exactly zero
    for kind in ("semantic", "temperature", "fisher"):
        assert (out[kind].scores[position % len(IDS) + 1:] == 0).all()
    # the single-scope functions agree with the shared-pass one, for an explicit and a contrastive target
    ref_t = reference(model, IDS, position, target=7, contrast=21)
    close(semantic_scope(model, IDS, 7, position=position, contrast=21).scores, ref_t["semantic"])
    close(semantic_scope(model, torch.tensor([IDS]), 7, position=position).scores, reference(model, IDS, position, 7)["semantic"])
    close(temperature_scope(model, IDS, position=position).scores, ref["temperature"])
    close(fisher_scope(model, IDS, position=position, chunk_size=5).scores, ref["fisher"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float32_model_within_float32_tolerance(arch):
    """A float32 model against its own float32 reference and the float64 model's: rtol 1e-5, atol 1e-5 x max."""
    model = make_model(arch, tied=False, bias=True, dtype=torch.float32)
    model64 = make_model(arch, tied=False, bias=True, dtype=torch.float64)
    for position in (4, -1):
        ref32, ref64 = reference(model, IDS, position), reference(model64, IDS, position)
        out = jacobian_scopes(model, IDS, position=position)
        for kind in ("semantic", "temperature", "fisher"):
            assert out[kind].scores.dtype == torch.float32
            close(out[kind].scores, ref32[kind], rtol=1e-5)
            close(out[kind].scores.double(), ref64[kind], rtol=1e-5)
    # a peaked distribution: float32 Fisher leaves out the tokens whose share of tr F is below float32 eps
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
        model64.get_output_embeddings().weight.mul_(30.0)
    peaked = fisher_scope(model, IDS)
    assert peaked.info["fisher_tokens"] < V
    close(peaked.scores.double(), reference(model64, IDS, -1)["fisher"], rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_low_rank(arch):
    model = make_model(arch, tied=False)
    exact = fisher_scope(model, IDS, position=4)
    assert exact.rank == D and exact.info["fisher_captured"] == pytest.approx(1.0)
    full = fisher_scope(model, IDS, position=4, rank=D)
    close(full.scores, exact.scores, rtol=1e-12)
    previous = torch.zeros(len(IDS), dtype=torch.float64)
    for k in (1, 4, 8, 12):  # top-k truncation: monotone in k and bounded by the exact trace
        low = fisher_scope(model, IDS, position=4, rank=k)
        assert low.rank == k and 0 < low.info["fisher_captured"] <= 1
        assert (low.scores >= previous - 1e-12).all() and (low.scores <= exact.scores * (1 + 1e-9)).all()
        previous = low.scores


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_is_twice_second_order_kl(arch):
    """tr(J_t^T F J_t) = (2 d / eps^2) E_u KL(p(x) || p(x + eps u)) + O(eps^2), u uniform on {+-e_j}.

    With G = J_t^T F J_t (the Hessian of the KL in x_t at 0), KL(p(x)||p(x+v)) = v^T G v / 2 + c3(v) + O(|v|^4)
    with c3 an odd cubic form. Averaging over the 2d directions v = +-eps e_j cancels c3, and
    E_u[u^T G u] = tr G / d for u uniform on the signed basis (the same as for u uniform on the sphere), so
    E_u KL = eps^2 tr G / (2 d) + O(eps^4). With eps = 1e-3 in float64 the estimate is deterministic (basis
    directions, no sampling); its O(eps^2) truncation plus rounding error is <= 3e-5 relative on these models,
    and we assert rel 1e-4.
    """
    model = make_model(arch, tied=False)
    eps = 1e-3
    scores = fisher_scope(model, IDS).scores
    for t in (int(scores.argmax()), 0):  # the most influential token, and the first one
        exact = scores[t].item()
        assert exact > 0  # non-degenerate
        assert 2 * D * _mean_kl(model, t, eps) / eps**2 == pytest.approx(exact, rel=1e-4)


def _mean_kl(model, t, eps):
    """Mean of KL(p(x) || p(x + u)) over the 2d perturbations u = +-eps e_j of x_t."""
    x0 = model.get_input_embeddings()(torch.tensor([IDS])).detach()
    with torch.no_grad():
        def logp(x):
            return torch.log_softmax(model(inputs_embeds=x).logits[0, -1], -1)

        p0 = logp(x0)
        total = 0.0
        for j in range(D):
            for sign in (1.0, -1.0):
                x = x0.clone()
                x[0, t, j] += sign * eps
                total += float((p0.exp() * (p0 - logp(x))).sum())
    return total / (2 * D)


def _addition_model(model):
    import pyvene as pv

    return pv.IntervenableModel(
        {"layer": 0, "component": "block_output", "intervention_type": pv.AdditionIntervention}, model=model
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_through_pyvene(arch):
    model = make_model(arch, tied=False, bias=True)
    im = _addition_model(model)
    plain = jacobian_scopes(model, IDS, position=5)
    loc = {"base": [[[1, 2]]]}
    zero = jacobian_scopes(im, IDS, position=5, unit_locations=loc,
                           source_representations=torch.zeros(1, 2, D, dtype=torch.float64))
    for kind in plain:  # identity intervention: same scopes
        close(zero[kind].scores, plain[kind].scores, rtol=1e-12)
    # a real intervention runs through pyvene: matches a reference with the same vector added by a hook
    vec = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    shifted = jacobian_scopes(im, IDS, 7, position=5, unit_locations=loc,
                              source_representations=vec.expand(1, 2, D).clone())
    ref = reference(model, IDS, 5, target=7, add=([1, 2], vec))
    for kind in plain:
        close(shifted[kind].scores, ref[kind])
    assert not torch.allclose(shifted["semantic"].scores, semantic_scope(model, IDS, 7, position=5).scores)
    # an interchange from a source identical to the base: same forward values, but the do() cuts the
    # gradient paths through the replaced activations (the source run, which also calls lm_head, is ignored)
    import pyvene as pv

    swap = pv.IntervenableModel(
        {"layer": 0, "component": "block_output", "intervention_type": pv.VanillaIntervention}, model=model
    )
    swapped = jacobian_scopes(swap, IDS, 7, position=5, sources=[{"input_ids": torch.tensor([IDS])}],
                              unit_locations={"sources->base": ([[[1, 2]]], [[[1, 2]]])})
    ref = reference(model, IDS, 5, target=7, freeze=[1, 2])
    for kind in plain:
        close(swapped[kind].scores, ref[kind])
    assert swapped["semantic"].info["hidden_norm"] == pytest.approx(plain["semantic"].info["hidden_norm"], rel=1e-12)
    assert not torch.allclose(swapped["semantic"].scores, semantic_scope(model, IDS, 7, position=5).scores)
    # replacing the last block's output at T by a source's makes h_T a constant: all scores are exactly 0
    last = pv.IntervenableModel(
        {"layer": 1, "component": "block_output", "intervention_type": pv.VanillaIntervention}, model=model
    )
    cut = jacobian_scopes(last, IDS, position=5, sources=[{"input_ids": torch.tensor([IDS[::-1]])}],
                          unit_locations={"sources->base": ([[[5]]], [[[5]]])})
    for kind in plain:
        assert (cut[kind].scores == 0).all()
    # the model is left as it was: no patched forward, plain results unchanged
    assert "forward" not in model.get_output_embeddings().__dict__
    close(jacobian_scopes(model, IDS, position=5)["fisher"].scores, plain["fisher"].scores, rtol=1e-12)


def test_bad_inputs():
    model = make_model("gpt2")
    with pytest.raises(IndexError, match="position 8 is out of range for an input of 8 tokens"):
        semantic_scope(model, IDS, 3, position=8)
    with pytest.raises(IndexError, match="out of range"):
        fisher_scope(model, IDS, position=-9)
    with pytest.raises(ValueError, match="target token 40 is outside the vocabulary.*40 rows"):
        semantic_scope(model, IDS, V)
    with pytest.raises(ValueError, match="contrast token -1 is outside the vocabulary"):
        semantic_scope(model, IDS, 3, contrast=-1)
    with pytest.raises(TypeError, match="pass tokenizer="):
        semantic_scope(model, IDS, "hello")
    with pytest.raises(ValueError, match="outside the input embedding's vocabulary"):
        semantic_scope(model, [1, 99], 3)
    with pytest.raises(ValueError, match="batch size 2"):
        semantic_scope(model, torch.tensor([IDS, IDS]), 3)
    with pytest.raises(ValueError, match="empty"):
        temperature_scope(model, [])
    with pytest.raises(ValueError, match="rank must be an int in 1..16"):
        fisher_scope(model, IDS, rank=17)
    with pytest.raises(TypeError, match="wrap it in a pyvene.IntervenableModel"):
        semantic_scope(model, IDS, 3, unit_locations={"base": [[[0]]]})
    with pytest.raises(TypeError, match="unexpected keyword"):
        semantic_scope(model, IDS, 3, postion=2)
    with pytest.raises(ValueError, match="kinds"):
        jacobian_scopes(model, IDS, kinds=("semantics",))
    model.train()
    with pytest.warns(RuntimeWarning, match="training mode"):
        semantic_scope(model, IDS, 3)
    model.eval()
    torch.manual_seed(0)
    bare = transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2)).eval()
    with pytest.raises(TypeError, match="GPT2Model has no recognisable unembedding.*returned None.*wte: Embedding"):
        semantic_scope(bare, IDS, 3)
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        semantic_scope(torch.nn.Linear(3, 3), IDS, 3)


def _stand_in(first_divergence=3):
    return types.SimpleNamespace(
        prompts=["p"], prompt_ids=[[3, 17, 5]], factual_ids=[[29, 8, 11, 36, 4]],
        counterfactual_ids=[[29, 8, 11, 21, 4]], first_divergence=[first_divergence], tokenizer=None,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_divergence_from_result(arch):
    model = make_model(arch, tied=False)
    im = _addition_model(model)
    vec = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    kwargs = {"unit_locations": {"base": [[[0, 4]]]}, "source_representations": vec.expand(1, 2, D).clone()}
    res = _stand_in()
    d = divergence_from_result(im, res, fisher_rank=None, **kwargs)
    assert isinstance(d, DivergenceAttribution)
    context = [3, 17, 5, 29, 8, 11]
    assert d.ids == context and (d.token_a, d.token_b) == (36, 21)
    # factual = the wrapped model without interventions; counterfactual = through pyvene with the kwargs
    f_ref = reference(model, context, -1, target=36, contrast=21)
    c_ref = reference(model, context, -1, target=36, contrast=21, add=([0, 4], vec))
    close(d.factual_semantic.scores, f_ref["semantic"])
    close(d.counterfactual_semantic.scores, c_ref["semantic"])
    close(d.factual_fisher.scores, f_ref["fisher"])
    close(d.counterfactual_fisher.scores, c_ref["fisher"])
    close(d.semantic_difference, c_ref["semantic"] - f_ref["semantic"])
    close(d.fisher_difference, c_ref["fisher"] - f_ref["fisher"])
    assert d.factual_margin == pytest.approx(float(f_ref["logits"][36] - f_ref["logits"][21]), rel=1e-9)
    assert d.counterfactual_margin == pytest.approx(float(c_ref["logits"][36] - c_ref["logits"][21]), rel=1e-9)
    assert d.factual_semantic.target == (36, 21)
    # an IntervenableModel given as the factual model stands for its wrapped model, without interventions
    both = divergence_attribution(im, im, context, 36, 21, intervention_kwargs=kwargs, fisher_rank=None)
    close(both.factual_semantic.scores, f_ref["semantic"])
    close(both.counterfactual_fisher.scores, c_ref["fisher"])
    # the pair form with an edited model gives the same as divergence_attribution
    other = make_model(arch, tied=False, seed=1)
    pair = divergence_from_result((model, other), res, fisher_rank=4)
    direct = divergence_attribution(model, other, context, 36, 21, fisher_rank=4)
    close(pair.semantic_difference, direct.semantic_difference, rtol=1e-12)
    close(pair.fisher_difference, direct.fisher_difference, rtol=1e-12)
    assert pair.factual_fisher.rank == 4


def test_divergence_edge_cases():
    model = make_model("gpt2", tied=False)
    other = make_model("gpt2", tied=False, seed=1)
    with pytest.raises(ValueError, match="identical"):
        divergence_from_result((model, other), _stand_in(None))
    with pytest.raises(IndexError, match="row 1"):
        divergence_from_result((model, other), _stand_in(), row=1)
    with pytest.raises(TypeError, match="IntervenableModel or a \\(factual, counterfactual\\) pair"):
        divergence_from_result(model, _stand_in())
    # the factual continuation ended at the divergence step: its token there is end-of-sequence
    res = _stand_in(2)
    res.factual_ids = [[29, 8]]
    d = divergence_from_result((model, other), res)
    assert d.ids == [3, 17, 5, 29, 8] and (d.token_a, d.token_b) == (model.config.eos_token_id, 11)


def test_rendering(tmp_path):
    class Tok:
        def decode(self, ids):
            return {3: "<b>", 17: " x\n"}.get(ids[0], f"t{ids[0]}")

    model = make_model("gpt2")
    r = semantic_scope(model, IDS, 5, position=4, tokenizer=Tok())
    assert isinstance(r, ScopeResult) and r.tokens[:2] == ["<b>", " x\n"] and r.target_token == "t5"
    page = r.to_html()
    assert page == r._repr_html_() and "<script" not in page.lower() and "&lt;b&gt;" in page
    assert page.count("<span") == len(IDS) and "outline" in page and "Semantic scope at position 4" in page
    assert r.top(2)[0][2] == pytest.approx(float(r.scores.max()))
    assert float(r.normalized().sum()) == pytest.approx(1.0)
    assert "ScopeResult(" in repr(r)
    c = semantic_scope(model, IDS, 5, contrast=6, tokenizer=Tok())
    assert c.target == (5, 6) and c.target_token == ("t5", "t6") and "contrast &#x27;t5&#x27; vs &#x27;t6&#x27;" in c.to_html()
    d = divergence_attribution(model, make_model("gpt2", seed=1), IDS, 5, 6, fisher_rank=2, tokenizer=Tok())
    assert d.to_html().count("<span") == 6 * len(IDS) and "<script" not in d.to_html().lower()
    pytest.importorskip("matplotlib")
    for obj, name in ((r, "r.png"), (d, "d.png")):
        path = tmp_path / name
        assert obj.to_png(str(path)) == str(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, cfgen.scopes; print(sorted(m for m in ('pyvene', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
