"""cfgen.persist: save a trained rotation, load it in a fresh CPU-only process, get identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
