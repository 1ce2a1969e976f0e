"""cfgen.persist: save a trained rotation, load it in a fresh CPU-only process, get identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cfgen import persist
from cfgen.abstraction import InterchangeExample, interchange_logits, make_intervenable, rotation_config, train_das

CHILD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    torch.set_num_threads(1)
    from cfgen import persist
    from cfgen.abstraction import InterchangeExample, interchange_logits
    folder = sys.argv[1]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**json.load(open(folder + "/model_config.json"))))
    model.load_state_dict(torch.load(folder + "/model.pt", weights_only=True))
    model.eval()
    examples = [InterchangeExample(**e) for e in json.load(open(folder + "/examples.json"))]
    for name in ("low_rank", "full"):
        loaded = persist.load(folder + "/" + name, model)
        torch.save(interchange_logits(loaded, examples), folder + "/child_" + name + ".pt")
    print(type(loaded).__name__, torch.cuda.is_available())
    """
)


def _model():
    import transformers

    cfg = dict(vocab_size=24, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    return model, cfg


def _examples():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 24, (12, 2, 4), generator=g).tolist()
    return [InterchangeExample(b, s, label=5, base_position=1, source_position=2) for b, s in ids]


def test_round_trip_in_fresh_cpu_process(tmp_path):
    torch.set_num_threads(1)
    model, cfg = _model()
    examples = _examples()
    expected = {}
    for name, low_rank in (("low_rank", True), ("full", False)):
        trained = train_das(
            model, examples, config=rotation_config(0, rank=3, low_rank=low_rank), steps=5, batch_size=4, seed=0,
            progress=False,
        )
        untrained = make_intervenable(model, rotation_config(0, rank=3, low_rank=low_rank), seed=0)
        expected[name] = interchange_logits(trained, examples)
        assert not torch.equal(expected[name], interchange_logits(untrained, examples))  # training changed something
        persist.save(trained, tmp_path / name)
        manifest = json.loads((tmp_path / name / persist.MANIFEST).read_text())
        assert manifest["interventions"][0]["init_kwargs"]["low_rank_dimension"] == 3
        if not low_rank:
            assert manifest["interventions"][0]["interchange_dim"] == 3
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model_config.json").write_text(json.dumps(cfg))
    (tmp_path / "examples.json").write_text(json.dumps([ex.__dict__ for ex in examples]))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # a CPU-only child, where pyvene's own load_intervention fails
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["IntervenableModel", "False"]
    for name, logits in expected.items():
        got = torch.load(tmp_path / f"child_{name}.pt", weights_only=True)
        assert torch.equal(got, logits), name  # exact: same weights, same CPU kernels


def test_load_in_process_keeps_rng_and_rejects_other_folders(tmp_path):
    model, _ = _model()
    trained = make_intervenable(model, rotation_config(0, rank=2), seed=4)
    persist.save(trained, tmp_path)
    state = torch.get_rng_state()
    loaded = persist.load(tmp_path, model)
    assert torch.equal(state, torch.get_rng_state())
    examples = _examples()
    assert torch.equal(interchange_logits(loaded, examples), interchange_logits(trained, examples))
    with pytest.raises(FileNotFoundError, match="not a folder written by cfgen.persist.save"):
        persist.load(tmp_path / "nothing", model)
    with pytest.raises(TypeError, match="IntervenableModel"):
        persist.save(model, tmp_path / "x")


# ------------------------------------------------------------------------------------------------------------------
# Every pyvene intervention type, built from a config and as an instance with non-default arguments, in both formats.

D = 16  # tiny_gpt2's hidden size


