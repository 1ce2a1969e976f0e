"""Hostile and broken intervention folders: every one raises cfgen.FormatError, and none runs code.

Each case starts from a good folder, breaks one thing, and checks that ``cfgen.load`` refuses it with a
``FormatError`` naming the folder, the file and what was wrong, while a canary file that the hostile payload would
create never appears and no module named in the folder gets imported.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import pyvene as pv
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfgen
from cfgen import persist

from .conftest import tiny_gpt2

D = 16
MODEL = None


def model():
    global MODEL
    if MODEL is None:
        MODEL = tiny_gpt2()
    return MODEL


class Scaled(pv.VanillaIntervention):
    """A user intervention type (top level of an importable module), allowed only when registered."""

    def __init__(self, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, base, source, subspaces=None, **kwargs):
        return base * self.factor


def _intervenable(intervention=None):
    intervention = intervention or pv.AdditionIntervention(embed_dim=D, source_representation=torch.linspace(0, 1, D))
    return pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": intervention}, model())


@pytest.fixture
def good(tmp_path):
    folder = tmp_path / "iv"
    persist.save(_intervenable(), folder)
    return folder


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "a folder ran code"


def _manifest(folder):
    return json.loads((folder / persist.MANIFEST).read_text())


def _write(folder, manifest):
    (folder / persist.MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def _refused(folder, *patterns, file=persist.MANIFEST):
    with pytest.raises(cfgen.FormatError) as info:
        cfgen.load(folder, model())
    err = info.value
    assert isinstance(err, ValueError)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # survives multiprocessing / pytest-xdist
    assert str(folder) in str(err) and (file is None or err.file == file), str(err)
    for pattern in patterns:
        assert pattern in str(err), (pattern, str(err))
    return err


# ------------------------------------------------------------------------------------------------------------------
# Classes: only allow-listed ones, and nothing named in a folder is ever imported.

CANARY_MODULE = "cfgen_canary_module_xyz"


@pytest.fixture
def canary_module(tmp_path, canary, monkeypatch):
    """A module on sys.path that creates the canary when imported."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / f"{CANARY_MODULE}.py").write_text(
        f"open({str(canary)!r}, 'w').close()\nimport pyvene\nclass Thing(pyvene.VanillaIntervention):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    yield f"{CANARY_MODULE}:Thing"
    assert CANARY_MODULE not in sys.modules


@pytest.mark.parametrize("name,kwargs", [
    ("os:system", {"command": "touch {canary}"}),
    ("posix:system", {"command": "touch {canary}"}),
    ("subprocess:run", {"args": ["touch", "{canary}"]}),
    ("subprocess:Popen", {"args": ["touch", "{canary}"]}),
    ("builtins:eval", {"source": "open('{canary}', 'w')"}),
    ("builtins:exec", {"source": "open('{canary}', 'w')"}),
    ("pathlib:Path.touch", {"self": "{canary}"}),
    ("pyvene.models.interventions.VanillaIntervention", {}),  # an allowed class, but not in cfgen's spelling
    ("pyvene.models.interventions:PCARotatedSpaceIntervention", {}),  # needs a PCA object: never from JSON
    ("tests.test_persist_safety:Scaled", {"factor": 2.0}),  # a user class that was not registered
])
def test_unknown_classes_are_refused_before_any_import(good, canary, name, kwargs):
    manifest = _manifest(good)
    manifest["interventions"][0]["class"] = name
    manifest["interventions"][0]["init_kwargs"] = json.loads(json.dumps(kwargs).replace("{canary}", str(canary)))
    _write(good, manifest)
    err = _refused(good, repr(name), "not allowed", "cfgen.register_intervention(", "classes=[")
    assert err.entry.startswith("interventions[0]")


def test_a_module_named_in_a_manifest_is_never_imported(good, canary_module):
    manifest = _manifest(good)
    manifest["interventions"][0]["class"] = canary_module
    _write(good, manifest)
    _refused(good, canary_module, "not allowed")


