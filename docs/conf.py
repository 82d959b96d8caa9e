"""Sphinx configuration for the pgvar documentation (MyST markdown, like stable-baselines3's docs).

Build locally (no network needed, nothing is trained):

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOCS_DIR.parent
# Document the checkout next to this file, installed or not; `_ext` holds the local Sphinx extensions.
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(DOCS_DIR / "_ext"))
# Importing pgvar pulls in torch: keep it on one thread so a docs build does not fight the test runner.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _version() -> str:
    try:
        import pgvar

        return str(getattr(pgvar, "__version__", "0.1.0"))
    except Exception:  # the docs must still build the narrative pages if the package is half-written
        return "0.1.0"


project = "pgvar"
author = "pgvar developers"
copyright = "2026, pgvar developers"
release = _version()
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # MathJax copied into the build (_static/mathjax), so formulas render without network.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    # Local: fails the build when a public name of pgvar.estimators / measure / problems is not in api.md.
    "coverage_check",
    # Local: after an HTML build, every internal link (href/src, #fragment) resolves, or the build warns.
    "internal_links",
    # The examples gallery (gallery/): every examples/*.py, run in its small version, with its output and plots.
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]
templates_path: list[str] = []

# -- MyST -------------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# -- autodoc / autosummary ---------------------------------------------------------------------------------
# The code uses SB3-style ``:param name:`` reST fields, so no napoleon. Type hints go into the field list, as
# in SB3's docs (no sphinx_autodoc_typehints).
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_preserve_defaults = True
# api.md lists names with autosummary tables and documents them with explicit autofunction/autoclass
# directives (rlax's api.rst layout): no stub pages are generated into the source tree.
autosummary_generate = False
add_module_names = False
python_use_unqualified_type_names = True

# The coverage check (docs/_ext/coverage_check.py): every name in these modules' __all__ must be documented
# on the page below.
coverage_check_modules = ["pgvar.estimators", "pgvar.measure", "pgvar.problems"]
coverage_check_docname = "api"

# -- Examples gallery (sphinx-gallery) ---------------------------------------------------------------------
# The build runs each example in its small version (seconds, not the minutes of a full run); a full run would
# also write figures. PGVAR_EXAMPLE_SMOKE=0 in the environment builds the gallery from full runs.
os.environ.setdefault("PGVAR_EXAMPLE_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sphinx_gallery_conf = {
    "examples_dirs": str(REPO_ROOT / "examples"),
    # Generated into the source tree (docs/gallery, ignored by git), as sphinx-gallery requires.
    "gallery_dirs": "gallery",
    # Which examples are executed (a regular expression on the path; all by default). Those that do not match
    # are still shown, without output. tests/test_docs.py runs only the one that plots: the others run in
    # their own test.
    "filename_pattern": os.environ.get("PGVAR_DOCS_GALLERY_RUN", r"\.py$"),
    "within_subsection_order": "ExampleTitleSortKey",
    "download_all_examples": False,
    "image_scrapers": ("matplotlib",),
    "show_signature": False,
    # The execution-times page loads its table scripts from CDNs: not in a docs build that works offline.
    "write_computation_times": False,
}

# -- HTML -------------------------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_static_path = ["_static"]
html_css_files = ["pgvar.css"]  # wrap long code lines and wide tables
html_title = f"pgvar {release}"
html_show_sourcelink = False
# No intersphinx: the build must work without a network.
