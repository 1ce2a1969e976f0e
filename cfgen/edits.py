"""Rank-one (ROME-style) weight edits of one MLP down-projection.

ROME (Meng et al., "Locating and Editing Factual Associations in GPT") treats
an MLP's output projection ``W`` as a linear associative memory mapping keys
``k`` (its input at the subject's last token) to values ``v``. To make the
model state a new object for a subject:

1. **key** ``k``: the down-projection's input at the subject's last token,
   averaged over the prompt in a few contexts (``context_prefixes``);
2. **value** ``v = W k + delta``: ``delta`` is added to the projection's output
   at the subject's last token and optimised by a few Adam steps so that the
   model assigns high probability to ``new_object`` after the prompt (in every
   context), with an L2 penalty on ``delta``;
3. **update** ``W' = W + (v - W k) k^T C^{-1} / (k^T C^{-1} k)``, so that
   ``W' k = v`` exactly, while keys ``k'`` with ``k^T C^{-1} k' = 0`` are
   unchanged. ``C`` is the keys' second-moment matrix estimated from
   ``covariance_texts`` (plus a small ridge so it is invertible) or, by default
   (``covariance_texts=None``), the identity -- the simpler variant that only
   protects keys orthogonal to ``k``.

The edit is applied to a deep copy, so the pair ``(model, edited)`` can be
passed to ``cfgen.generate`` as (factual, counterfactual) models; the original
model is untouched. Llama-style models (``model.model.layers[i].mlp.down_proj``)
and GPT-2 (``transformer.h[i].mlp.c_proj``) are supported.

>>> import torch, transformers
>>> _ = torch.manual_seed(0)
>>> llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
...     vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
...     num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
>>> class Tok:  # a word-level stand-in tokenizer: word "w<i>" is token i
...     def __call__(self, text, add_special_tokens=True):
...         return {"input_ids": [int(w[1:]) for w in text.split()]}
>>> edited = rank_one_edit(llama, Tok(), "w7 w8 w5 w6", "w5 w6", " w20", layer=0,
...                        context_prefixes=("", "w3 ", "w4 w9 "), progress=False)
>>> int(edited(torch.tensor([[7, 8, 5, 6]])).logits[0, -1].argmax())
20
>>> edited is llama
False
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rank_one_edit", "down_projection", "DEFAULT_CONTEXTS"]

DEFAULT_CONTEXTS: tuple[str, ...] = ("", "Here is a fact. ", "I read that ", "As everyone knows, ")


def down_projection(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP output projection of ``layer`` (Llama ``mlp.down_proj`` or GPT-2 ``mlp.c_proj``)."""
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        layers = model.model.layers
        get = lambda block: block.mlp.down_proj  # noqa: E731
    elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        layers = model.transformer.h
        get = lambda block: block.mlp.c_proj  # noqa: E731
    else:
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected Llama-style or GPT-2 blocks")
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer!r} is outside the model's {len(layers)} layers")
    return get(layers[layer])