def _types():
    import pyvene as pv

    from cfgen.intervention import CounterfactualSampling

    src = torch.linspace(-1.0, 1.0, D)
    # name -> (config-built representation kwargs, instance factory)
    return {
        "vanilla": (dict(intervention_type=pv.VanillaIntervention),
                    lambda: pv.VanillaIntervention(embed_dim=D, subspace_partition=[[0, 5], [5, D]])),
        "addition": (dict(intervention_type=pv.AdditionIntervention),
                     lambda: pv.AdditionIntervention(embed_dim=D, source_representation=src.clone())),
        "subtraction": (dict(intervention_type=pv.SubtractionIntervention),
                        lambda: pv.SubtractionIntervention(embed_dim=D, source_representation=src.clone())),
        "zero": (dict(intervention_type=pv.ZeroIntervention), lambda: pv.ZeroIntervention(embed_dim=D)),
        "collect": (dict(intervention_type=pv.CollectIntervention), lambda: pv.CollectIntervention(embed_dim=D)),
        "skip": (dict(intervention_type=pv.SkipIntervention), lambda: pv.SkipIntervention(embed_dim=D)),
        "noise": (dict(intervention_type=pv.NoiseIntervention),
                  lambda: pv.NoiseIntervention(embed_dim=D, noise_leve=0.5)),
        "sigmoid_mask": (dict(intervention_type=pv.SigmoidMaskIntervention),
                         lambda: pv.SigmoidMaskIntervention(embed_dim=D)),
        "rotated": (dict(intervention_type=pv.RotatedSpaceIntervention),
                    lambda: pv.RotatedSpaceIntervention(embed_dim=D, subspace_partition=[[0, 3], [3, D]])),
        "boundless": (dict(intervention_type=pv.BoundlessRotatedSpaceIntervention),
                      lambda: pv.BoundlessRotatedSpaceIntervention(embed_dim=D)),
        "sigmoid_rotated": (dict(intervention_type=pv.SigmoidMaskRotatedSpaceIntervention),
                            lambda: pv.SigmoidMaskRotatedSpaceIntervention(embed_dim=D)),
        "low_rank": (dict(intervention_type=pv.LowRankRotatedSpaceIntervention, low_rank_dimension=4),
                     lambda: pv.LowRankRotatedSpaceIntervention(embed_dim=D, low_rank_dimension=3, keep_last_dim=True)),
        "autoencoder": (dict(intervention_type=pv.AutoencoderIntervention, latent_dim=6),
                        lambda: pv.AutoencoderIntervention(embed_dim=D, latent_dim=5)),
        "jumprelu": (dict(intervention_type=pv.JumpReLUAutoencoderIntervention, low_rank_dimension=7),
                     lambda: pv.JumpReLUAutoencoderIntervention(embed_dim=D, low_rank_dimension=6)),
        "sampling": (None, lambda: CounterfactualSampling(temperature=0.7, top_k=5, seed=3)),
    }


def _build(model, name, how):
    """An IntervenableModel with one intervention of type ``name``, its float state perturbed (seeded)."""
    import pyvene as pv

    config_kwargs, make = _types()[name]
    if name == "sampling":
        rep = cfgen_sampling_site()
    elif how == "config":
        rep = dict(layer=1, component="block_output", **config_kwargs)
    else:
        rep = dict(layer=1, component="block_output", intervention=make())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        iv = pv.IntervenableModel(pv.IntervenableConfig([rep]), model)
    intervention = next(iter(iv.interventions.values()))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key, t in intervention.state_dict(keep_vars=True).items():
            if t.is_floating_point() and key not in ("temperature", "top_p", "noise_level") and t.numel() > 1:
                t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    if name == "autoencoder":
        intervention.set_interchange_dim([0, 2])  # a latent subspace (the default, embed_dim, lies outside it)
    if name == "jumprelu":
        intervention.set_interchange_dim(3)
    return iv


def cfgen_sampling_site():
    import cfgen

    site = cfgen.sampling_site(cfgen.Sampler(temperature=0.7, top_k=5), seed=3)
    return site


