"""HF sampling parity inside the Gumbel-max SCM (cfgen.processors)."""

import warnings

import pytest
import torch
import transformers
from scipy import stats
from transformers.generation import logits_process as lp

import cfgen
from cfgen.hook import SamplerHook
from cfgen.processors import Limits, build

from .conftest import tiny_gpt2, tiny_llama

V, EOS, N_NEW = 16, 2, 10
PROMPTS = [[5, 3, 7, 4, 3, 7], [6, 6, 9, 3, 12, 13]]  # equal lengths: HF's padded batch is our per-row history


class BanAfterThree(lp.LogitsProcessor):
    """A user processor (a deterministic function of the history): token 13 may never follow token 3, and the
    token just generated is pushed down by 2."""

    def __call__(self, input_ids, scores):
        vocab = torch.arange(scores.shape[-1])
        scores = scores - 2.0 * (vocab == input_ids[:, -1:])
        return scores.masked_fill((input_ids[:, -1:] == 3) & (vocab == 13), float("-inf"))


# (id, kwargs for build / GenerationConfig, user processors)
CASES = [
    ("repetition_penalty", {"repetition_penalty": 1.8}, []),
    ("repetition_penalty_greedy", {"repetition_penalty": 1.8, "do_sample": False}, []),
    ("no_repeat_ngram_size", {"no_repeat_ngram_size": 1}, []),
    ("encoder_repetition_penalty", {"encoder_repetition_penalty": 0.5}, []),
    ("encoder_no_repeat_ngram_size", {"encoder_no_repeat_ngram_size": 1}, []),
    ("bad_words_ids", {"bad_words_ids": [[12], [13], [0], [3, 14]]}, []),
    ("sequence_bias", {"sequence_bias": [[[12], -2.0], [[3, 0], 4.0], [[9], 3.0]]}, []),
    ("min_length", {"min_length": 12, "eos_token_id": [EOS, 12]}, []),
    ("min_new_tokens", {"min_new_tokens": 6, "eos_token_id": 12}, []),
    ("forced_eos_token_id", {"forced_eos_token_id": 9, "max_new_tokens": 4}, []),
    ("exponential_decay_length_penalty", {"exponential_decay_length_penalty": (2, 1.6), "eos_token_id": 12}, []),
    ("suppress_tokens", {"suppress_tokens": [12, 13, 0]}, []),
    ("begin_suppress_tokens", {"begin_suppress_tokens": [12, 13, 0, 11]}, []),
    ("min_p", {"min_p": 0.2}, []),
    ("typical_p", {"typical_p": 0.5}, []),
    ("epsilon_cutoff", {"epsilon_cutoff": 0.05}, []),
    ("eta_cutoff", {"eta_cutoff": 0.05}, []),
    ("top_h", {"top_h": 0.4}, []),
    ("renormalize_logits", {"renormalize_logits": True, "repetition_penalty": 1.5, "temperature": 0.6}, []),
    ("user_processor", {}, [BanAfterThree()]),
    ("combined", {"temperature": 0.7, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3,
                  "no_repeat_ngram_size": 2, "min_p": 0.05, "suppress_tokens": [0]}, [BanAfterThree()]),
]


def make_model(kind="llama"):
    # init 0.3: peaked next-token distributions, so every processor and warper bites.
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind](vocab_size=V, seed=3, init=0.3)


def hf_processors(model, kw, user, prompt_len, max_new):
    """The processor list HF generate builds for these settings (its own builder), sampling warpers included."""
    kw = dict(kw)
    greedy = kw.pop("do_sample", True) is False
    kw.pop("max_new_tokens", None)
    gc = transformers.GenerationConfig(do_sample=not greedy, **kw)
    gc.max_length = prompt_len + max_new
    model._prepare_special_tokens(gc, True, device="cpu")
    ids = torch.tensor(PROMPTS)
    return model._get_logits_processor(
        generation_config=gc, input_ids_seq_length=prompt_len, encoder_input_ids=ids,
        logits_processor=lp.LogitsProcessorList(user), device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(ids)},
    )


