"""Jacobian Scopes: token attribution for one next-token prediction (Liu et al.).

For an input sequence with embeddings ``x_1 .. x_n`` and a target position ``T``,
let ``h_T`` be the final hidden state at ``T`` -- the *input of the unembedding*
(``lm_head``), i.e. after the final norm -- and ``J_t = d h_T / d x_t`` the
``d x d`` Jacobian with respect to the input embedding of token ``t``. With the
unembedding ``logits = W h + b`` (``W`` is ``V x d``) and ``p = softmax(W h_T + b)``:

* **Semantic** ``||J_t^T w_y||`` with ``w_y`` row ``y`` of ``W`` (the logit
  direction of a target token ``y``; a contrast ``w_a - w_b`` scores what
  separates two candidate tokens). One forward and one backward pass.
* **Temperature** ``||J_t^T h_T / ||h_T|| ||`` -- how much token ``t`` moves the
  norm of ``h_T`` (the model's inverse temperature). One forward, one backward.
* **Fisher** ``tr(J_t^T F J_t)`` with ``F = W^T (diag p - p p^T) W``, the Fisher
  information of the predicted distribution pulled back to ``h_T`` (a bias
  ``b`` does not change it). With ``F = sum_i f_i f_i^T`` (``f_i = sqrt(l_i) u_i``
  from the eigen-decomposition of ``F``), ``tr(J_t^T F J_t) = sum_i ||J_t^T f_i||^2``:
  exact with all ``d`` eigen-directions, or low-rank with the top ``k``. The
  backward passes are batched (``is_grads_batched``). ``F`` is built as
  ``W^T diag(p) W - (W^T p)(W^T p)^T`` in its centred form
  ``sum_v p_v (w_v - m)(w_v - m)^T`` with ``m = W^T p`` (one ``d x V x d`` product, no
  ``V x d x d`` tensor); in float32 the tokens whose share of ``tr F`` sums to less
  than float32 epsilon are skipped. ``tr(J_t^T F J_t)`` is twice the coefficient of
  ``eps^2`` in ``E_u KL(p(x) || p(x + eps u))`` for an isotropic perturbation ``u``
  of ``x_t`` (``E[u u^T] = I``).

Tokens after ``T`` cannot influence ``h_T`` in a causal model: their scores are 0.

Every function takes a Hugging Face causal LM or a ``pyvene.IntervenableModel``.
For the latter the forward pass runs through the IntervenableModel with its
interventions active (pass ``sources``, ``unit_locations``,
``source_representations``, ``subspaces`` as keyword arguments, as for pyvene's
own forward); the embeddings are fed as ``inputs_embeds`` and ``h_T`` is read
from the input of the unembedding, so an intervention anywhere before the
unembedding (including on its input) is part of ``J``.

``divergence_attribution`` / ``divergence_from_result`` explain where a factual
and a counterfactual continuation part ways: they score the shared context
under both models for the contrast between the two tokens at the divergence.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

__all__ = [
    "ScopeResult",
    "DivergenceAttribution",
    "semantic_scope",
    "temperature_scope",
    "fisher_scope",
    "jacobian_scopes",
    "divergence_attribution",
    "divergence_from_result",
]

_PYVENE_KWARGS = (
    "sources",
    "unit_locations",
    "source_representations",
    "subspaces",
    "intervention_additional_kwargs",
)

InputIds = Union[str, Sequence[int], torch.Tensor]
Target = Union[int, str, None]


# --------------------------------------------------------------------------- results


@dataclass
class ScopeResult:
    """Per-token attribution scores for one prediction.

    Attributes:
        ids: the input token ids (one sequence).
        tokens: their text (decoded one by one when a tokenizer was given, else ``str(id)``).
        scores: float tensor ``[len(ids)]`` (CPU); 0 after ``position``.
        kind: ``"semantic"``, ``"temperature"`` or ``"fisher"``.
        position: the target position ``T`` (non-negative index into ``ids``).
        target: the target token id (semantic), ``(a, b)`` for a contrast, else ``None``.
        target_token: its text (a pair of texts for a contrast), when a tokenizer was given.
        rank: for Fisher, the number of eigen-directions used (``d`` = exact).
        info: extras, e.g. ``"fisher_captured"`` (share of ``tr F`` in the top-``rank``
            directions) and ``"hidden_norm"`` (``||h_T||``).
    """

    ids: list[int]
    tokens: list[str]
    scores: torch.Tensor
    kind: str
    position: int
    target: Union[int, tuple[int, int], None] = None
    target_token: Union[str, tuple[str, str], None] = None
    rank: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` highest-scoring tokens as ``(index, token, score)``, best first."""
        order = torch.argsort(self.scores, descending=True)[: max(0, k)]
        return [(int(i), self.tokens[int(i)], float(self.scores[int(i)])) for i in order]

    def normalized(self) -> torch.Tensor:
        """Scores divided by their sum (all zeros stay zeros)."""
        total = float(self.scores.sum())
        return self.scores / total if total > 0 else self.scores.clone()

    def _title(self) -> str:
        what = {"semantic": "Semantic", "temperature": "Temperature", "fisher": "Fisher"}.get(self.kind, self.kind)
        parts = [f"{what} scope at position {self.position}"]
        if isinstance(self.target_token, tuple):
            parts.append(f"contrast {self.target_token[0]!r} vs {self.target_token[1]!r}")
        elif self.target_token is not None:
            parts.append(f"target {self.target_token!r}")
        elif isinstance(self.target, tuple):
            parts.append(f"contrast {self.target[0]} vs {self.target[1]}")
        elif self.target is not None:
            parts.append(f"target {self.target}")
        if self.kind == "fisher" and self.rank is not None:
            parts.append(f"rank {self.rank}")
        return ", ".join(parts)

    def to_html(self, *, title: Optional[str] = None, color: tuple[int, int, int] = (220, 50, 32)) -> str:
        """An HTML heat map of the tokens (inline styles only, no JavaScript).

        Each token's background opacity is its score over the largest score;
        hovering shows the score. The target position is outlined.
        """
        return _heatmap_html(
            self.tokens, self.scores, title=self._title() if title is None else title,
            position=self.position, color=color,
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_png(self, path: str, *, title: Optional[str] = None, dpi: int = 120) -> str:
        """Save a bar chart of the scores per token to ``path`` (matplotlib, Agg). Returns ``path``."""
        _bar_png(path, [(self.tokens, self.scores, self._title() if title is None else title)], self.position, dpi)
        return path

    def __repr__(self) -> str:
        best = ", ".join(f"{tok!r}:{s:.3g}" for _, tok, s in self.top(3))
        return f"ScopeResult({self._title()}; {len(self.ids)} tokens; top {best})"


@dataclass
class DivergenceAttribution:
    """Scopes of one context under a factual and a counterfactual model.

    The contrast is ``a`` (the factual token at the divergence) versus ``b``
    (the counterfactual token). ``semantic_*`` use the Semantic scope on
    ``w_a - w_b``; ``fisher_*`` the Fisher scope. Differences are
    counterfactual minus factual.

    Attributes:
        ids, tokens: the shared context.
        token_a, token_b: the two token ids (``text_a`` / ``text_b``: their text when known).
        factual_semantic, counterfactual_semantic, factual_fisher, counterfactual_fisher: the four ``ScopeResult``.
        factual_margin, counterfactual_margin: ``logit_a - logit_b`` at the last context position under each model.
    """

    ids: list[int]
    tokens: list[str]
    token_a: int
    token_b: int
    factual_semantic: ScopeResult
    counterfactual_semantic: ScopeResult
    factual_fisher: ScopeResult
    counterfactual_fisher: ScopeResult
    factual_margin: float
    counterfactual_margin: float
    text_a: Optional[str] = None
    text_b: Optional[str] = None

    @property
    def semantic_difference(self) -> torch.Tensor:
        """Counterfactual minus factual contrastive Semantic scores, per context token."""
        return self.counterfactual_semantic.scores - self.factual_semantic.scores

    @property
    def fisher_difference(self) -> torch.Tensor:
        """Counterfactual minus factual Fisher scores, per context token."""
        return self.counterfactual_fisher.scores - self.factual_fisher.scores

    def to_html(self) -> str:
        """Heat maps (inline styles, no JavaScript): both models and their differences."""
        a = self.text_a if self.text_a is not None else str(self.token_a)
        b = self.text_b if self.text_b is not None else str(self.token_b)
        pos = len(self.ids) - 1
        rows = [
            _heatmap_html(self.tokens, self.factual_semantic.scores, title=f"factual, Semantic on {a!r} - {b!r} "
                          f"(logit margin {self.factual_margin:+.3g})", position=pos),
            _heatmap_html(self.tokens, self.counterfactual_semantic.scores, title=f"counterfactual, Semantic on "
                          f"{a!r} - {b!r} (logit margin {self.counterfactual_margin:+.3g})", position=pos),
            _heatmap_html(self.tokens, self.semantic_difference, title="Semantic: counterfactual - factual "
                          "(red up, blue down)", position=pos),
            _heatmap_html(self.tokens, self.factual_fisher.scores, title="factual, Fisher", position=pos),
            _heatmap_html(self.tokens, self.counterfactual_fisher.scores, title="counterfactual, Fisher",
                          position=pos),
            _heatmap_html(self.tokens, self.fisher_difference, title="Fisher: counterfactual - factual "
                          "(red up, blue down)", position=pos),
        ]
        return '<div style="font-family:sans-serif">' + "".join(rows) + "</div>"

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_png(self, path: str, *, dpi: int = 120) -> str:
        """Save bar charts (factual, counterfactual, difference; Semantic and Fisher) to ``path``."""
        panels = [
            (self.tokens, self.factual_semantic.scores, "factual, Semantic (contrast)"),
            (self.tokens, self.counterfactual_semantic.scores, "counterfactual, Semantic (contrast)"),
            (self.tokens, self.semantic_difference, "Semantic: counterfactual - factual"),
            (self.tokens, self.factual_fisher.scores, "factual, Fisher"),
            (self.tokens, self.counterfactual_fisher.scores, "counterfactual, Fisher"),
            (self.tokens, self.fisher_difference, "Fisher: counterfactual - factual"),
        ]
        _bar_png(path, panels, len(self.ids) - 1, dpi)
        return path

    def __repr__(self) -> str:
        a = self.text_a if self.text_a is not None else self.token_a
        b = self.text_b if self.text_b is not None else self.token_b
        return (f"DivergenceAttribution({len(self.ids)} context tokens; {a!r} vs {b!r}; margins "
                f"factual {self.factual_margin:+.3g}, counterfactual {self.counterfactual_margin:+.3g})")


# --------------------------------------------------------------------------- rendering


def _display(token: str) -> str:
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def _heatmap_html(tokens: Sequence[str], scores: torch.Tensor, *, title: str, position: Optional[int] = None,
                  color: tuple[int, int, int] = (220, 50, 32)) -> str:
    values = [float(s) for s in scores]
    scale = max((abs(v) for v in values), default=0.0)
    neg = (40, 90, 220)
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        alpha = abs(v) / scale if scale > 0 else 0.0
        r, g, b = color if v >= 0 else neg
        border = "outline:2px solid #222;" if i == position else ""
        spans.append(
            f'<span title="{i}: {html.escape(repr(tok))} score {v:.4g}" style="background:rgba({r},{g},{b},'
            f'{alpha:.3f});{border}padding:1px 0;margin:0;border-radius:2px;white-space:pre">'
            f"{html.escape(_display(tok))}</span>"
        )
    return (
        '<div style="margin:4px 0 10px 0">'
        f'<div style="font:12px sans-serif;color:#444;margin-bottom:3px">{html.escape(title)}'
        f" &mdash; max |score| {scale:.4g}</div>"
        f'<div style="font:14px/1.9 monospace;word-wrap:break-word">{"".join(spans)}</div></div>'
    )


def _bar_png(path: str, panels: list, position: Optional[int], dpi: int) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is an optional (dev) dependency
        raise ImportError("to_png needs matplotlib: pip install matplotlib") from err
    n = len(panels[0][0])
    fig = Figure(figsize=(max(4.0, 0.28 * n + 1.5), 2.4 * len(panels)), dpi=dpi)
    FigureCanvasAgg(fig)
    for k, (tokens, scores, title) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        values = [float(s) for s in scores]
        colors = ["#d73220" if v >= 0 else "#285adc" for v in values]
        if position is not None and 0 <= position < n:
            colors[position] = "#222222" if values[position] >= 0 else "#1a3d99"
        ax.bar(range(n), values, color=colors)
        ax.set_xticks(range(n))
        ax.set_xticklabels([_display(t) for t in tokens], rotation=90, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-0.6, n - 0.4)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- model glue


def _is_intervenable(model: Any) -> bool:
    return any(c.__name__ in ("IntervenableModel", "IntervenableNdifModel") for c in type(model).__mro__) and hasattr(
        model, "model"
    )


def _base_model(model: Any) -> torch.nn.Module:
    return model.model if _is_intervenable(model) else model


def _unembedding(model: Any) -> tuple[torch.nn.Module, torch.Tensor, Optional[torch.Tensor], torch.nn.Module]:
    """``(head, W [V, d], b [V] or None, input embedding)`` of a causal LM, or a clear error."""
    base = _base_model(model)
    name = type(base).__name__
    get_out = getattr(base, "get_output_embeddings", None)
    get_in = getattr(base, "get_input_embeddings", None)
    if not callable(get_out) or not callable(get_in):
        raise TypeError(
            f"{name} is not a Hugging Face causal LM (no get_output_embeddings / get_input_embeddings); Jacobian "
            "scopes need a model with an input embedding and an unembedding (lm_head), e.g. LlamaForCausalLM or "
            "GPT2LMHeadModel, or a pyvene.IntervenableModel wrapping one."
        )
    head = get_out()
    emb = get_in()
    weight = getattr(head, "weight", None)
    emb_weight = getattr(emb, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        children = ", ".join(f"{n}: {type(m).__name__}" for n, m in base.named_children()) or "none"
        raise TypeError(
            f"{name} has no recognisable unembedding: get_output_embeddings() returned "
            f"{type(head).__name__ if head is not None else None}"
            f"{'' if head is None else ' without a 2-D weight'} (top-level modules: {children}). Use the "
            "model class with a language-modelling head (e.g. ...ForCausalLM / ...LMHeadModel rather than the bare "
            "base model)."
        )
    if not isinstance(emb_weight, torch.Tensor) or emb_weight.dim() != 2 or emb_weight.shape[1] != weight.shape[1]:
        raise TypeError(
            f"{name}: the input embedding ({type(emb).__name__}, weight "
            f"{tuple(emb_weight.shape) if isinstance(emb_weight, torch.Tensor) else None}) does not match the "
            f"unembedding (weight {tuple(weight.shape)}); Jacobian scopes need input and output embeddings of the "
            "same width d."
        )
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    return head, weight, bias, emb


def _as_ids(input_ids: InputIds, tokenizer: Any) -> list[int]:
    if isinstance(input_ids, str):
        if tokenizer is None:
            raise TypeError("input_ids is a string; pass tokenizer= to tokenize it, or pass token ids")
        return list(tokenizer(input_ids)["input_ids"])
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(
                    f"input_ids has batch size {input_ids.shape[0]}; Jacobian scopes attribute one prediction at a "
                    "time: pass one sequence (a 1-D tensor, a [1, n] tensor or a list of ids)"
                )
            input_ids = input_ids[0]
        if input_ids.dim() != 1 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids of shape [n] or [1, n], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        return [int(i) for i in input_ids.tolist()]
    ids = list(input_ids)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"input_ids holds {len(ids)} sequences; pass one sequence")
        ids = list(ids[0])
    return [int(i) for i in ids]


def _token_text(tokenizer: Any, i: int) -> str:
    return tokenizer.decode([i]) if tokenizer is not None else str(i)


def _resolve_token(token: Union[int, str], vocab: int, tokenizer: Any, what: str) -> int:
    if isinstance(token, str):
        if tokenizer is None:
            raise TypeError(f"{what} {token!r} is a string; pass tokenizer= or give the token id")
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{what} {token!r} is {len(ids)} tokens ({ids}); give a single token (or its id)")
        token = ids[0]
    if isinstance(token, torch.Tensor):
        token = int(token)
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"{what} must be a token id (int) or a one-token string, got {type(token).__name__}")
    if not 0 <= token < vocab:
        raise ValueError(f"{what} {token} is outside the vocabulary: the unembedding has {vocab} rows (ids 0..{vocab - 1})")
    return token