def _outputs(iv):
    """Each intervention's output on fixed inputs (its partition's second subspace when it has one)."""
    g = torch.Generator().manual_seed(5)
    base, source = torch.randn(1, 4, D, generator=g), torch.randn(1, 4, D, generator=g)
    outs = []
    for intervention in iv.interventions.values():
        src = getattr(intervention, "source_representation", None)
        if not isinstance(src, torch.Tensor):
            src = None if intervention.is_source_constant else source  # constant-source types take no source
        subspaces = [[1]] if getattr(intervention, "subspace_partition", None) is not None else None
        with torch.no_grad():
            out = intervention(base.clone(), src.clone() if src is not None else None, subspaces=subspaces)
        outs.append(out.output if hasattr(out, "output") else out)
    return outs


def _assert_same(a, b, name):
    ia, ib = next(iter(a.interventions.values())), next(iter(b.interventions.values()))
    assert type(ia) is type(ib), name
    sa, sb = ia.state_dict(), ib.state_dict()
    assert list(sa) == list(sb), name
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)
    for attr in ("subspace_partition", "keep_last_dim", "is_source_constant"):
        assert getattr(ia, attr) == getattr(ib, attr), (name, attr)
    if ia.interchange_dim is None:
        assert ib.interchange_dim is None, name
    else:
        assert torch.equal(torch.as_tensor(ia.interchange_dim), torch.as_tensor(ib.interchange_dim)), name
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y), name


NAMES = list(_types())


# CounterfactualSampling is only built as an instance (cfgen.sampling_site)
@pytest.mark.parametrize("name,how", [(n, h) for n in NAMES for h in ("config", "instance")
                                      if (n, h) != ("sampling", "config")])
def test_every_type_round_trips_in_cfgen_format(tmp_path, name, how):
    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    iv = _build(model, name, how)
    persist.save(iv, tmp_path / "iv")
    assert sorted(p.suffix for p in (tmp_path / "iv").iterdir()) == [".json", ".safetensors"]
    state = torch.get_rng_state()
    loaded = persist.load(tmp_path / "iv", model)
    assert torch.equal(state, torch.get_rng_state())
    _assert_same(iv, loaded, name)


def test_instance_only_arguments_are_kept(tmp_path):
    """issue 10: an instance's latent_dim was saved as null (load raised); its subspace_partition was dropped."""
    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    ae = _build(model, "autoencoder", "instance")
    persist.save(ae, tmp_path / "ae")
    entry = json.loads((tmp_path / "ae" / persist.MANIFEST).read_text())["interventions"][0]
    assert entry["init_kwargs"]["latent_dim"] == 5 and entry["representation"]["latent_dim"] == 5
    assert next(iter(persist.load(tmp_path / "ae", model).interventions.values())).autoencoder.latent_dim == 5

    rot = _build(model, "rotated", "instance")
    persist.save(rot, tmp_path / "rot")
    entry = json.loads((tmp_path / "rot" / persist.MANIFEST).read_text())["interventions"][0]
    assert entry["init_kwargs"]["subspace_partition"] == [[0, 3], [3, D]]
    loaded = next(iter(persist.load(tmp_path / "rot", model).interventions.values()))
    assert loaded.subspace_partition == [list(range(3)), list(range(3, D))]
    # the partition matters: the same rotation without it swaps another subspace
    base, source = torch.randn(2, D, generator=torch.Generator().manual_seed(0)).unbind(0)
    with torch.no_grad():
        kept = loaded(base[None], source[None], subspaces=[[1]])
        loaded.subspace_partition = None
        dropped = loaded(base[None], source[None], subspaces=[[1]])
    assert not torch.allclose(kept, dropped)


def test_saved_dtype_is_kept(tmp_path):
    """A bfloat16 intervention comes back bfloat16 and bit-identical (not upcast into a fresh float32 one)."""
    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    iv = _build(model, "sigmoid_mask", "config")
    original = next(iter(iv.interventions.values())).to(torch.bfloat16)
    persist.save(iv, tmp_path / "bf16")
    loaded = next(iter(persist.load(tmp_path / "bf16", model).interventions.values()))
    assert loaded.mask.dtype == torch.bfloat16 and isinstance(loaded.mask, torch.nn.Parameter)
    assert torch.equal(loaded.mask, original.mask) and torch.equal(loaded.temperature, original.temperature)