def cfgen_loop(model, processing, prompts, seeds, max_new, stop, noise=None):
    """Reference decode: full recompute per step, Processing.sample with cfgen's noise, stop at `stop` ids."""
    out = []
    for r, prompt in enumerate(prompts):
        seq = list(prompt)
        for step in range(max_new):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1:].float()
            u = cfgen.gumbel_noise(int(seeds[r]), step, V) if noise is None else noise[r][step][None]
            tok = int(processing.sample(logits, u, [seq], [len(prompt)])[0])
            seq.append(tok)
            if tok in stop:
                break
        out.append(seq[len(prompt):])
    return out


def hf_generate(model, processors, seeds, max_new, stop, greedy=False):
    ids = torch.tensor(PROMPTS)
    # HF's warpers are in `processors`; the hook only adds the noise (greedy: plain argmax, no noise can win)
    hook = SamplerHook(cfgen.Sampler(temperature=0.0 if greedy else 1.0), seeds=torch.tensor(seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             logits_processor=lp.LogitsProcessorList([*processors, hook]), pad_token_id=0,
                             eos_token_id=list(stop))
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        seq = []
        for t in row:
            seq.append(t)
            if t in stop:
                break
        rows.append(seq)
    return rows


def stops(kw):
    eos = kw.get("eos_token_id", EOS)
    return {eos} if isinstance(eos, int) else set(eos)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tokens_equal_hf_generate_with_the_same_noise(case, kind):
    """For each processor: cfgen's explicit loop == HF generate(do_sample=False, [HF's processors] + SamplerHook).

    Two prompts x 3 seeds, 10 new tokens (fewer with forced EOS). The processor must also change the
    tokens of at least one of the 6 rows compared with the plain sampler under the same noise, so the
    comparison is not vacuous.
    """
    name, kw, user = case
    model = make_model(kind)
    max_new = kw.get("max_new_tokens", N_NEW)
    sampler, processing, limits = build(logits_processor=user, **kw)
    assert not processing.empty
    stop = stops(kw)
    changed = False
    for base in (0, 10, 20):
        seeds = [base + 1, base + 2]
        ours = cfgen_loop(model, processing, PROMPTS, seeds, max_new, stop)
        theirs = hf_generate(model, hf_processors(model, kw, user, len(PROMPTS[0]), max_new), seeds, max_new, stop,
                             greedy=sampler.greedy)
        assert ours == theirs, (name, seeds)
        _, plain, _ = build(sampler=sampler)
        changed |= ours != cfgen_loop(model, plain, PROMPTS, seeds, max_new, stop)
    assert changed, f"{name} changed no token: the test would not see it"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_posterior_under_processors_reproduces_the_observed_tokens(case):
    """Teacher-forced logits -> observe -> posterior_noise(sampler=Sampler()) reproduces every observed token,
    and observe's rows are bit-identical to support_logits on the same (logits, history)."""
    name, kw, user = case
    model = make_model()
    _, processing, _ = build(logits_processor=user, **kw)
    max_new = kw.get("max_new_tokens", N_NEW)
    for r, prompt in enumerate(PROMPTS):
        observed = cfgen_loop(model, processing, [prompt], [r + 40], max_new, stops(kw))[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + observed])).logits[0, len(prompt) - 1:-1].float()
        z = processing.observe(logits, prompt, observed)
        tokens = torch.tensor(observed)
        for seed in (0, 1):
            noise = cfgen.posterior_noise(z, tokens, sampler=cfgen.Sampler(), seed=torch.tensor([seed]))
            for t in range(len(observed)):
                hist = prompt + observed[:t]
                assert torch.equal(z[t:t + 1], processing.support_logits(logits[t:t + 1], [hist], [len(prompt)]))
                assert int(processing.sample(logits[t:t + 1], noise[t:t + 1], [hist], [len(prompt)])[0]) == observed[t]
            assert torch.isfinite(noise).all()


