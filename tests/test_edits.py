"""Rank-one (ROME-style) edit on a tiny random Llama: the edited fact changes, unrelated prompts barely move.

The tiny Llama is random (built here, initializer_range 0.5 so that its next-token distributions are not
flat and one MLP edit can move them). Its subject is at the end of the prompt: in a random 2-layer model,
later attention barely reads earlier positions, so an edit at a subject in the middle of the prompt could
not reach the output (a property of random weights, not of the method).
"""

from __future__ import annotations

import pytest
import torch

from cfgen.edits import down_projection, rank_one_edit
from tests.conftest import tiny_gpt2

PROMPT, SUBJECT, PROMPT_IDS = "w7 w8 w5 w6", "w5 w6", [[7, 8, 5, 6]]
CONTEXTS = ("", "w3 ", "w4 w9 ", "w10 w11 w12 ")
# KL(original || edited) of next-token distributions over 24 unrelated prompts (nats): the mean must stay below
# KL_MEAN_BOUND and every prompt below KL_MAX_BOUND, while the edited prompt itself must move by at least
# EDIT_RATIO times the unrelated mean. (Observed: unrelated mean ~0.2, max ~1.2; edited prompt ~4.2.)
KL_MEAN_BOUND, KL_MAX_BOUND, EDIT_RATIO = 0.35, 2.0, 10.0


def tiny_llama():
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        cfg.initializer_range = 0.5
        return transformers.LlamaForCausalLM(cfg).eval()


class WordTokenizer:
    """Word-level stand-in tokenizer: the word ``w<i>`` is token ``i``."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def _next_logprobs(model, rows):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor(rows)).logits[:, -1].float(), -1)


def _unrelated_prompts(n=24, length=4):
    g = torch.Generator().manual_seed(123)
    rows = torch.randint(13, 32, (n, length), generator=g)  # no subject tokens (5, 6) and no context tokens
    return rows.tolist()


@pytest.mark.parametrize("covariance", [None, "texts"])
def test_edit_changes_fact_and_keeps_unrelated(covariance):
    torch.set_num_threads(1)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt_ids = PROMPT_IDS
    orig = _next_logprobs(model, prompt_ids)[0]
    new = int(orig.argsort()[len(orig) // 2])  # a token of middling probability, not the current argmax
    assert new != int(orig.argmax())
    texts = None
    if covariance == "texts":
        g = torch.Generator().manual_seed(7)
        texts = [" ".join(f"w{t}" for t in torch.randint(3, 32, (12,), generator=g).tolist()) for _ in range(16)]
    state = torch.get_rng_state()
    edited, info = rank_one_edit(
        model, WordTokenizer(), PROMPT, SUBJECT, f" w{new}", layer=0, context_prefixes=CONTEXTS,
        covariance_texts=texts, progress=False, return_info=True,
    )
    assert torch.equal(state, torch.get_rng_state())
    # the edited fact: the new object is now the argmax at the prompt
    after = _next_logprobs(edited, prompt_ids)[0]
    assert int(after.argmax()) == new
    assert info["new_is_argmax"] and info["p_new_after"] > info["p_new_before"]
    assert info["covariance"] == ("identity" if covariance is None else "keys of 16 texts, ridge 0.01")
    # the original is untouched, and the edit is rank one in exactly one matrix
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [k for k, v in edited.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    diff = edited.state_dict()[changed[0]] - before[changed[0]]
    assert torch.linalg.matrix_rank(diff, atol=1e-6 * float(diff.abs().max())) == 1
    # unrelated prompts: small KL; the edited prompt: large
    rows = _unrelated_prompts()
    p, q = _next_logprobs(model, rows), _next_logprobs(edited, rows)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.mean()) <= KL_MEAN_BOUND and float(kl.max()) <= KL_MAX_BOUND, kl
    kl_edit = float((orig.exp() * (orig - after)).sum())
    assert kl_edit >= EDIT_RATIO * float(kl.mean()), (kl_edit, kl)


def test_edit_on_gpt2_conv1d():
    model = tiny_gpt2()
    orig = _next_logprobs(model, PROMPT_IDS)[0]
    new = int(orig.argsort()[len(orig) // 2])
    edited = rank_one_edit(model, WordTokenizer(), PROMPT, SUBJECT, f" w{new}", layer=0, context_prefixes=CONTEXTS,
                           progress=False)
    assert int(_next_logprobs(edited, PROMPT_IDS)[0].argmax()) == new
    assert down_projection(edited, 0) is not down_projection(model, 0)
    assert not torch.equal(down_projection(edited, 0).weight, down_projection(model, 0).weight)


def test_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="does not occur in prompt"):
        rank_one_edit(model, WordTokenizer(), PROMPT, "w9", " w3", layer=0, progress=False)
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        rank_one_edit(model, WordTokenizer(), PROMPT, SUBJECT, " w3", layer=2, progress=False)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        rank_one_edit(model, WordTokenizer(), PROMPT, SUBJECT, " ", layer=0, progress=False)
    with pytest.raises(ValueError, match="context_prefixes"):
        rank_one_edit(model, WordTokenizer(), PROMPT, SUBJECT, " w3", layer=0, context_prefixes=(), progress=False)