@pytest.mark.parametrize("type_string", ["<class 'os.system'>", "<class 'subprocess.Popen'>", "builtins.eval",
                                         f"<class '{CANARY_MODULE}.Thing'>"])
def test_pyvene_folders_name_classes_through_the_allow_list_too(tmp_path, canary_module, type_string):
    folder = _pyvene_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intervention_types"] = [type_string]
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "not allowed", file="config.json")


def test_registered_classes_load(tmp_path, monkeypatch):
    monkeypatch.setattr(persist, "_REGISTERED", {})
    folder = tmp_path / "scaled"
    persist.save(_intervenable(Scaled(factor=3.0, embed_dim=D)), folder)
    assert _manifest(folder)["interventions"][0]["class"] == "tests.test_persist_safety:Scaled"
    _refused(folder, "'tests.test_persist_safety:Scaled' is not allowed")
    loaded = cfgen.load(folder, model(), classes=[Scaled])
    assert float(next(iter(loaded.interventions.values())).factor) == 3.0
    _refused(folder, "not allowed")  # classes= lasts one call
    assert cfgen.register_intervention(Scaled) is Scaled
    assert float(next(iter(cfgen.load(folder, model()).interventions.values())).factor) == 3.0
    with pytest.raises(TypeError, match="subclass of pyvene.Intervention"):
        cfgen.register_intervention(os.system)
    with pytest.raises(TypeError, match="subclasses of pyvene.Intervention"):
        cfgen.load(folder, model(), classes=[dict])


# ------------------------------------------------------------------------------------------------------------------
# Malformed manifests.


@pytest.mark.parametrize("text,problem", [
    ("[]", "must be a JSON object, got list"),
    ("null", "must be a JSON object, got NoneType"),
    ("42", "must be a JSON object, got int"),
    ("", "empty"),
    ("   \n", "empty"),
    ("{", "invalid JSON"),
    ('{"format": NaN}', "invalid JSON"),
    ('{"format": Infinity}', "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 40 + "1" + "}" * 40, "nested deeper than"),
    ("{}", "unsupported format"),
    ('{"format": 2}', "'interventions' must be a non-empty list"),
    ('{"format": 2, "interventions": []}', "'interventions' must be a non-empty list"),
    ('{"format": 2, "interventions": {}}', "'interventions' must be a non-empty list"),
    ('{"format": 2, "interventions": [[]]}', "must be a JSON object, got list"),
    ('{"format": 2, "interventions": [null]}', "must be a JSON object, got NoneType"),
    ('{"format": 99, "interventions": []}', "unsupported format 99"),
    ('{"format": 2, "interventions": [], "run": "rm -rf /"}', "unknown top-level key(s) ['run']"),
])
def test_malformed_json(good, text, problem):
    _write(good, text)
    _refused(good, problem)


def test_invalid_utf8_and_oversized_manifests(good):
    (good / persist.MANIFEST).write_bytes(b'{"format": "\xff\xfe"}')
    _refused(good, "invalid JSON")
    with open(good / persist.MANIFEST, "wb") as fh:
        fh.write(b" " * (persist._MAX_JSON_BYTES + 1) + b"{}")
    _refused(good, "too large")


def _edit(entry_edit=None, top_edit=None):
    def apply(manifest):
        if entry_edit:
            entry_edit(manifest["interventions"][0])
        if top_edit:
            top_edit(manifest)
        return manifest
    return apply


def _set(path, value):
    def edit(obj):
        *head, last = path
        for p in head:
            obj = obj[p]
        obj[last] = value
    return edit


def _del(key):
    return lambda obj: obj.pop(key)