@pytest.mark.parametrize("how", ["config", "instance"])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "sampling"])
def test_every_type_round_trips_through_pyvene_format(tmp_path, name, how):
    import pyvene as pv

    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    iv = _build(model, name, how)
    ia = next(iter(iv.interventions.values()))
    if name == "noise":
        # pyvene's format writes no tensors for non-trainable types: a changed noise buffer cannot travel in it.
        with pytest.raises(ValueError, match=r"\['noise'.*\] differ.*format='cfgen'"):
            persist.save(iv, tmp_path / "pv", format="pyvene")
        assert not list(tmp_path.iterdir())
        return
    if how == "instance" and name == "low_rank":
        # pyvene's config has no keep_last_dim (its constructor call never passes one): an instance setting that
        # pyvene cannot rebuild is refused, naming it, before anything is written.
        assert ia.keep_last_dim
        with pytest.raises(ValueError, match="keep_last_dim.*format='cfgen'"):
            persist.save(iv, tmp_path / "pv", format="pyvene")
        assert not (tmp_path / "pv").exists() and not list(tmp_path.iterdir())
        return
    persist.save(iv, tmp_path / "pv", format="pyvene")
    assert (tmp_path / "pv" / "config.json").is_file() and not (tmp_path / "pv" / persist.MANIFEST).exists()
    _assert_same(iv, persist.load(tmp_path / "pv", model), name)
    # pyvene's own loader reads it (CPU tensors, so its torch.load needs no map_location here)
    if name not in ("collect", "noise"):  # pyvene 0.1.8's load wants a state file its save never writes for these
        with torch.random.fork_rng(devices=[]):
            theirs = pv.IntervenableModel.load(str(tmp_path / "pv"), model)
        _assert_same(iv, theirs, name)
    # and the other way: pyvene's own save, read by cfgen
    if how == "config":
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            iv.save(str(tmp_path / "theirs"))
        _assert_same(iv, persist.load(tmp_path / "theirs", model), name)


# ------------------------------------------------------------------------------------------------------------------
# The shipped catalogue (format 1, torch-saved .bin files) keeps loading to bit-identical tensors.

def test_catalogue_folders_load_bit_identical():
    import transformers

    from cfgen import catalogue

    folders = [catalogue.path(name) for name in catalogue.names()]
    assert len(folders) == 4 and all((f / persist.MANIFEST).is_file() for f in folders)
    # The embedded model's shape (d=576, 25+ layers) with a tiny vocabulary: only the sites matter here.
    cfg = transformers.LlamaConfig(vocab_size=8, hidden_size=576, intermediate_size=8, num_hidden_layers=25,
                                   num_attention_heads=9, num_key_value_heads=3)
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlamaForCausalLM(cfg).eval()
    for folder in folders:
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        manifest = json.loads((folder / persist.MANIFEST).read_text())
        assert manifest["format"] == 1
        loaded = persist.load(folder, model)
        for entry in manifest["interventions"]:
            saved = torch.load(folder / entry["state_file"], weights_only=True)
            got = loaded.interventions[entry["key"]].state_dict()
            assert list(saved) == list(got), folder
            for k, v in saved.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (folder, k)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # loading never writes


# ------------------------------------------------------------------------------------------------------------------
# Atomic saves.


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _steer(model, value):
    import pyvene as pv

    vector = torch.full((D,), float(value))
    return pv.IntervenableModel({"layer": 1, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=D, source_representation=vector)},
                                model)


