"""A model dispatched by accelerate (part of it offloaded to CPU / disk) gives the undispatched model's tokens.

accelerate's offload hooks are the same mechanism it uses to spread a model
over several GPUs, so this checks on a CPU that pyvene interventions on an
offloaded layer (steering and interchange) and cfgen's decode loop follow them.
"""

import pytest
import torch

import cfgen

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from cfgen.models import default_model_dir

    cfgen.load_default_model()  # makes sure the converted cache exists
    layers = 30
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("cpu" if i < 10 else "disk") for i in range(layers)})
    model = AutoModelForCausalLM.from_pretrained(
        default_model_dir(), device_map=device_map, offload_folder=str(tmp_path_factory.mktemp("offload")),
        dtype=torch.float32,
    ).eval()
    assert any(hasattr(m, "_hf_hook") for m in model.modules()), "accelerate did not dispatch the model"
    return model


def _steer(model):
    import pyvene as pv

    vec = torch.linspace(-1.5, 1.5, 576)
    return pv.IntervenableModel({"layer": 20, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=576, source_representation=vec)},
                                model)


def _patch(model):
    import pyvene as pv

    return pv.IntervenableModel({"layer": 20, "component": "block_output",
                                 "intervention": pv.VanillaIntervention()}, model)


@pytest.mark.parametrize("kind", ["steer", "patch"])
def test_offloaded_layers_give_identical_tokens(default_model, offloaded, kind):
    model, tok = default_model
    prompts = ["The Eiffel Tower is in the city of", "Once upon a time"]
    kwargs = dict(max_new_tokens=8, seed=3, temperature=0.8, interventional=True)
    if kind == "patch":
        kwargs.update(sources=["The Colosseum is in the city of", "Long ago, far away"],
                      unit_locations={"sources->base": ([[6], [2]], [[8], [3]])})
    build = _steer if kind == "steer" else _patch
    ref = cfgen.generate(build(model), tok, prompts, **kwargs)
    got = cfgen.generate(build(offloaded), tok, prompts, **kwargs)
    assert got.factual_ids == ref.factual_ids
    assert got.counterfactual_ids == ref.counterfactual_ids
    assert got.interventional_ids == ref.interventional_ids
    assert ref.factual_ids != ref.counterfactual_ids  # the intervention does something