def _weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The projection's weight viewed as [out, in] (GPT-2's Conv1D stores [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    return module.weight.T  # transformers' Conv1D


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _subject_last_position(tokenizer: Any, prompt: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``prompt`` and the index of the last token of ``subject`` (its last occurrence)."""
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    ids = _ids(tokenizer, prompt)
    end = start + len(subject)
    prefix = _ids(tokenizer, prompt[:end])
    if prefix and ids[: len(prefix)] == prefix:
        return ids, len(prefix) - 1
    # prefix tokenization merged across the boundary: use character offsets if the tokenizer has them
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot locate the subject's last token in {prompt!r}") from err
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > s]
    if not hits:
        raise ValueError(f"cannot locate the subject's last token in {prompt!r}")
    return ids, max(hits)


def _batch(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _covariance(model, tokenizer, module, texts: Sequence[str], ridge: float) -> torch.Tensor:
    keys = []

    def grab(_m, args):
        keys.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    handle = module.register_forward_pre_hook(grab)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for text in texts:
                ids = _ids(tokenizer, text)
                if ids:
                    model(input_ids=torch.tensor([ids], device=device))
    finally:
        handle.remove()
    if not keys:
        raise ValueError("covariance_texts produced no tokens")
    k = torch.cat(keys)
    cov = k.T @ k / k.shape[0]
    return cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], device=cov.device)


def rank_one_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    new_object: str,
    *,
    layer: int,
    context_prefixes: Sequence[str] = DEFAULT_CONTEXTS,
    steps: int = 25,
    lr: float = 0.5,
    l2: float = 1e-2,
    covariance_texts: Sequence[str] | None = None,
    ridge: float = 1e-2,
    progress: bool = True,
    return_info: bool = False,
) -> torch.nn.Module | tuple[torch.nn.Module, dict]:
    """Return a deep copy of ``model`` with one rank-one ROME-style edit of ``layer``'s down-projection.

    ``prompt`` contains ``subject`` and should be completed by ``new_object``
    (e.g. ``"The Eiffel Tower is located in the city of"``, ``"Eiffel Tower"``,
    ``" Rome"``; the object's leading space matters for most tokenizers). The
    value is optimised for ``steps`` Adam steps (``lr``; L2 penalty ``l2`` on
    ``delta`` relative to the squared norm of the residual stream after ``layer``
    at the subject's last token) on the prompt in each of
    ``context_prefixes``. ``covariance_texts=None`` uses the identity
    covariance; otherwise ``C`` = mean of the keys ``k k^T`` over those texts'
    tokens + ``ridge`` x mean(diag) x I. The global RNG is not used.
    ``return_info=True`` also returns a dict with the layer, key and value
    norms, the new object's probability before / after at the prompt, and
    which covariance was used.
    """
    from tqdm.auto import tqdm

    if steps < 1 or not math.isfinite(lr) or lr <= 0:
        raise ValueError("steps must be >= 1 and lr a positive finite number")
    if not context_prefixes:
        raise ValueError("context_prefixes must contain at least one prefix ('' for the bare prompt)")
    module = down_projection(model, layer)
    # the object's tokens as they continue the prompt (fall back to tokenizing it alone)
    full, base_ids = _ids(tokenizer, prompt + new_object), _ids(tokenizer, prompt)
    if full[: len(base_ids)] == base_ids:
        obj_ids = full[len(base_ids) :]
    else:
        try:
            obj_ids = list(tokenizer(new_object, add_special_tokens=False)["input_ids"])
        except TypeError:
            obj_ids = _ids(tokenizer, new_object)
    if not obj_ids:
        raise ValueError(f"new_object {new_object!r} tokenizes to no tokens")

    device = next(model.parameters()).device
    rows, subj_pos, n_prompt = [], [], []
    for prefix in context_prefixes:
        ids, pos = _subject_last_position(tokenizer, prefix + prompt, subject)
        rows.append(ids + obj_ids)
        subj_pos.append(pos)
        n_prompt.append(len(ids))
    ids, mask = _batch(rows, device)
    rows_idx = torch.arange(len(rows), device=device)
    pos_t = torch.tensor(subj_pos, device=device)

    # 1. key: the projection's input at the subject's last token, averaged over contexts
    captured: dict[str, torch.Tensor] = {}

    def grab(_m, args):
        captured["k"] = args[0][rows_idx, pos_t].detach().float()

    handle = module.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    # the residual stream after this layer at the subject's last token sets the scale of the L2 penalty
    captured["h"] = hidden[layer + 1][rows_idx, pos_t].float()
    k = captured["k"].mean(0)
    weight = _weight_out_in(module).detach().float()
    wk = weight @ k

    # 2. value: optimise delta added to the projection's output at the subject's last token
    delta = torch.zeros_like(wk, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)

    def add_delta(_m, _args, output):
        out = output.clone()
        out[rows_idx, pos_t] = out[rows_idx, pos_t] + delta.to(out.dtype)
        return out

    # loss positions: logits at (prompt end - 1 + j) predict object token j
    pred_rows, pred_pos, pred_tok = [], [], []
    for r, n in enumerate(n_prompt):
        for j, t in enumerate(obj_ids):
            pred_rows.append(r)
            pred_pos.append(n - 1 + j)
            pred_tok.append(t)
    pred_rows_t = torch.tensor(pred_rows, device=device)
    pred_pos_t = torch.tensor(pred_pos, device=device)
    pred_tok_t = torch.tensor(pred_tok, device=device)

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handle = module.register_forward_hook(add_delta)
    scale = float(captured["h"].pow(2).sum(-1).mean()) or 1.0
    try:
        with torch.no_grad():
            logp0 = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for _ in tqdm(range(steps), desc="ROME value", disable=not progress, leave=False):
            optimizer.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[pred_rows_t, pred_pos_t], -1)
            nll = -logp[torch.arange(len(pred_tok)), pred_tok_t].mean()
            loss = nll + l2 * delta.pow(2).sum() / scale
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    delta = delta.detach()

    # 3. rank-one update on a deep copy
    if covariance_texts is None:
        ck = k
        cov_name = "identity"
    else:
        cov = _covariance(model, tokenizer, module, covariance_texts, ridge)
        ck = torch.linalg.solve(cov, k)
        cov_name = f"keys of {len(covariance_texts)} texts, ridge {ridge}"
    u = ck / (k @ ck)
    edited = copy.deepcopy(model)
    target_module = down_projection(edited, layer)
    with torch.no_grad():
        w = _weight_out_in(target_module)
        w.add_(torch.outer(delta, u).to(w.dtype))

    if not return_info:
        return edited
    with torch.no_grad():
        first = obj_ids[0]
        p_before = float(logp0[0, n_prompt[0] - 1, first].exp())
        logits = edited(input_ids=ids[:1, : n_prompt[0]]).logits[0, -1].float()
        p_after = float(torch.softmax(logits, -1)[first])
    info = {
        "layer": layer, "object_token_ids": obj_ids, "key_norm": float(k.norm()), "delta_norm": float(delta.norm()),
        "Wk_norm": float(wk.norm()), "p_new_before": p_before, "p_new_after": p_after,
        "new_is_argmax": int(logits.argmax()) == first, "covariance": cov_name,
    }
    return edited, info