@pytest.mark.parametrize(
    "sampler",
    [cfgen.Sampler(), cfgen.Sampler(temperature=0.7, top_k=5, top_p=0.9), cfgen.Sampler(top_p=0.6),
     cfgen.Sampler(temperature=0)],
    ids=lambda s: s.describe(),
)
def test_no_processor_is_todays_sampler_bit_for_bit(sampler):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 500, generator=g) * 4
    logits[0, :3] = float("-inf")
    out, processing, limits = build(sampler=sampler)
    assert out is sampler and processing.empty and limits == Limits()
    assert processing.describe() == [f"Sampler({sampler.describe()})"]
    hist, plen = [[1, 2]] * 40, [1] * 40
    # Sampler(T, k, p).log_probs(l) == Sampler().log_probs(Sampler(T, k, p).support_logits(l)), bit for bit
    assert torch.equal(cfgen.Sampler().log_probs(sampler.support_logits(logits)), sampler.log_probs(logits))
    assert torch.equal(processing.log_probs(logits, hist, plen), sampler.log_probs(logits))
    assert torch.equal(processing.support_logits(logits, hist, plen), sampler.support_logits(logits))
    u = cfgen.gumbel_noise(torch.arange(40), 0, 500)
    tokens = sampler.sample(logits, u)
    assert torch.equal(processing.sample(logits, u, hist, plen), tokens)
    # and the hindsight posterior through observe is today's posterior
    z = processing.observe(logits, [1], tokens.tolist())
    assert torch.equal(cfgen.posterior_noise(z, tokens, sampler=cfgen.Sampler(), seed=3),
                       cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=3))


def test_rows_are_independent_of_batch_composition_and_padding():
    """Each row's log p~ is bit-identical alone, in any batch order, and next to rows of other lengths."""
    _, processing, _ = build(temperature=0.8, top_k=12, repetition_penalty=1.4, no_repeat_ngram_size=2,
                             min_new_tokens=3, eos_token_id=EOS, bad_words_ids=[[3, 4]], suppress_tokens=[1],
                             begin_suppress_tokens=[5], min_p=0.05, typical_p=0.95, eta_cutoff=0.01,
                             logits_processor=[BanAfterThree()])
    g = torch.Generator().manual_seed(5)
    histories = [[5, 3], [5, 3, 4, 5, 3], [7], [9, 9, 9, 9, 9, 9, 3], [5, 3], [0, 0, 6, 3]]
    prompt_lens = [2, 2, 1, 4, 1, 4]  # rows 0 and 4 share a history but not a prompt length
    logits = torch.randn(len(histories), 64, generator=g) * 3
    full = processing.log_probs(logits, histories, prompt_lens)
    for r in range(len(histories)):
        assert torch.equal(full[r:r + 1], processing.log_probs(logits[r:r + 1], histories[r:r + 1], prompt_lens[r:r + 1]))
    perm = [3, 0, 5, 1, 4, 2]
    assert torch.equal(full[perm], processing.log_probs(logits[perm], [histories[i] for i in perm],
                                                        [prompt_lens[i] for i in perm]))
    # a history padded on the left (HF's batch) is not what cfgen sees: pad ids would count as tokens
    _, penalty, _ = build(repetition_penalty=2.0)
    alone = penalty.log_probs(logits[2:3], [[7]], [1])
    assert not torch.equal(alone, penalty.log_probs(logits[2:3], [[0, 0, 0, 7]], [4]))
    assert torch.isneginf(full[0, 1]) and torch.isneginf(full[1, 4]) and torch.isneginf(full[3, 13])


def _tables():
    g = torch.Generator().manual_seed(11)
    return torch.randn(5, 5, generator=g) * 1.5, torch.randn(5, 5, generator=g) * 1.5


