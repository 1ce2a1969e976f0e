"""CounterfactualResult as a table: rows, round trips, pickling, provenance, and the HTML view in a real browser."""

from __future__ import annotations

import dataclasses
import html.parser
import io
import json
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cfgen
from cfgen import provenance
from cfgen.results import CounterfactualResult, ResultRow

from .conftest import tiny_gpt2, tiny_llama

WORDS = ["<pad>", "<s>", "</s>", " the", " cat", " sat", " on", " mat", " dog", " ran", " <script>alert(1)</script>",
         "\n", " a", " big", " red", " &amp;", " home", ".", " away", " fast"]


class WordTokenizer:
    """One word per id; ``blob`` stands for the megabytes a real tokenizer carries."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self):
        self.blob = bytes(2_000_000)
        self.calls = 0

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        return "".join(WORDS[i] for i in ids)


def make_result(tok=None, interventional=True, n_prompts=3, samples=2, mode="prior") -> CounterfactualResult:
    """Rows whose texts differ in known places (ids chosen by hand, no model)."""
    g = torch.Generator().manual_seed(0)
    fact, cf, inter, pidx, sidx, seeds = [], [], [], [], [], []
    for p in range(n_prompts):
        for j in range(samples):
            f = torch.randint(3, len(WORDS), (6 + p,), generator=g).tolist()
            c = list(f)
            if (p + j) % 3:  # some rows identical, others change from a row-dependent step, one token inserted
                at = (p + j) % len(f)
                c[at:] = [10, 15] + f[at:-1]
            i = [int(x) for x in torch.randint(3, len(WORDS), (5,), generator=g)]
            fact.append(f)
            cf.append(c)
            inter.append(i)
            pidx.append(p)
            sidx.append(j)
            seeds.append(100 * p + j)
    n = len(fact)
    return CounterfactualResult(
        prompts=[f"Prompt {p}: <b>bold?</b> tell me a story" for p in range(n_prompts)],
        prompt_ids=[[1, 3 + p, 4] for p in range(n_prompts)],
        factual_ids=fact, counterfactual_ids=cf, interventional_ids=inter if interventional else None,
        seeds=seeds, sampler=cfgen.Sampler(temperature=0.7, top_k=5), mode=mode,
        prompt_index=pidx, sample_index=sidx,
        finish_reasons={"factual": ["length"] * n, "counterfactual": ["eos"] * n,
                        **({"interventional": ["stop_string"] * n} if interventional else {})},
        settings={"max_new_tokens": 9, "intervene_on": "all", "interventional_stream": 1 if interventional else None},
        tokenizer=tok if tok is not None else WordTokenizer(),
        provenance={"model": {"class": "x.Model", "dtype": "float32"}, "versions": {"cfgen": cfgen.__version__}},
    )


# ------------------------------------------------------------------ rows --
def test_len_index_iteration_match_the_lists():
    r = make_result()
    assert len(r) == 6 and len(list(r)) == 6
    fact, cf, inter, first = r.factual_texts, r.counterfactual_texts, r.interventional_texts, r.first_divergence
    for i, row in enumerate(r):
        assert isinstance(row, ResultRow) and row.index == i and row.result is r
        assert (row.factual_text, row.counterfactual_text, row.interventional_text) == (fact[i], cf[i], inter[i])
        assert (row.factual_ids, row.seed, row.first_divergence) == (r.factual_ids[i], r.seeds[i], first[i])
        assert row.identical == (first[i] is None)
        assert row.prompt == r.prompts[r.prompt_index[i]] and row.prompt_ids == r.prompt_ids[r.prompt_index[i]]
        assert row.finish_reasons == {"factual": "length", "counterfactual": "eos", "interventional": "stop_string"}
        assert row.interventional_divergence == r.interventional_divergence[i]
        assert row.to_record() == r.to_records()[i]
    assert r[-1].index == 5 and r[-6].index == 0
    assert r[torch.tensor(2).item()].seed == r.seeds[2]
    assert "ResultRow(row 3" in repr(r[3]) and "<table" in r[3]._repr_html_()


@pytest.mark.parametrize("bad,err", [(6, IndexError), (-7, IndexError), ("0", TypeError), (1.0, TypeError),
                                     (True, TypeError), (None, TypeError)])
def test_bad_index_is_refused(bad, err):
    with pytest.raises(err, match="row"):
        make_result()[bad]


@pytest.mark.parametrize("key", [slice(1, 4), slice(None, None, -2), slice(10, 20), [4, 0, 0], [-1]])
def test_slices_and_lists_give_results_whose_records_are_the_original_rows(key):
    r = make_result()
    sub = r[key]
    rows = list(range(len(r)))[key] if isinstance(key, slice) else [k % len(r) for k in key]
    assert isinstance(sub, CounterfactualResult) and len(sub) == len(rows)
    assert sub.to_records() == [r.to_records()[i] for i in rows]
    assert sub.seeds == [r.seeds[i] for i in rows]
    assert sub.finish_reasons["counterfactual"] == [r.finish_reasons["counterfactual"][i] for i in rows]
    assert sub.prompts == r.prompts and sub.provenance == r.provenance


# ----------------------------------------------------------- round trips --
@pytest.mark.parametrize("interventional,mode", [(True, "prior"), (False, "hindsight")])
def test_records_and_jsonl_round_trip_every_field(tmp_path, interventional, mode):
    r = make_result(interventional=interventional, mode=mode)
    records = r.to_records()
    json.dumps(records)  # JSON-serialisable
    back = CounterfactualResult.from_records(records)
    assert back == r  # dataclass equality: every field but the tokenizer
    for f in dataclasses.fields(CounterfactualResult):
        if f.compare:
            assert getattr(back, f.name) == getattr(r, f.name), f.name
    assert back.sampler == cfgen.Sampler(temperature=0.7, top_k=5) and back.tokenizer is None
    assert (back.factual_texts, back.counterfactual_texts, back.interventional_texts) == \
        (r.factual_texts, r.counterfactual_texts, r.interventional_texts)
    assert back.to_records() == records
    assert back.to_html() == r.to_html() and repr(back) == repr(r)

    path = tmp_path / "r.jsonl"
    r.to_jsonl(path)
    assert CounterfactualResult.from_jsonl(path) == r
    assert CounterfactualResult.from_jsonl(str(path)).to_records() == records
    buf = io.StringIO()
    r.to_jsonl(buf)
    buf.seek(0)
    assert CounterfactualResult.from_jsonl(buf) == r


def test_records_name_streams_tokens_and_provenance():
    r = make_result()
    rec = r.to_records()[1]
    for s in ("factual", "counterfactual", "interventional"):
        assert "".join(rec[f"{s}_tokens"]) == rec[s] and len(rec[f"{s}_tokens"]) == len(rec[f"{s}_ids"])
        assert rec[f"{s}_finish"]
    assert rec["provenance"] == r.provenance and rec["sampler"] == {"temperature": 0.7, "top_k": 5, "top_p": None}
    assert rec["interventional_divergence"] == r.interventional_divergence[1]


def test_from_records_refuses_what_it_cannot_trust(tmp_path):
    recs = make_result().to_records()
    with pytest.raises(ValueError, match="no records"):
        CounterfactualResult.from_records([])
    with pytest.raises(ValueError, match=r"record 2 lacks \['seed'\]"):
        CounterfactualResult.from_records([{k: v for k, v in rec.items() if not (i == 2 and k == "seed")}
                                           for i, rec in enumerate(recs)])
    mixed = [dict(rec) for rec in recs]
    mixed[3]["sampler"] = {"temperature": 1.0, "top_k": None, "top_p": None}
    with pytest.raises(ValueError, match=r"record 3 has another 'sampler' than record 0 \(differs in \['temperature', 'top_k'\]\)"):
        CounterfactualResult.from_records(mixed)
    edited = [dict(rec) for rec in recs]
    edited[1]["counterfactual_ids"] = list(edited[1]["factual_ids"])
    with pytest.raises(ValueError, match="record 1: first_divergence"):
        CounterfactualResult.from_records(edited)
    clash = [dict(rec) for rec in recs]
    clash[1]["prompt"] = "another prompt"
    with pytest.raises(ValueError, match="prompt_index 0 names another prompt"):
        CounterfactualResult.from_records(clash)
    pieces = [dict(rec) for rec in recs]
    pieces[0]["factual_tokens"] = pieces[0]["factual_tokens"][:-1]
    with pytest.raises(ValueError, match="factual_tokens do not match"):
        CounterfactualResult.from_records(pieces)
    with pytest.raises(ValueError, match="'sampler'"):
        CounterfactualResult.from_records([{**rec, "sampler": {"temp": 1}} for rec in recs])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(recs[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        CounterfactualResult.from_jsonl(bad)


def test_records_without_token_pieces_still_load():
    recs = [{k: v for k, v in rec.items() if not k.endswith("_tokens")} for rec in make_result().to_records()]
    back = CounterfactualResult.from_records(recs)
    assert back.factual_texts == [rec["factual"] for rec in recs]
    assert "split unknown" in repr(back)  # no tokenizer, no pieces: texts shown whole, the step still named
    assert "<table" in back.to_html()


# --------------------------------------------------------------- pickling --
def test_pickle_drops_the_tokenizer_and_keeps_texts():
    tok = WordTokenizer()
    r = make_result(tok)
    data = pickle.dumps(r)
    assert len(data) < 20_000 < len(pickle.dumps(tok))
    back = pickle.loads(data)
    assert back.tokenizer is None and back == r
    assert (back.factual_texts, back.counterfactual_texts, back.interventional_texts) == \
        (r.factual_texts, r.counterfactual_texts, r.interventional_texts)
    assert back.to_html() == r.to_html() and repr(back) == repr(r) and back.to_records() == r.to_records()


def test_texts_are_decoded_once():
    tok = WordTokenizer()
    r = make_result(tok)
    _ = r.factual_texts, r[0].factual_text, r.to_html(), repr(r)
    calls = tok.calls
    _ = r.factual_texts, r.counterfactual_texts, r.to_html(), repr(r), r.to_records(), r[2].interventional_text
    assert calls > 0 and tok.calls == calls


class SplitTokenizer:
    """Tokens of UTF-8 bytes (a character may span tokens) with SentencePiece's dropped leading space."""

    pad_token_id = eos_token_id = 0
    table = {3: b" caf", 4: b"\xc3", 5: b"\xa9", 6: b" \xf0\x9f", 7: b"\x99\x82", 8: b" ok", 9: b"!"}

    def decode(self, ids, skip_special_tokens=False):
        text = b"".join(self.table[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def test_token_pieces_concatenate_to_the_text_when_tokens_split_characters():
    ids = [3, 4, 5, 6, 7, 8, 9]
    r = CounterfactualResult(prompts=["p"], prompt_ids=[[1]], factual_ids=[ids], counterfactual_ids=[ids[:5] + [9]],
                             seeds=[0], sampler=cfgen.Sampler(), tokenizer=SplitTokenizer())
    rec = r.to_records()[0]
    assert rec["factual"] == "café 🙂 ok!"
    assert rec["factual_tokens"] == ["caf", "", "é", "", " 🙂", " ok", "!"]
    assert "".join(rec["counterfactual_tokens"]) == rec["counterfactual"]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from cfgen.models import default_model_dir

    path = default_model_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the embedded model's tokenizer is not cached at {path} (run cfgen.load_default_model() once)")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_real_tokenizer_pieces_and_divergence_split(smol_tokenizer):
    tok = smol_tokenizer
    fact = tok("The café in Paris 🙂 serves <script>alert(1)</script> & tea.", add_special_tokens=False)["input_ids"]
    cf = tok("The café in Rome 🙂 serves <script>alert(1)</script> & tea.", add_special_tokens=False)["input_ids"]
    r = CounterfactualResult(prompts=["Q"], prompt_ids=[[1]], factual_ids=[fact], counterfactual_ids=[cf],
                             seeds=[0], sampler=cfgen.Sampler(), tokenizer=tok)
    rec = r.to_records()[0]
    for s in ("factual", "counterfactual"):
        assert "".join(rec[f"{s}_tokens"]) == rec[s] == tok.decode(rec[f"{s}_ids"])
    d = r.first_divergence[0]
    assert "".join(rec["counterfactual_tokens"][:d]) == "The café in"
    assert "⟦ Rome" in repr(r)
    page = r.to_html()
    assert "<script" not in page and "&lt;" in page  # tokens are separate spans after the divergence
    assert r.factual_texts[0] in parse(page).texts and r.counterfactual_texts[0] in parse(page).texts


# ----------------------------------------------------------------- pandas --
def test_to_pandas_has_one_row_per_result_row():
    pd = pytest.importorskip("pandas")
    r = make_result()
    df = r.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(r)
    assert df["counterfactual"].tolist() == r.counterfactual_texts
    assert df["seed"].tolist() == r.seeds
    assert [None if pd.isna(x) else int(x) for x in df["first_divergence"]] == r.first_divergence
    assert df.to_dict("records")[0]["sampler"] == r.sampler.to_dict()


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        make_result().to_pandas()


# ------------------------------------------------------------------- repr --
def test_repr_shows_the_interventional_text_with_its_own_marks():
    r = make_result()
    text = repr(r)
    assert text.count("interventional:") == 6
    for i in range(6):
        di = r.interventional_divergence[i]
        assert f"differs from factual from step {di}" in text if di is not None else "identical to factual" in text
    assert "interventional:" not in repr(make_result(interventional=False))


# ------------------------------------------------------------------- HTML --
class _Tags(html.parser.HTMLParser):
    void = {"br", "img", "meta", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.cells, self.errors, self.tags, self.texts = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.void:
            self.stack.append(tag)
        if tag in ("td", "th"):
            self.cells.append(dict(attrs).get("style", ""))
            self.texts.append("")

    def handle_data(self, data):
        if self.texts and "td" in self.stack:
            self.texts[-1] += data

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parse(page):
    p = _Tags()
    p.feed(page)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def test_html_is_escaped_balanced_left_aligned_and_groups_prompts():
    r = make_result()
    page = r.to_html()
    p = parse(page)
    assert "<script" not in page.lower() and "&lt;script&gt;" in page and "&lt;b&gt;bold?&lt;/b&gt;" in page
    assert p.cells and all("text-align:left" in s for s in p.cells)  # Jupyter right-aligns cells otherwise
    assert page.count("<details>") == 3  # one collapsible prompt per prompt, not per row
    assert page.count("Prompt 1: ") == 2  # its summary line and its full text, once
    assert all(t != "script" and not any(k.startswith("on") for k in a) for t, a in p.tags)
    assert "interventional</th>" in page
    texts = p.texts
    for stream in (r.factual_texts, r.counterfactual_texts, r.interventional_texts):
        assert all(t in texts for t in stream)  # each cell's text, tags stripped and unescaped, is the model text


def test_html_marks_each_differing_token():
    r = make_result()
    page = r.to_html()
    expected = 0
    for f, c, i, d, di in zip(r.factual_ids, r.counterfactual_ids, r.interventional_ids, r.first_divergence,
                              r.interventional_divergence):
        if d is not None:
            expected += sum(t >= len(c) or f[t] != c[t] for t in range(d, len(f)))
            expected += sum(t >= len(f) or f[t] != c[t] for t in range(d, len(c)))
        if di is not None:
            expected += sum(t >= len(f) or f[t] != i[t] for t in range(di, len(i)))
    assert page.count("(differs)") == expected > 0
    row = r[1]
    d = row.first_divergence
    plain = "".join(WORDS[t] for t in row.counterfactual_ids[:d])
    assert plain.replace("&", "&amp;") in page


def test_html_truncates_with_a_count():
    r = make_result(n_prompts=5, samples=5)
    page = r.to_html()
    parse(page)
    assert "… and 5 more rows" in page and page.count("seed") >= 1
    assert "more row" not in r.to_html(max_rows=None) and "… and 24 more rows" in r.to_html(max_rows=1)
    assert "… and 1 more row " in r.to_html(max_rows=24)
    assert r._repr_html_() == page
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_rows"):
            r.to_html(max_rows=bad)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


# JupyterLab's rules for rendered HTML tables (right-aligned, centred, fixed layout, striped rows).
JUPYTER_CSS = """<style>
.jp table {border-collapse:collapse;table-layout:fixed;margin-left:auto;margin-right:auto;font-size:12px}
.jp td, .jp th {text-align:right;vertical-align:middle;padding:0.5em;line-height:normal;white-space:normal;border:none}
.jp tbody tr:nth-child(odd) {background:#f5f5f5} .jp tbody tr:hover {background:rgba(66,165,245,0.2)}
</style>"""


def _browser(args, timeout=120):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless browser: install one (apt-get install chromium) to render the HTML view")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout)


def screenshot(page: str, out, width=1100, height=700):
    src = out.with_suffix(".html")
    src.write_text(f"<html><head><meta charset='utf-8'>{JUPYTER_CSS}</head><body><div class='jp'>{page}</div>"
                   "</body></html>", encoding="utf-8")
    proc = _browser([f"--user-data-dir={out.parent / 'profile'}", f"--window-size={width},{height}",
                     f"--screenshot={out}", src.as_uri()])
    assert out.exists(), f"the browser wrote no screenshot: {proc.stderr[-2000:]}"
    return out


def test_html_renders_in_a_headless_browser(tmp_path):
    r = make_result()
    shot = screenshot(r.to_html(), tmp_path / "r.png")
    assert shot.stat().st_size > 5_000
    Image = pytest.importorskip("PIL.Image")
    img = Image.open(shot).convert("RGB")
    colours = set(img.getdata())
    assert len(colours) > 50  # text was drawn, not a blank page
    for stream in ("factual", "counterfactual", "interventional"):  # every highlight colour was painted
        rgb = tuple(int(cfgen.results._MARK[stream][k:k + 2], 16) for k in (1, 3, 5))
        assert rgb in colours, stream


def test_html_is_left_aligned_under_jupyters_stylesheet(tmp_path):
    # The browser computes each cell's style under Jupyter's rules; our test script (not the view) reports it.
    probe = ("<script>window.onload = () => { const out = [...document.querySelectorAll('td, th')].map("
             "c => getComputedStyle(c).textAlign); const t = document.querySelector('table');"
             "document.body.setAttribute('data-align', [...new Set(out)].join(','));"
             "document.body.setAttribute('data-cells', out.length);"
             "document.body.setAttribute('data-margin', getComputedStyle(t).marginLeft); };</script>")
    r = make_result()
    src = tmp_path / "align.html"
    src.write_text(f"<html><head><meta charset='utf-8'>{JUPYTER_CSS}{probe}</head><body><div class='jp'>"
                   f"{r.to_html()}</div></body></html>", encoding="utf-8")
    proc = _browser([f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800",
                     "--virtual-time-budget=2000", "--dump-dom", src.as_uri()])
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stderr[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs.get("align") == "left", attrs  # every cell, none right-aligned or centred
    assert int(attrs["cells"]) > 6 * 4 and attrs["margin"] == "0px"  # the table is not centred either


# ------------------------------------------------------------- provenance --
def test_model_info_names_class_path_and_dtype():
    m = tiny_gpt2()
    m.config._name_or_path = "some/where"
    info = provenance.model_info(m)
    assert info["class"].endswith("GPT2LMHeadModel") and info["name_or_path"] == "some/where"
    assert info["dtype"] == "float32" and info["num_parameters"] == sum(p.numel() for p in m.parameters())
    assert provenance.model_info(m.to(torch.bfloat16))["dtype"] == "bfloat16"
    json.dumps(info)


def test_versions_are_the_installed_ones():
    import importlib.metadata

    v = provenance.versions()
    assert v["cfgen"] == cfgen.__version__ and v["torch"] == importlib.metadata.version("torch")
    assert v["transformers"] == importlib.metadata.version("transformers")
    assert v["pyvene"] == importlib.metadata.version("pyvene")


def test_jsonable_summarises_tensors_by_content():
    a, b = torch.ones(4, 3), torch.ones(4, 3)
    b[2, 1] = 2
    ja, jb = provenance.jsonable({"v": a}), provenance.jsonable({"v": b})
    assert ja["v"]["tensor"]["shape"] == [4, 3] and ja["v"]["tensor"]["dtype"] == "float32"
    assert ja == provenance.jsonable({"v": a.clone()}) and ja != jb
    assert provenance.tensor_info(a.to(torch.bfloat16))["dtype"] == "bfloat16"
    assert provenance.jsonable([torch.tensor([[0, 1]]), (2, 3), float("nan")]) == [[[0, 1]], [2, 3], "nan"]
    json.dumps(provenance.jsonable({"obj": object(), "fn": len, "cls": int}))
    import transformers

    enc = transformers.BatchEncoding({"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3)})
    assert provenance.jsonable({"sources": enc}) == {"sources": {"input_ids": [[5, 6, 7]], "attention_mask": {
        "tensor": provenance.tensor_info(torch.ones(1, 3))}}}


def test_intervention_info_records_pyvene_config_locations_and_tensors():
    pv = pytest.importorskip("pyvene")
    m = tiny_llama()
    vec = torch.arange(16, dtype=torch.float32)
    iv = pv.IntervenableModel({"layer": 1, "component": "block_output",
                               "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=vec)}, m)
    info = provenance.intervention_info(iv, unit_locations={"base": [[[0, 1]]]}, intervene_on="prompt", sources=None)
    json.dumps(info)
    assert info["kind"] == "pyvene" and len(info["interventions"]) == 1
    item = info["interventions"][0]
    assert item["representation"]["layer"] == 1 and item["representation"]["component"] == "block_output"
    assert item["intervention"]["class"].endswith("AdditionIntervention")
    assert item["intervention"]["embed_dim"] == 16
    assert info["call"] == {"unit_locations": {"base": [[[0, 1]]]}, "intervene_on": "prompt"}
    other = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                  "intervention": pv.AdditionIntervention(embed_dim=16,
                                                                          source_representation=vec + 1)}, m)
    assert provenance.intervention_info(other) != provenance.intervention_info(iv)  # the vector's hash differs
    assert provenance.model_info(iv) == provenance.model_info(m)


def test_intervention_info_of_a_pair_names_the_edited_parameters():
    a, b = tiny_gpt2(), tiny_gpt2()
    with torch.no_grad():
        b.transformer.h[1].mlp.c_proj.weight[0, 0] += 1
    info = provenance.intervention_info((a, b))
    json.dumps(info)
    assert info["kind"] == "pair" and info["differing_parameters"]["names"] == ["transformer.h.1.mlp.c_proj.weight"]
    assert provenance.intervention_info((a, a))["differing_parameters"]["count"] == 0
    assert provenance.intervention_info(a) == {"kind": "none", "call": {}}
    with pytest.raises(ValueError, match="pair"):
        provenance.intervention_info((a, b, a))


def test_collect_is_json_and_rides_along_in_records(tmp_path):
    import transformers

    m = tiny_gpt2()
    procs = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.3)])
    prov = provenance.collect(m, sampler=cfgen.Sampler(top_p=0.9), processors=procs, intervene_on="all")
    assert json.loads(json.dumps(prov)) == prov
    assert prov["processors"][0]["params"]["penalty"] == 1.3 and prov["sampler"]["top_p"] == 0.9
    from cfgen.processors import build

    _, chain, _ = build(temperature=0.7, repetition_penalty=1.3, min_p=0.05)
    stages = provenance.processors_info(chain)
    assert [s["stage"] for s in stages] == chain.describe() and len(stages) >= 2
    assert any("RepetitionPenalty" in s["stage"] for s in stages)
    r = make_result()
    r.provenance = prov
    r.to_jsonl(tmp_path / "r.jsonl")
    assert CounterfactualResult.from_jsonl(tmp_path / "r.jsonl").provenance == prov


# ------------------------------------------------------- embedded model --
@pytest.mark.slow
def test_embedded_model_result_pickles_small_and_round_trips(default_model, tmp_path):
    import pyvene as pv

    model, tok = default_model
    vec = torch.zeros(576)
    vec[:40] = 3.0
    steer = pv.IntervenableModel({"layer": 8, "component": "block_output",
                                  "intervention": pv.AdditionIntervention(embed_dim=576, source_representation=vec)},
                                 model)
    r = cfgen.generate(steer, tok, ["Once upon a time", "The capital of France"], max_new_tokens=12, seed=3,
                       num_samples=2, interventional=True, top_k=50)
    r.provenance = provenance.collect(steer, sampler=r.sampler)
    data = pickle.dumps(r)
    assert len(data) < 50_000, len(data)
    back = pickle.loads(data)
    assert back == r and back.tokenizer is None and back.to_html() == r.to_html()
    assert back.counterfactual_texts == r.counterfactual_texts and back.interventional_texts == r.interventional_texts
    r.to_jsonl(tmp_path / "r.jsonl")
    loaded = CounterfactualResult.from_jsonl(tmp_path / "r.jsonl")
    assert loaded == r and loaded.to_records() == r.to_records()
    rec = loaded.to_records()[0]
    assert rec["provenance"]["model"]["class"].endswith("LlamaForCausalLM")
    assert rec["provenance"]["intervention"]["interventions"][0]["representation"]["layer"] == 8
    page = r.to_html()
    parse(page)
    assert page.count("<details>") == 2 and "interventional</th>" in page
    assert all(t["interventional"] for t in r.to_records())


# ------------------------------------------------------------------- docs --
def test_docs_maths_is_served_from_the_built_site(tmp_path):
    """docs/conf.py on a one-page site: MathJax comes from _static, no CDN (and typesets in a browser if one is here)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("sphinx-mathjax-offline") is None:
        pytest.skip("sphinx-mathjax-offline is not installed (pip install -e '.[docs]')")
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "docs" / "conf.py", tmp_path / "conf.py")
    (tmp_path / "index.md").write_text("# Maths\n\nInline $e^{i\\pi} + 1 = 0$ and\n\n$$\ny = \\arg\\max_v a_v\n$$\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r"<script[^>]*src=\"([^\"]+)\"", page)
    assert "_static/mathjax/tex-chtml.js" in srcs and not any(s.startswith(("http:", "https:", "//")) for s in srcs)
    assert (tmp_path / "out" / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000
    if _chromium() is not None:
        dom = _browser([f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        (tmp_path / "out" / "index.html").as_uri()]).stdout
        assert dom.count("<mjx-container") == 2  # both formulas typeset, offline