ENTRY_CASES = {
    "no class": (_del("class"), "missing key(s) ['class']"),
    "no key": (_del("key"), "missing key(s) ['key']"),
    "no state_file": (_del("state_file"), "missing key(s) ['state_file']"),
    "no init_kwargs": (_del("init_kwargs"), "missing key(s) ['init_kwargs']"),
    "unknown entry key": (_set(["exec"], "x"), "unknown key(s) ['exec']"),
    "class not a string": (_set(["class"], ["os", "system"]), "'class' must be a string"),
    "key not a string": (_set(["key"], 3), "'key' must be a non-empty string"),
    "kwargs a list": (_set(["init_kwargs"], [1, 2]), "must be a JSON object, got list"),
    "unknown kwarg": (_set(["init_kwargs", "command"], "touch x"), "does not take the argument(s) ['command']"),
    "kwarg wrong type": (_set(["init_kwargs", "embed_dim"], "16"), "'embed_dim' of AdditionIntervention must be"),
    "bool for int": (_set(["init_kwargs", "layer"], True), "'layer' of AdditionIntervention must be an int"),
    "negative dim": (_set(["init_kwargs", "embed_dim"], -4), "'embed_dim'"),
    "deep kwarg": (_set(["init_kwargs", "subspace_partition"], [[[[[[[[[[1]]]]]]]]]]), "nested at most 8"),
    "dunder component": (_set(["representation", "component"], "__class__.__init__.output"), "'component'"),
    "path component": (_set(["representation", "component"], "../../etc.output"), "'component'"),
    "unknown rep field": (_set(["representation", "payload"], 1), "unknown representation field(s) ['payload']"),
    "rep a list": (_set(["representation"], [1, "block_output"]), "'representation' must be a JSON object"),
    "bad interchange_dim": (_set(["interchange_dim"], "all"), "'interchange_dim' must be"),
    "bad constant flag": (_set(["is_source_constant"], "yes"), "'is_source_constant' must be a bool"),
    "parent state file": (_set(["state_file"], "../outside.safetensors"), "not a plain file name"),
    "absolute state file": (_set(["state_file"], "/etc/passwd.safetensors"), "not a plain file name"),
    "dot state file": (_set(["state_file"], ".."), "must be a .safetensors file name"),
    "missing state file": (_set(["state_file"], "nothing.safetensors"), "does not exist"),
    "wrong suffix": (_set(["state_file"], "intkey.pt"), "must be a .safetensors file name"),
    "component not in model": (_set(["representation", "component"], "transformer.nothing.output"),
                               "cannot place the interventions on this model"),
    "key not matching": (_set(["key"], "some_other_key"), "keys differ after rebuild"),
    "constructor fails": (_set(["init_kwargs", "subspace_partition"], [[0, 100]]), None),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_malformed_entries(good, case):
    edit, problem = ENTRY_CASES[case]
    manifest = _manifest(good)
    edit(manifest["interventions"][0])
    _write(good, manifest)
    if case == "constructor fails":  # a partition pyvene accepts at construction and only fails on when run
        loaded = cfgen.load(good, model())
        assert next(iter(loaded.interventions.values())).subspace_partition == [list(range(100))]
        return
    _refused(good, *([problem] if problem else []), file="nothing.safetensors" if case == "missing state file"
             else persist.MANIFEST)


def test_other_top_level_problems(good):
    original = _manifest(good)
    for edit, problem in [(_set(["mode"], "eval"), "'mode' must be"), (_set(["use_fast"], 1), "'use_fast'"),
                          (_set(["format"], "2"), "unsupported format"), (_set(["format"], True), "unsupported"),
                          (_set(["format"], 2.0), "unsupported format")]:
        manifest = copy.deepcopy(original)
        edit(manifest)
        _write(good, manifest)
        _refused(good, problem)
    manifest = copy.deepcopy(original)
    manifest["interventions"].append(copy.deepcopy(manifest["interventions"][0]))
    _write(good, manifest)
    _refused(good, "duplicate intervention keys")


def test_files_must_stay_inside_the_folder(good, tmp_path):
    entry = _manifest(good)["interventions"][0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(good / entry["state_file"], outside)
    link = good / "intkey_link.safetensors"
    link.symlink_to(outside)
    manifest = _manifest(good)
    manifest["interventions"][0]["state_file"] = link.name
    _write(good, manifest)
    _refused(good, "outside the folder", file=None)
    # a symlink that stays inside is just a file
    link.unlink()
    link.symlink_to(good / entry["state_file"])
    assert isinstance(cfgen.load(good, model()), pv.IntervenableModel)
    # the manifest itself may not point outside either
    (tmp_path / "elsewhere.json").write_text((good / persist.MANIFEST).read_text())
    (good / persist.MANIFEST).unlink()
    (good / persist.MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    _refused(good, "outside the folder")
    (good / persist.MANIFEST).unlink()
    (good / persist.MANIFEST).mkdir()
    _refused(good, "not a regular file")


def test_not_a_folder_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by cfgen.persist.save"):
        cfgen.load(tmp_path / "missing", model())
    with pytest.raises(FileNotFoundError, match="config.json"):
        cfgen.load(tmp_path, model())


# ------------------------------------------------------------------------------------------------------------------
# Broken tensor files.


def _state_file(folder):
    return folder / _manifest(folder)["interventions"][0]["state_file"]


def _to_format_1(folder):
    """The catalogue's layout: torch-saved .bin state dicts, manifest format 1."""
    import safetensors.torch

    manifest = _manifest(folder)
    entry = manifest["interventions"][0]
    state = safetensors.torch.load_file(str(folder / entry["state_file"]))
    (folder / entry["state_file"]).unlink()
    entry["state_file"] = entry["state_file"].replace(".safetensors", ".bin")
    torch.save(state, folder / entry["state_file"])
    manifest["format"] = 1
    _write(folder, manifest)
    return state


def _save_safetensors(path, state):
    import safetensors.torch

    safetensors.torch.save_file(state, str(path))


DAMAGES = ["truncated", "empty", "garbage", "wrong shape", "extra key", "missing key", "wrong dtype", "not a dict"]


# a safetensors file is always a dict of tensors, so "not a dict" exists only for .bin files
@pytest.mark.parametrize("layout,damage", [(lay, d) for lay in ("safetensors", "bin") for d in DAMAGES
                                           if (lay, d) != ("safetensors", "not a dict")])
def test_broken_tensor_files(good, layout, damage):
    import safetensors.torch

    state = safetensors.torch.load_file(str(_state_file(good))) if layout == "safetensors" else _to_format_1(good)
    path = _state_file(good)
    raw = path.read_bytes()
    changed = dict(state)
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    else:
        if damage == "wrong shape":
            changed["source_representation"] = torch.zeros(D + 1)
        elif damage == "extra key":
            changed["payload"] = torch.zeros(3)
        elif damage == "missing key":
            del changed["interchange_dim"]
        elif damage == "wrong dtype":
            changed["source_representation"] = torch.zeros(D, dtype=torch.int64)
        if damage == "not a dict":
            torch.save([state["source_representation"]], path)
        elif layout == "safetensors":
            _save_safetensors(path, changed)
        else:
            torch.save(changed, path)
    expected = {
        "truncated": "cannot read the tensors", "empty": "the tensor file is empty", "garbage": "cannot read",
        "wrong shape": "shape [17]", "extra key": "unexpected ['payload']", "missing key": "missing ['interchange_dim']",
        "wrong dtype": "dtype torch.int64", "not a dict": "does not hold a state dict",
    }[damage]
    err = _refused(good, expected, file=path.name)
    assert err.entry.startswith("interventions[0]")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_payload_in_a_bin_file_never_runs(good, canary):
    _to_format_1(good)
    torch.save({"source_representation": _Evil(canary)}, _state_file(good))
    _refused(good, "cannot read the tensors", file=_state_file(good).name)


# ------------------------------------------------------------------------------------------------------------------
# pyvene's layout.


def _pyvene_folder(tmp_path):
    config = pv.IntervenableConfig(pv.RepresentationConfig(1, "block_output", low_rank_dimension=3,
                                                           intervention_type=pv.LowRankRotatedSpaceIntervention))
    folder = tmp_path / "pv"
    with contextlib.redirect_stdout(io.StringIO()):
        pv.IntervenableModel(config, model()).save(str(folder))
    return folder


def test_hostile_pyvene_folders(tmp_path, canary):
    folder = _pyvene_folder(tmp_path)
    good = json.loads((folder / "config.json").read_text())
    state_file = next(folder.glob("intkey_*.bin"))
    assert isinstance(cfgen.load(folder, model()), pv.IntervenableModel)

    def broken(edit, problem, file="config.json"):
        config = copy.deepcopy(good)
        edit(config)
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        _refused(folder, problem, file=file)

    broken(lambda c: c.clear(), "not a pyvene intervention config")
    broken(_set(["representations"], {}), "non-empty lists of the same length")
    broken(_set(["intervention_types"], []), "non-empty lists of the same length")
    broken(_set(["representations", 0], list(range(20))), "20 values for 14")
    broken(_set(["representations", 0, 6], "os.system"), "must be null")
    broken(_set(["representations", 0, 1], "__class__.output"), "'component'")
    broken(_set(["representations", 0, 0], -1), "'layer'")
    broken(_set(["intervention_dimensions"], [1, 2, 3]), "one entry each")
    broken(_set(["intervention_constant_sources", 0], "no"), "must be a bool")
    broken(_set(["sorted_keys"], ["other"]), "differ from the rebuilt")
    broken(_set(["mode"], "fast"), "'mode' must be")
    (folder / "config.json").write_text("[]")
    _refused(folder, "must be a JSON object", file="config.json")
    (folder / "config.json").write_text(json.dumps(good))
    raw = state_file.read_bytes()
    state_file.write_bytes(raw[:100])
    _refused(folder, "cannot read the tensors", file=state_file.name)
    torch.save({"x": _Evil(canary)}, state_file)
    _refused(folder, "cannot read the tensors", file=state_file.name)
    state_file.unlink()
    _refused(folder, "the state file is missing", file=state_file.name)


# ------------------------------------------------------------------------------------------------------------------
# Fuzzed manifests.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["os:system", "subprocess:run", "builtins:eval", "../x", "/etc/passwd", "touch canary",
                       "pyvene.models.interventions:VanillaIntervention", "block_output", "__class__"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


_FUZZ = {}


def _fuzz_folder():
    """One good folder per session (hypothesis examples share it; each example rewrites only the manifest)."""
    if "folder" not in _FUZZ:
        root = Path(tempfile.mkdtemp(prefix="cfgen-fuzz-"))
        persist.save(_intervenable(), root / "iv")
        _FUZZ.update(folder=root / "iv", manifest=_manifest(root / "iv"), canary=root / "canary")
    return _FUZZ["folder"], _FUZZ["manifest"], _FUZZ["canary"]


def _load_or_format_error(folder, canary):
    try:
        result = cfgen.load(folder, model())
    except cfgen.FormatError as err:
        assert str(folder) in str(err)
    else:
        assert isinstance(result, pv.IntervenableModel)
    assert not canary.exists()


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(JSON)
def test_fuzzed_whole_manifests(value):
    folder, _, canary = _fuzz_folder()
    _write(folder, json.dumps(value))
    _load_or_format_error(folder, canary)


@FUZZ_SETTINGS
@given(st.data())
def test_fuzzed_edits_of_a_good_manifest(data):
    folder, good, canary = _fuzz_folder()
    manifest = copy.deepcopy(good)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
        *head, last = path
        parent = manifest
        for p in head:
            parent = parent[p]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[last]
        else:
            parent[last] = data.draw(JSON)
    _write(folder, json.dumps(manifest))
    _load_or_format_error(folder, canary)


@FUZZ_SETTINGS
@given(st.text(max_size=60) | st.sampled_from(["os:system", "builtins:__import__", "importlib:import_module",
                                                "pyvene:VanillaIntervention", "torch:load", "pickle:loads"]))
def test_fuzzed_class_names(name):
    folder, good, canary = _fuzz_folder()
    manifest = copy.deepcopy(good)
    manifest["interventions"][0]["class"] = name
    _write(folder, json.dumps(manifest))
    if name == good["interventions"][0]["class"]:
        return
    with pytest.raises(cfgen.FormatError, match="not allowed"):
        cfgen.load(folder, model())
    assert not canary.exists()
