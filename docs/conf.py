"""Sphinx configuration for the cfgen documentation (``make docs``).

The build is offline: no intersphinx, MathJax served from the built site
(``sphinx-mathjax-offline``), and the tutorials run on the embedded model, which
is converted once and cached by ``cfgen.load_default_model``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import cfgen  # noqa: E402

project = "cfgen"
author = "cfgen contributors"
copyright = "cfgen contributors"
release = cfgen.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    # MathJax bundled in the package and copied into _static/mathjax: maths renders offline (no CDN).
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_static/**", "_build", "notes", "notes/**", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]

# MyST: $...$ / $$...$$ maths, ::: fences, and heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Tutorials are executed on every build that changes them (results cached in
# _build/.jupyter_cache); an exception in any cell fails the build.
nb_execution_mode = os.environ.get("CFGEN_DOCS_EXECUTE", "cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_cache_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build", ".jupyter_cache")
nb_merge_streams = True

# autodoc / napoleon (Google-style docstrings).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"cfgen {release}"
html_static_path = []
if html_theme == "alabaster":
    html_theme_options = {
        "description": "Noise-matched counterfactual text for language-model interventions",
        "fixed_sidebar": True,
        "page_width": "1100px",
        "sidebar_width": "240px",
    }