def _resolve_position(position: int, n: int) -> int:
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if not -n <= position < n:
        raise IndexError(
            f"position {position} is out of range for an input of {n} tokens; use 0..{n - 1} or -{n}..-1 "
            "(-1, the default, is the last token)"
        )
    return position % n


class _Pass:
    """One forward pass with ``h_T`` as a differentiable function of the input embeddings."""

    def __init__(self, model: Any, ids: list[int], position: int, attention_mask: Optional[torch.Tensor],
                 intervention_kwargs: dict[str, Any]):
        head, weight, bias, emb = _unembedding(model)
        self.weight, self.bias = weight, bias
        n = len(ids)
        if n == 0:
            raise ValueError("input_ids is empty; give at least one token")
        self.position = _resolve_position(position, n)
        vocab = emb.weight.shape[0]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"input ids {bad[:5]} are outside the input embedding's vocabulary (0..{vocab - 1})")
        device = emb.weight.device
        id_tensor = torch.tensor([ids], dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(id_tensor)
        else:
            attention_mask = torch.as_tensor(attention_mask, device=device).reshape(1, -1).long()
            if attention_mask.shape[1] != n:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} entries for {n} tokens")
        intervenable = _is_intervenable(model)
        unknown = sorted(set(intervention_kwargs) - set(_PYVENE_KWARGS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; intervention keywords are {list(_PYVENE_KWARGS)}")
        if intervention_kwargs and not intervenable:
            raise TypeError(
                f"intervention keywords {sorted(intervention_kwargs)} were given but the model is a plain "
                f"{type(model).__name__}; wrap it in a pyvene.IntervenableModel (or drop them)"
            )
        if _base_model(model).training:
            warnings.warn(f"{type(_base_model(model)).__name__} is in training mode (dropout makes the Jacobian "
                          "random); call model.eval() first", RuntimeWarning, stacklevel=3)
        captured: list[torch.Tensor] = []
        had_forward = "forward" in head.__dict__
        old_forward = head.__dict__.get("forward")
        inner = head.forward

        def capture(*args, **kwargs):  # the unembedding's input is h (pyvene removes hooks, so wrap forward)
            captured.append(args[0] if args else next(iter(kwargs.values())))
            return inner(*args, **kwargs)

        with torch.enable_grad():
            x = emb(id_tensor).detach().requires_grad_(True)
            base = {"inputs_embeds": x, "attention_mask": attention_mask}
            head.forward = capture
            try:
                if intervenable:
                    model(base, **intervention_kwargs)
                else:
                    model(**base)
            finally:
                if had_forward:
                    head.forward = old_forward
                else:
                    del head.forward
        if not captured:
            raise RuntimeError(f"{type(_base_model(model)).__name__}: the unembedding was not called in the forward pass")
        hidden = captured[-1]  # pyvene runs source inputs first; the base (intervened) pass is the last call
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != n:
            raise RuntimeError(f"unembedding input has shape {tuple(hidden.shape)}; expected [1, {n}, d]")
        self.x = x
        self.h = hidden[0, self.position]  # [d], differentiable w.r.t. x
        with torch.no_grad():
            logits = torch.nn.functional.linear(self.h.detach(), weight, bias)
        self.logits = logits

    def vjp(self, cotangents: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Per-token squared norms summed over rows: ``sum_i ||J_t^T c_i||^2`` for cotangents ``c [k, d]``."""
        total = torch.zeros(self.x.shape[1], dtype=torch.promote_types(self.x.dtype, torch.float32),
                            device=self.x.device)
        if not self.h.requires_grad:  # h_T does not depend on the inputs (e.g. an intervention replaced it): J = 0
            return total
        k = cotangents.shape[0]
        batched = True
        for start in range(0, k, chunk_size):
            chunk = cotangents[start:start + chunk_size].to(self.h.dtype)
            if batched and chunk.shape[0] > 1:
                try:
                    grads = torch.autograd.grad(self.h, self.x, chunk, retain_graph=True, is_grads_batched=True,
                                                allow_unused=True)[0]
                    if grads is not None:
                        total += grads.to(total.dtype).pow(2).sum(dim=(0, 1, 3))
                    continue
                except RuntimeError as err:  # an op without a batching rule: fall back to a loop of backward passes
                    batched = False
                    warnings.warn(f"batched backward failed ({err}); using one backward pass per direction",
                                  RuntimeWarning, stacklevel=3)
            for c in chunk:
                g = torch.autograd.grad(self.h, self.x, c, retain_graph=True, allow_unused=True)[0]
                if g is not None:
                    total += g.to(total.dtype).pow(2).sum(dim=(0, 2))
        return total

    def fisher_factors(self, rank: Optional[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``f_i = sqrt(l_i) u_i`` for the top ``rank`` eigenpairs of ``F`` (all ``d`` if ``rank`` is None)."""
        d = self.weight.shape[1]
        if rank is None:
            rank = d
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ValueError(f"rank must be an int in 1..{d} (the hidden size), or None for the exact Fisher; got {rank!r}")
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            w = self.weight.to(dtype)
            p = torch.softmax(self.logits.to(dtype), dim=-1)
            mean = p @ w  # W^T p
            # F = W^T diag(p) W - (W^T p)(W^T p)^T = sum_v p_v (w_v - m)(w_v - m)^T (the centred form has no
            # cancellation). Token v adds trace c_v = p_v ||w_v - m||^2; in float32 the tokens whose c_v sum
            # to at most float32 epsilon x tr F are left out (an error in trace norm below that of rounding
            # the V-term sum itself), which skips most of the vocabulary for a peaked p. Float64: all tokens.
            contrib = p * ((w * w).sum(-1) - 2 * (w @ mean) + mean @ mean).clamp_min(0)
            keep = None
            if dtype == torch.float32:
                order = torch.argsort(contrib, descending=True)
                tail = contrib[order].flip(0).cumsum(0).flip(0)  # tail[i] = sum of contrib[order[i:]]
                n_keep = int((tail > torch.finfo(torch.float32).eps * tail[0]).sum())
                keep = order[: max(n_keep, 1)]
            centred = (w if keep is None else w[keep]) - mean
            weights = p if keep is None else p[keep]
            fisher = (centred.T * weights) @ centred
            fisher = 0.5 * (fisher + fisher.T)
            evals, evecs = torch.linalg.eigh(fisher.double())
            evals = evals.clamp_min(0.0)
            top = torch.argsort(evals, descending=True)[:rank]
            factors = (evecs[:, top] * evals[top].sqrt()).T  # [rank, d]
            trace = float(evals.sum())
            info = {
                "fisher_trace": trace,
                "fisher_captured": float(evals[top].sum()) / trace if trace > 0 else 1.0,
                "fisher_tokens": int(centred.shape[0]),
            }
        return factors.to(self.h.dtype), info


def _scope_result(pass_: _Pass, ids: list[int], tokenizer: Any, scores: torch.Tensor, kind: str,
                  target: Union[int, tuple[int, int], None] = None, rank: Optional[int] = None,
                  info: Optional[dict[str, Any]] = None) -> ScopeResult:
    text: Union[str, tuple[str, str], None]
    if isinstance(target, tuple):
        text = None if tokenizer is None else (_token_text(tokenizer, target[0]), _token_text(tokenizer, target[1]))
    else:
        text = None if tokenizer is None or target is None else _token_text(tokenizer, target)
    extra = {"hidden_norm": float(pass_.h.detach().norm())}
    extra.update(info or {})
    return ScopeResult(
        ids=list(ids), tokens=[_token_text(tokenizer, i) for i in ids], scores=scores.detach().cpu(), kind=kind,
        position=pass_.position, target=target, target_token=text, rank=rank, info=extra,
    )


def _semantic(pass_: _Pass, ids, tokenizer, target, contrast) -> ScopeResult:
    vocab = pass_.weight.shape[0]
    if target is None:
        y = int(torch.argmax(pass_.logits))
    else:
        y = _resolve_token(target, vocab, tokenizer, "target token")
    direction = pass_.weight[y].detach()
    label: Union[int, tuple[int, int]] = y
    if contrast is not None:
        z = _resolve_token(contrast, vocab, tokenizer, "contrast token")
        direction = direction - pass_.weight[z].detach()
        label = (y, z)
    scores = pass_.vjp(direction[None], 1).sqrt()
    return _scope_result(pass_, ids, tokenizer, scores, "semantic", target=label)


def _temperature(pass_: _Pass, ids, tokenizer) -> ScopeResult:
    h = pass_.h.detach()
    norm = h.norm()
    if norm == 0:
        raise ValueError("h_T is zero: the Temperature scope (direction h_T / ||h_T||) is undefined")
    scores = pass_.vjp((h / norm)[None], 1).sqrt()
    return _scope_result(pass_, ids, tokenizer, scores, "temperature")


def _fisher(pass_: _Pass, ids, tokenizer, rank, chunk_size) -> ScopeResult:
    factors, info = pass_.fisher_factors(rank)
    scores = pass_.vjp(factors, chunk_size)
    return _scope_result(pass_, ids, tokenizer, scores, "fisher", rank=factors.shape[0], info=info)


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------- public API


def semantic_scope(model: Any, input_ids: InputIds, target: Target = None, *, position: int = -1,
                   contrast: Target = None, tokenizer: Any = None, attention_mask: Optional[torch.Tensor] = None,
                   **intervention_kwargs: Any) -> ScopeResult:
    """Semantic scope ``||J_t^T w_y||`` of each input token for target token ``y`` at ``position``.

    Args:
        model: a Hugging Face causal LM, or a ``pyvene.IntervenableModel`` (the forward runs
            through it, with its interventions).
        input_ids: one sequence: a list of ids, a ``[n]`` / ``[1, n]`` tensor, or a string (with ``tokenizer``).
        target: the token ``y`` (id, or a one-token string with ``tokenizer``); ``None`` = the model's
            top prediction at ``position``.
        position: the position ``T`` whose next-token prediction is explained (default the last).
        contrast: optional token ``z``: score ``||J_t^T (w_y - w_z)||`` (what separates ``y`` from ``z``).
        tokenizer: optional; used for strings and to show tokens as text.
        attention_mask: optional ``[n]`` / ``[1, n]`` mask (default all ones).
        **intervention_kwargs: pyvene's ``sources``, ``unit_locations``, ``source_representations``,
            ``subspaces``, ``intervention_additional_kwargs`` (IntervenableModel only).

    Returns:
        a ``ScopeResult`` with ``kind="semantic"``.

    Example:
        >>> import torch, transformers
        >>> from cfgen.scopes import semantic_scope
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> r = semantic_scope(model, [3, 5, 7, 9], target=11)
        >>> r.kind, r.position, r.target, r.scores.shape
        ('semantic', 3, 11, torch.Size([4]))
        >>> bool((r.scores > 0).all())
        True
    """
    ids = _as_ids(input_ids, tokenizer)
    pass_ = _Pass(model, ids, position, attention_mask, intervention_kwargs)
    return _semantic(pass_, ids, tokenizer, target, contrast)


def temperature_scope(model: Any, input_ids: InputIds, *, position: int = -1, tokenizer: Any = None,
                      attention_mask: Optional[torch.Tensor] = None, **intervention_kwargs: Any) -> ScopeResult:
    """Temperature scope ``||J_t^T h_T / ||h_T|| ||``: each token's effect on ``||h_T||``.

    ``||h_T||`` acts as an inverse temperature of the predicted distribution. Arguments as for
    ``semantic_scope``; ``info["hidden_norm"]`` holds ``||h_T||``.

    Example:
        >>> import torch, transformers
        >>> from cfgen.scopes import temperature_scope
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> r = temperature_scope(model, [3, 5, 7, 9], position=1)
        >>> r.kind, r.position
        ('temperature', 1)
        >>> r.scores[2:].tolist()  # tokens after the position cannot matter
        [0.0, 0.0]
    """
    ids = _as_ids(input_ids, tokenizer)
    pass_ = _Pass(model, ids, position, attention_mask, intervention_kwargs)
    return _temperature(pass_, ids, tokenizer)


def fisher_scope(model: Any, input_ids: InputIds, *, position: int = -1, rank: Optional[int] = None,
                 chunk_size: int = 32, tokenizer: Any = None, attention_mask: Optional[torch.Tensor] = None,
                 **intervention_kwargs: Any) -> ScopeResult:
    """Fisher scope ``tr(J_t^T F J_t)`` with ``F = W^T (diag p - p p^T) W``.

    Args:
        rank: ``None`` (default) for the exact trace (``d`` backward passes, batched), or ``k``
            for the top-``k`` eigen-directions of ``F`` (``k`` backward passes; a lower bound on the
            exact score, equal to it for ``k = d``). ``info["fisher_captured"]`` is the share of
            ``tr F`` those directions carry.
        chunk_size: backward passes batched together (memory grows with it).
        Other arguments as for ``semantic_scope``.

    Example:
        >>> import torch, transformers
        >>> from cfgen.scopes import fisher_scope
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> exact = fisher_scope(model, [3, 5, 7, 9])
        >>> low = fisher_scope(model, [3, 5, 7, 9], rank=4)
        >>> exact.rank, low.rank
        (16, 4)
        >>> bool((low.scores <= exact.scores * (1 + 1e-5)).all())
        True
    """
    ids = _as_ids(input_ids, tokenizer)
    chunk_size = _check_chunk(chunk_size)
    pass_ = _Pass(model, ids, position, attention_mask, intervention_kwargs)
    return _fisher(pass_, ids, tokenizer, rank, chunk_size)


def jacobian_scopes(model: Any, input_ids: InputIds, target: Target = None, *, position: int = -1,
                    contrast: Target = None, rank: Optional[int] = None, chunk_size: int = 32,
                    kinds: Sequence[str] = ("semantic", "temperature", "fisher"), tokenizer: Any = None,
                    attention_mask: Optional[torch.Tensor] = None,
                    **intervention_kwargs: Any) -> dict[str, ScopeResult]:
    """Several scopes from one shared forward pass: ``{"semantic": ..., "temperature": ..., "fisher": ...}``.

    Arguments as for ``semantic_scope`` / ``fisher_scope``; ``kinds`` selects which to compute.

    Example:
        >>> import torch, transformers
        >>> from cfgen.scopes import jacobian_scopes
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> out = jacobian_scopes(model, [3, 5, 7, 9], rank=8)
        >>> sorted(out), out["fisher"].rank
        (['fisher', 'semantic', 'temperature'], 8)
    """
    valid = ("semantic", "temperature", "fisher")
    bad = [k for k in kinds if k not in valid]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {valid}, got {list(kinds)}")
    ids = _as_ids(input_ids, tokenizer)
    chunk_size = _check_chunk(chunk_size)
    pass_ = _Pass(model, ids, position, attention_mask, intervention_kwargs)
    out: dict[str, ScopeResult] = {}
    for kind in kinds:
        if kind == "semantic":
            out[kind] = _semantic(pass_, ids, tokenizer, target, contrast)
        elif kind == "temperature":
            out[kind] = _temperature(pass_, ids, tokenizer)
        else:
            out[kind] = _fisher(pass_, ids, tokenizer, rank, chunk_size)
    return out


def divergence_attribution(factual_model: Any, counterfactual_model: Any, input_ids: InputIds,
                           token_a: Union[int, str], token_b: Union[int, str], *,
                           intervention_kwargs: Optional[dict[str, Any]] = None, fisher_rank: Optional[int] = 8,
                           chunk_size: int = 32, tokenizer: Any = None) -> DivergenceAttribution:
    """Attribute a divergence between two models' next tokens to the shared context.

    Both models read ``input_ids`` (the shared context); the prediction explained is the next
    token after it, where the factual model chose ``token_a`` and the counterfactual one ``token_b``.
    For each model: contrastive Semantic ``||J_t^T (w_a - w_b)||`` and Fisher ``tr(J_t^T F J_t)``.

    Args:
        factual_model: a causal LM (an IntervenableModel stands for its wrapped model, without interventions).
        counterfactual_model: a causal LM (weight edit, another model) or a ``pyvene.IntervenableModel``.
        input_ids: the shared context (prompt plus the common continuation).
        token_a, token_b: the factual and counterfactual tokens (ids or one-token strings with ``tokenizer``).
        intervention_kwargs: pyvene keywords for ``counterfactual_model`` (``unit_locations``, ...).
        fisher_rank: eigen-directions of ``F`` for the Fisher scopes (default 8, a low-rank lower
            bound; ``None`` for exact, ``d`` backward passes per model).

    Example:
        >>> import torch, transformers
        >>> from cfgen.scopes import divergence_attribution
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> factual = transformers.GPT2LMHeadModel(cfg).eval()
        >>> edited = transformers.GPT2LMHeadModel(cfg).eval()  # another model: e.g. a weight edit
        >>> d = divergence_attribution(factual, edited, [3, 5, 7, 9], 11, 12)
        >>> d.semantic_difference.shape, d.factual_fisher.rank
        (torch.Size([4]), 8)
    """
    ids = _as_ids(input_ids, tokenizer)
    chunk_size = _check_chunk(chunk_size)
    results = []
    margins = []
    for model, kwargs in ((_base_model(factual_model), {}), (counterfactual_model, dict(intervention_kwargs or {}))):
        pass_ = _Pass(model, ids, -1, None, kwargs)
        vocab = pass_.weight.shape[0]
        a = _resolve_token(token_a, vocab, tokenizer, "token_a")
        b = _resolve_token(token_b, vocab, tokenizer, "token_b")
        results.append((_semantic(pass_, ids, tokenizer, a, b), _fisher(pass_, ids, tokenizer, fisher_rank, chunk_size)))
        margins.append(float(pass_.logits[a] - pass_.logits[b]))
    (fs, ff), (cs, cf) = results
    return DivergenceAttribution(
        ids=ids, tokens=fs.tokens, token_a=a, token_b=b, factual_semantic=fs, counterfactual_semantic=cs,
        factual_fisher=ff, counterfactual_fisher=cf, factual_margin=margins[0], counterfactual_margin=margins[1],
        text_a=None if tokenizer is None else _token_text(tokenizer, a),
        text_b=None if tokenizer is None else _token_text(tokenizer, b),
    )


def _token_at(ids: Sequence[int], t: int, eos: Optional[int], what: str, row: int) -> int:
    if t < len(ids):
        return int(ids[t])
    if t == len(ids) and eos is not None:
        return int(eos)  # the continuation ended here: the model emitted end-of-sequence
    raise ValueError(f"row {row}: the {what} continuation has {len(ids)} tokens, none at the divergence step {t} "
                     "(and no eos_token_id is known to stand for its end)")


def divergence_from_result(model: Any, result: Any, row: int = 0, *, fisher_rank: Optional[int] = 8,
                           chunk_size: int = 32, tokenizer: Any = None,
                           **intervention_kwargs: Any) -> DivergenceAttribution:
    """``divergence_attribution`` at the first divergence of one row of a ``CounterfactualResult``.

    The context is ``prompt_ids[row] + factual_ids[row][:t]`` with ``t = first_divergence[row]``;
    ``a`` / ``b`` are the factual / counterfactual tokens at step ``t`` (end-of-sequence when a
    continuation ended there).

    Args:
        model: a ``pyvene.IntervenableModel`` (factual = its wrapped model without interventions,
            counterfactual = the IntervenableModel with ``intervention_kwargs``), or a pair
            ``(factual_model, counterfactual_model)``.
        result: a ``CounterfactualResult`` (or any object with ``prompt_ids``, ``factual_ids``,
            ``counterfactual_ids``, ``first_divergence`` and optionally ``tokenizer``).
        row: which row.
        intervention_kwargs: pyvene keywords for the counterfactual forward over the context
            (positions index the context: prompt then shared continuation).

    Example:
        >>> import types, torch, transformers
        >>> from cfgen.scopes import divergence_from_result
        >>> _ = torch.manual_seed(0)
        >>> cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)
        >>> pair = (transformers.GPT2LMHeadModel(cfg).eval(), transformers.GPT2LMHeadModel(cfg).eval())
        >>> res = types.SimpleNamespace(prompt_ids=[[3, 5]], factual_ids=[[7, 9, 11]],
        ...                             counterfactual_ids=[[7, 9, 12]], first_divergence=[2])
        >>> d = divergence_from_result(pair, res)
        >>> d.ids, d.token_a, d.token_b
        ([3, 5, 7, 9], 11, 12)
    """
    n_rows = len(result.prompt_ids)
    if isinstance(row, bool) or not isinstance(row, int) or not -n_rows <= row < n_rows:
        raise IndexError(f"row {row!r} is out of range for a result with {n_rows} rows")
    row = row % n_rows
    t = result.first_divergence[row]
    if t is None:
        raise ValueError(f"row {row}: the factual and counterfactual continuations are identical; there is no "
                         "divergence to attribute (pick a row whose first_divergence is not None)")
    if _is_intervenable(model):
        factual, counterfactual = model.model, model
    elif isinstance(model, (tuple, list)) and len(model) == 2:
        factual, counterfactual = model
        if intervention_kwargs and not _is_intervenable(counterfactual):
            raise TypeError("intervention keywords were given but the counterfactual model is not a "
                            "pyvene.IntervenableModel")
    else:
        raise TypeError(f"model must be a pyvene.IntervenableModel or a (factual, counterfactual) pair, got "
                        f"{type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(result, "tokenizer", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(_base_model(factual), "config", None), "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    factual_ids = list(result.factual_ids[row])
    context = list(result.prompt_ids[row]) + factual_ids[:t]
    a = _token_at(factual_ids, t, eos, "factual", row)
    b = _token_at(list(result.counterfactual_ids[row]), t, eos, "counterfactual", row)
    return divergence_attribution(factual, counterfactual, context, a, b, intervention_kwargs=intervention_kwargs,
                                  fisher_rank=fisher_rank, chunk_size=chunk_size, tokenizer=tokenizer)