LAW_CASES = [
    ("penalty+min_p", {"temperature": 0.8, "repetition_penalty": 2.0, "min_p": 0.1}),
    ("ngram+typical+suppress", {"no_repeat_ngram_size": 2, "typical_p": 0.9, "suppress_tokens": [4]}),
    ("bias+eta+topk", {"top_k": 4, "sequence_bias": [[[1, 2], 2.0], [[0], -1.0]], "eta_cutoff": 0.05}),
]


@pytest.mark.parametrize("case", LAW_CASES, ids=[c[0] for c in LAW_CASES])
def test_hindsight_law_equals_joint_law_under_processors(case):
    """P(counterfactual sequence | factual sequence), two steps over a vocabulary of 5, logits a function of the
    last token (factual and counterfactual tables differ), every row processed with its own history.
    Joint: 150,000 prior draws. Hindsight: for every factual sequence with at least 10,000 joint samples,
    30,000 posterior draws (observe -> posterior_noise) and the counterfactual run with them.
    Pass: total variation < 0.025 (measured 0.0002-0.006 at twice these sizes) and chi-square homogeneity
    p > 1e-4 for every such sequence (at least 3 checked). Power: the posterior taken under the raw,
    unprocessed logits misses the law by TV > 0.05 for some sequence (measured 0.08-0.44).
    """
    _, kw = case
    _, processing, _ = build(**kw)
    fact, cf = _tables()
    prompt, T, n, m = [3, 1, 3, 1], 2, 150_000, 30_000

    def run(table, noise, rows):
        hist = [list(prompt) for _ in range(rows)]
        for t in range(T):
            logits = table[torch.tensor([h[-1] for h in hist])]
            u = cfgen.gumbel_noise(noise, t, 5) if noise.dim() == 1 else noise[:, t]
            for h, y in zip(hist, processing.sample(logits, u, hist, [len(prompt)] * rows).tolist()):
                h.append(y)
        return torch.tensor([h[len(prompt):] for h in hist])

    def code(y):
        return y[:, 0] * 5 + y[:, 1]

    seeds = torch.arange(n)
    joint = torch.zeros(25, 25)
    joint.index_put_((code(run(fact, seeds, n)), code(run(cf, seeds, n))), torch.ones(n), accumulate=True)
    checked, raw_miss = 0, 0.0
    for obs in range(25):
        ref = joint[obs]
        if ref.sum() < 10_000:
            continue
        observed = torch.tensor([obs // 5, obs % 5])
        logits = fact[torch.tensor([prompt[-1], obs // 5])]
        for z in (processing.observe(logits, prompt, observed.tolist()), logits):
            post = cfgen.posterior_noise(z.expand(m, T, 5), observed.expand(m, T), sampler=cfgen.Sampler(),
                                         seed=torch.arange(m)[:, None] + 10**6)
            hind = torch.bincount(code(run(cf, post, m)), minlength=25).float()
            tv = 0.5 * (hind / m - ref / ref.sum()).abs().sum()
            if z is logits:
                raw_miss = max(raw_miss, float(tv))
                continue
            assert torch.equal(run(fact, post, m), observed.expand(m, T))
            assert tv < 0.025, (obs, tv)
            keep = (hind + ref) > 0
            assert stats.chi2_contingency(torch.stack([hind[keep], ref[keep]]).numpy()).pvalue > 1e-4, obs
            checked += 1
    assert checked >= 3
    assert raw_miss > 0.05


def test_impossible_observation_names_step_token_and_processor():
    _, processing, _ = build(no_repeat_ngram_size=2, min_new_tokens=2, eos_token_id=EOS)
    logits = torch.zeros(5, V)
    with pytest.raises(cfgen.ImpossibleObservation,
                       match=r"token 7 at step 3 is banned by NoRepeatNGramLogitsProcessor\(ngram_size=2\)") as err:
        processing.observe(logits[:4], [4, 6, 7], [5, 3, 6, 7])
    assert err.value.index == (3,) and err.value.token == 7 and isinstance(err.value, ValueError)
    assert err.value.processor == "NoRepeatNGramLogitsProcessor(ngram_size=2)"
    with pytest.raises(cfgen.ImpossibleObservation, match="token 2 at step 1 is banned by MinNewTokens"):
        processing.observe(logits[:2], [4], [5, EOS])
    _, top, _ = build(top_k=1)
    with pytest.raises(cfgen.ImpossibleObservation, match=r"token 3 at step 0 is outside the support of Sampler\("):
        top.observe(torch.arange(V, dtype=torch.float32)[None], [4], [3])


def test_scm_breaking_arguments_are_refused_with_the_reason():
    cases = {
        "num_beams": (4, "beam search"), "num_beam_groups": (2, "beam search"),
        "penalty_alpha": (0.6, "contrastive search"), "guidance_scale": (1.5, "second, unconditional"),
        "assistant_model": (object(), "assisted"), "streamer": (object(), "no token stream"),
        "watermarking_config": (object(), "logits_processor="), "remove_invalid_values": (True, "support"),
        "prefix_allowed_tokens_fn": (lambda b, ids: [1], "batch index"), "num_return_sequences": (3, "seeds"),
    }
    for name, (value, why) in cases.items():
        with pytest.raises(ValueError, match=f"{name}=.*not supported by cfgen: .*{why}"):
            build(**{name: value})
    with pytest.raises(ValueError, match="generation_config.num_beams=4"):
        build(generation_config=transformers.GenerationConfig(num_beams=4))
    with pytest.raises(ValueError, match="remove_invalid_values"):
        build(logits_processor=[lp.InfNanRemoveLogitsProcessor()])
    # their neutral values change nothing and are accepted
    _, processing, _ = build(num_beams=1, guidance_scale=1.0, num_return_sequences=1)
    assert processing.empty and "num_beams" not in processing.settings


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['top_q'\].*no_repeat.*min_new_tokens.*min_p"):
        build(top_q=0.3)
    with pytest.raises(TypeError, match="either sampler= or"):
        build(sampler=cfgen.Sampler(), temperature=0.5)
    with pytest.raises(ValueError, match=r"\['min_p'\].*greedy"):
        build(do_sample=False, min_p=0.1)
    with pytest.raises(ValueError, match="min_new_tokens needs an end-of-sequence id"):
        build(min_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens or max_length, not both"):
        build(max_new_tokens=3, max_length=9)
    with pytest.raises(ValueError, match="forced_eos_token_id .* max_new_tokens"):
        build(forced_eos_token_id=2)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
        build(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="min_p"):
        build(min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty=0.0 is invalid"):
        build(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="suppress_tokens must be a token id or a list"):
        build(suppress_tokens=["a"])
    with pytest.raises(ValueError, match="forced_bos_token_id must be a token id"):
        build(forced_bos_token_id=[1, 2])
    with pytest.raises(TypeError, match=r"sampler= and generation_config's \['temperature'\]"):
        build(sampler=cfgen.Sampler(), generation_config=transformers.GenerationConfig(temperature=0.5))
    _, processing, _ = build(suppress_tokens=list(range(V)))
    with pytest.raises(ValueError, match=r"after SuppressTokensLogitsProcessor.*row 0 has no token left"):
        processing.log_probs(torch.zeros(1, V), [[3]], [1])


def test_generation_config_reads_like_hf_generate():
    gc = transformers.GenerationConfig(do_sample=True, temperature=0.7, repetition_penalty=1.2, max_new_tokens=9,
                                       eos_token_id=5, pad_token_id=0)
    sampler, processing, limits = build(generation_config=gc)
    assert sampler == cfgen.Sampler(0.7, top_k=50)  # HF generate's default top_k for unset fields
    assert processing.describe() == ["RepetitionPenaltyLogitsProcessor(penalty=1.2)",
                                     "Sampler(temperature=0.7, top_k=50, top_p=None)"]
    assert limits == Limits(max_new_tokens=9, eos_token_ids=(5,))
    # keyword arguments override the config, as in generate
    sampler, _, limits = build(generation_config=gc, top_k=0, max_length=30)
    assert sampler == cfgen.Sampler(0.7) and limits.max_new(prompt_len=4) == 26
    with pytest.warns(UserWarning, match=r"\['temperature'\].*greedily"):
        sampler, processing, _ = build(generation_config=transformers.GenerationConfig(temperature=0.5))
    assert sampler.greedy and processing.empty
    with pytest.raises(TypeError, match="GenerationConfig"):
        build(generation_config={"temperature": 0.5})


def test_keyword_sampling_maps_as_today_and_limits():
    assert build()[0] == cfgen.Sampler()
    assert build(default_sampler=cfgen.Sampler(top_k=3))[0] == cfgen.Sampler(top_k=3)
    assert build(temperature=0.5, top_p=0.9)[0] == cfgen.Sampler(0.5, None, 0.9)
    assert build(do_sample=False)[0] == cfgen.Sampler(0)
    assert build(max_length=10)[2].max_new(prompt_len=3) == 7
    with pytest.raises(ValueError, match="leaves no room"):
        build(max_length=3)[2].max_new(prompt_len=3)
    assert build(max_new_tokens=4)[2].max_new(prompt_len=100) == 4
    assert build(eos_token_id=[2, 3])[2].eos_token_ids == (2, 3)
    assert build(tokenizer=type("T", (), {"eos_token_id": 7})(), min_new_tokens=1)[1].settings == {"min_new_tokens": 1}


def test_user_processor_replaces_a_builtin_of_its_class_in_place():
    mine = lp.RepetitionPenaltyLogitsProcessor(3.0)
    _, processing, _ = build(repetition_penalty=1.5, no_repeat_ngram_size=2, logits_processor=[BanAfterThree(), mine])
    assert processing.describe() == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor(ngram_size=2)",
                                     "BanAfterThree", "Sampler(temperature=1, top_k=None, top_p=None)"]
    z = processing.support_logits(torch.full((1, 4), 3.0), [[1, 0]], [1])
    assert z[0, 1] == 1.0  # the user's penalty 3.0, not 1.5


def test_left_padded_batch_matches_hf_for_repetition_penalty():
    """HF tells RepetitionPenaltyLogitsProcessor to skip left padding, so its padded batch equals cfgen's per-row
    histories: prompts of lengths 2, 6 and 4 in one HF batch, 10 new tokens, 3 seeds each."""
    model = make_model()
    prompts = [[5, 3], [6, 6, 9, 3, 12, 13], [7, 7, 4, 1]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kw = {"repetition_penalty": 1.8, "temperature": 0.8}
    _, processing, _ = build(**kw)
    for base in (0, 10, 20):
        seeds = [base + 1, base + 2, base + 3]
        gc = transformers.GenerationConfig(do_sample=True, **kw)
        model._prepare_special_tokens(gc, True, device="cpu")
        hf = model._get_logits_processor(generation_config=gc, input_ids_seq_length=width, encoder_input_ids=ids,
                                         logits_processor=lp.LogitsProcessorList(), device="cpu",
                                         model_kwargs={"attention_mask": mask})
        hook = SamplerHook(cfgen.Sampler(), seeds=torch.tensor(seeds))
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, pad_token_id=0,
                             eos_token_id=None, logits_processor=lp.LogitsProcessorList([*hf, hook]))
        ours = cfgen_loop(model, processing, prompts, seeds, N_NEW, stop=set())
        assert out[:, width:].tolist() == ours


def test_doctests():
    import doctest

    from cfgen import processors

    result = doctest.testmod(processors, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 12 and result.failed == 0
