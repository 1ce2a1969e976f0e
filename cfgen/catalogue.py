"""The catalogue: ready-made interventions for the embedded model, shipped inside the package.

Each entry is a folder written by :func:`cfgen.save` (a ``cfgen_intervention.json``
manifest and its tensors) under ``cfgen/catalogue_data/<name>/``, so it is there
after any install (wheel, sdist, editable) and from any working directory. The
scripts that rebuild the entries, their READMEs and measurements stay in the
repository's ``interventions/`` folder.

========================  ==========================================================
``steering_dark``         "dark" steering vector, layer 9 block output (AdditionIntervention)
``patch_landmark_city``   interchange at layer 24, Eiffel Tower <- Colosseum (VanillaIntervention);
                          its prompts and positions: :func:`example`
``ravel_country_das``     RAVEL Country subspace, rank 16 at layer 8, trained with DAS
``ravel_country_mdas``    the same, trained with MDAS (Cause + Isolate)
========================  ==========================================================

Small data sets the entries were built from ship beside them, each with its
licence: :func:`data_path` (``ravel_city``: the RAVEL city subset, MIT, Huang et al.).

Example:
    >>> import cfgen
    >>> cfgen.catalogue.names()
    ['patch_landmark_city', 'ravel_country_das', 'ravel_country_mdas', 'steering_dark']
    >>> (cfgen.catalogue.path("steering_dark") / "cfgen_intervention.json").is_file()
    True
    >>> cfgen.catalogue.example("patch_landmark_city")["source"]
    'The Colosseum is located in the city of'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyvene as pv
    import torch

__all__ = ["ROOT", "names", "path", "resolve", "load", "example", "data_path", "UnknownEntry"]

ROOT = Path(__file__).resolve().parent / "catalogue_data"
_MANIFEST = "cfgen_intervention.json"  # cfgen.persist.MANIFEST; not imported so that listing stays torch-free
_EXAMPLE = "example.json"
_DATA = ROOT / "data"


class UnknownEntry(KeyError, FileNotFoundError):
    """A name that is not in the catalogue (a ``KeyError`` and a ``FileNotFoundError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def names() -> list[str]:
    """The catalogue's entry names, sorted.

    Example:
        >>> import cfgen
        >>> "steering_dark" in cfgen.catalogue.names()
        True
    """
    if not ROOT.is_dir():
        return []
    return sorted(p.name for p in ROOT.iterdir() if (p / _MANIFEST).is_file())


def path(name: str) -> Path:
    """The folder of catalogue entry ``name`` (loadable with ``cfgen.load(folder, model)``).

    Raises :class:`UnknownEntry` naming the entry and listing the catalogue.

    Example:
        >>> import cfgen
        >>> cfgen.catalogue.path("steering_dark").name
        'steering_dark'
    """
    if not isinstance(name, str):
        raise TypeError(f"a catalogue name is a string, one of {names()}; got {type(name).__name__}")
    known = names()
    if name not in known:
        raise UnknownEntry(f"{name!r} is not in cfgen's catalogue; its entries are: {', '.join(known)}")
    return ROOT / name


def resolve(name_or_folder: str | os.PathLike) -> Path:
    """The folder meant by a catalogue name or a folder path (as ``cfgen run --intervention`` takes it).

    A folder holding a ``cfgen_intervention.json`` manifest wins; then a catalogue
    name; then any other existing folder is returned as given (so that loading it
    reports what is missing there). Anything else raises :class:`UnknownEntry`,
    naming it and listing the catalogue.

    Example:
        >>> import cfgen
        >>> cfgen.catalogue.resolve("steering_dark") == cfgen.catalogue.path("steering_dark")
        True
        >>> cfgen.catalogue.resolve("no_such_thing")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cfgen.catalogue.UnknownEntry: no intervention 'no_such_thing': ...; the catalogue has patch_landmark_city, ...
    """
    folder = Path(name_or_folder).expanduser()
    if (folder / _MANIFEST).is_file():
        return folder
    if isinstance(name_or_folder, str) and name_or_folder in names():
        return ROOT / name_or_folder
    if folder.is_dir():
        return folder
    raise UnknownEntry(f"no intervention {str(name_or_folder)!r}: not a folder and not a catalogue name; "
                       f"the catalogue has {', '.join(names())}")


def example(name: str) -> dict[str, Any]:
    """The prompts and ``unit_locations`` an entry was built for (its ``example.json``).

    Entries whose intervention needs no source (steering vectors, for instance) have none:
    asking for it raises ``FileNotFoundError``.

    Example:
        >>> import cfgen
        >>> ex = cfgen.catalogue.example("patch_landmark_city")
        >>> ex["prompt"], ex["unit_locations"]
        ('The Eiffel Tower is located in the city of', {'sources->base': [9, 9]})
    """
    file = path(name) / _EXAMPLE
    if not file.is_file():
        raise FileNotFoundError(f"catalogue entry {name!r} has no {_EXAMPLE} (it needs no source prompt)")
    return json.loads(file.read_text(encoding="utf-8"))


def data_path(name: str) -> Path:
    """The folder of shipped data set ``name`` (its files and its ``LICENSE``).

    Example:
        >>> import cfgen, json
        >>> folder = cfgen.catalogue.data_path("ravel_city")
        >>> (folder / "LICENSE").read_text().splitlines()[0]
        'MIT License'
        >>> attrs = json.loads((folder / "ravel_city_entity_attributes.json").read_text())
        >>> sorted(next(iter(attrs.values())))
        ['Continent', 'Country', 'Language']
    """
    known = sorted(p.name for p in _DATA.iterdir() if p.is_dir()) if _DATA.is_dir() else []
    if name not in known:
        raise UnknownEntry(f"{name!r} is not a data set shipped with cfgen; they are: {', '.join(known)}")
    return _DATA / name


def load(name: str, model: torch.nn.Module, *, device: str | torch.device | None = None) -> pv.IntervenableModel:
    """Catalogue entry ``name`` around ``model``: a ``pyvene.IntervenableModel`` (via :func:`cfgen.load`).

    The entries were built for the embedded model (:func:`cfgen.load_default_model`).

    Example:
        >>> import cfgen
        >>> model, tok = cfgen.load_default_model()
        >>> steer = cfgen.catalogue.load("steering_dark", model)
        >>> type(steer).__name__
        'IntervenableModel'
        >>> r = cfgen.generate(steer, tok, "Once upon a time", max_new_tokens=4, seed=0)
        >>> len(r.factual_ids[0]) <= 4
        True
    """
    from .persist import load as load_folder

    return load_folder(path(name), model, device=device)