def test_failed_resave_keeps_the_old_folder(tmp_path, monkeypatch):
    import pyvene as pv

    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    folder = tmp_path / "iv"
    persist.save(_steer(model, 1.0), folder)
    old = _snapshot(folder)

    class Local(pv.AdditionIntervention):  # not importable by name: refused before anything is written
        pass

    bad = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                "intervention": Local(embed_dim=D, source_representation=torch.zeros(D))}, model)
    with pytest.raises(ValueError, match="top level of an importable module"):
        persist.save(bad, folder)
    assert _snapshot(folder) == old and sorted(p.name for p in tmp_path.iterdir()) == ["iv"]

    calls = []
    real = persist._write_state

    def failing(path, state, fmt):  # the disk fills up after the first tensor file
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, state, fmt)

    monkeypatch.setattr(persist, "_write_state", failing)
    two_sites = pv.IntervenableModel([
        {"layer": 0, "component": "block_output",
         "intervention": pv.AdditionIntervention(embed_dim=D, source_representation=torch.full((D,), 2.0))},
        {"layer": 1, "component": "block_output",
         "intervention": pv.AdditionIntervention(embed_dim=D, source_representation=torch.full((D,), 3.0))},
    ], model)
    with pytest.raises(OSError, match="No space left"):
        persist.save(two_sites, folder)
    assert len(calls) == 2
    assert _snapshot(folder) == old and sorted(p.name for p in tmp_path.iterdir()) == ["iv"]
    loaded = persist.load(folder, model)
    assert torch.equal(next(iter(loaded.interventions.values())).source_representation, torch.full((D,), 1.0))

    def interrupted(path, state, fmt):
        raise KeyboardInterrupt

    monkeypatch.setattr(persist, "_write_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        persist.save(two_sites, folder)
    assert _snapshot(folder) == old and sorted(p.name for p in tmp_path.iterdir()) == ["iv"]

    monkeypatch.setattr(persist, "_write_state", real)
    swaps = []
    real_exchange = persist._exchange
    monkeypatch.setattr(persist, "_exchange", lambda a, b: swaps.append(real_exchange(a, b)) or swaps[-1])
    persist.save(_steer(model, 4.0), folder)  # a good re-save replaces the folder: no stale files remain
    assert len(_snapshot(folder)) == 2 and _snapshot(folder) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iv"]
    if sys.platform.startswith("linux"):
        assert swaps == [True]  # one atomic exchange: readers never see the folder missing
    monkeypatch.setattr(persist, "_exchange", lambda a, b: False)  # where there is none: two renames
    persist.save(_steer(model, 5.0), folder)
    assert torch.equal(next(iter(persist.load(folder, model).interventions.values())).source_representation,
                       torch.full((D,), 5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iv"]
    assert (folder.stat().st_mode & 0o777) == ((tmp_path / "iv").stat().st_mode & 0o777)


def test_save_refuses_a_folder_with_other_files(tmp_path):
    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt.*replaces the whole folder"):
        persist.save(_steer(model, 1.0), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')  # a model folder's config, not an intervention's
    with pytest.raises(ValueError, match=r"\['config.json'\].*replaces the whole folder"):
        persist.save(_steer(model, 1.0), tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"model_type": "gpt2"}'
    (tmp_path / "config.json").unlink()
    persist.save(_steer(model, 1.0), tmp_path, format="pyvene")
    assert b"intervention_types" in (tmp_path / "config.json").read_bytes()
    persist.save(_steer(model, 1.0), tmp_path)  # and re-saved in cfgen's format
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    with pytest.raises(ValueError, match="format must be"):
        persist.save(_steer(model, 1.0), tmp_path / "x", format="pickle")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------------------
# Same counterfactual tokens after a round trip, both formats.

TOK_PROMPTS = ["hello there", "hi", "a much longer prompt here"]


@pytest.mark.parametrize("name,how", [("addition", "instance"), ("subtraction", "instance"),
                                       ("rotated", "config")])
def test_generate_gives_the_same_tokens_after_round_trips(tmp_path, name, how):
    import cfgen

    from .conftest import CharTokenizer, tiny_gpt2

    tok = CharTokenizer()
    model = tiny_gpt2(init=0.3)
    iv = _build(model, name, how)
    kw = dict(max_new_tokens=8, sampler=cfgen.Sampler(temperature=0.8), seed=3, eos_token_id=[])
    if name == "rotated":
        kw.update(sources=["zzzzzzzz", "qq", "the source text"], unit_locations={"sources->base": (1, 1)})
    want = cfgen.generate(iv, tok, TOK_PROMPTS, **kw)
    assert want.counterfactual_ids != want.factual_ids  # the intervention does something, so equality means something
    for fmt in ("cfgen", "pyvene"):
        persist.save(iv, tmp_path / fmt, format=fmt)
        got = cfgen.generate(persist.load(tmp_path / fmt, model), tok, TOK_PROMPTS, **kw)
        assert got.counterfactual_ids == want.counterfactual_ids and got.factual_ids == want.factual_ids, fmt


# ------------------------------------------------------------------------------------------------------------------
# Both formats, both directions, in a fresh CPU-only process.

CHILD_BOTH_WAYS = textwrap.dedent(
    """
    import contextlib, io, sys, torch
    torch.set_num_threads(1)
    import pyvene as pv
    from cfgen import persist
    from tests.conftest import tiny_gpt2
    from tests.test_persist import _build, _outputs
    root = sys.argv[1]
    model = tiny_gpt2()
    out = {}
    for name in sys.argv[2].split(","):
        for fmt in ("cfgen", "pyvene", "pyvene_own"):
            out[name + "/" + fmt] = _outputs(persist.load(f"{root}/parent/{name}/{fmt}", model))
        with torch.random.fork_rng(devices=[]):
            theirs = pv.IntervenableModel.load(f"{root}/parent/{name}/pyvene", model)
        out[name + "/pyvene_load"] = _outputs(theirs)
        iv = _build(model, name, "config")
        persist.save(iv, f"{root}/child/{name}/cfgen")
        persist.save(iv, f"{root}/child/{name}/pyvene", format="pyvene")
        out[name + "/child"] = _outputs(iv)
    torch.save(out, root + "/child_outputs.pt")
    print("child ok", torch.cuda.is_available())
    """
)


def test_both_formats_round_trip_in_a_fresh_process(tmp_path):
    import contextlib
    import io

    from .conftest import tiny_gpt2

    names = ["rotated", "low_rank", "autoencoder", "sigmoid_mask"]
    model = tiny_gpt2()
    expected = {}
    for name in names:
        iv = _build(model, name, "config")
        expected[name] = _outputs(iv)
        persist.save(iv, tmp_path / "parent" / name / "cfgen")
        persist.save(iv, tmp_path / "parent" / name / "pyvene", format="pyvene")
        with contextlib.redirect_stdout(io.StringIO()):
            iv.save(str(tmp_path / "parent" / name / "pyvene_own"))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD_BOTH_WAYS, str(tmp_path), ",".join(names)], cwd=root,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["child", "ok", "False"]
    got = torch.load(tmp_path / "child_outputs.pt", weights_only=True)
    for name in names:
        for fmt in ("cfgen", "pyvene", "pyvene_own", "pyvene_load"):
            assert all(torch.equal(a, b) for a, b in zip(got[f"{name}/{fmt}"], expected[name])), (name, fmt)
        # and the child's saves, read back here
        for fmt in ("cfgen", "pyvene"):
            loaded = _outputs(persist.load(tmp_path / "child" / name / fmt, model))
            assert all(torch.equal(a, b) for a, b in zip(loaded, got[f"{name}/child"])), (name, fmt)


def test_cli_loader_reads_pyvene_folders(tmp_path):
    """`cfgen run --intervention DIR` goes through cfgen.load, so pyvene's own folders work there too."""
    import contextlib
    import io

    from cfgen import cli

    from .conftest import tiny_gpt2

    model = tiny_gpt2()
    iv = _build(model, "low_rank", "config")
    with contextlib.redirect_stdout(io.StringIO()):
        iv.save(str(tmp_path / "pv"))
    _assert_same(iv, cli._load_intervention(tmp_path / "pv", model), "low_rank")
