"""Sphinx configuration of normkit's documentation site.

Build it (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

``-W`` turns every warning into an error (CI builds this way); the tutorials under
``docs/tutorials/`` are executed by sphinx-gallery on every build, so a broken tutorial fails it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import normkit

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# The tutorials' lab runs, and anything else they write, go to a scratch folder, not the checkout.
os.environ.setdefault("NORMKIT_DOCS_SCRATCH", str(DOCS / "_build" / "scratch"))

project = "normkit"
author = "the normkit authors"
copyright = "the normkit authors, Apache-2.0"
release = normkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "tutorials/README.rst",  # sphinx-gallery's gallery header, rendered into auto_tutorials/
    "auto_tutorials/*.ipynb",
    "auto_tutorials/*.py",
    "auto_tutorials/*.zip",
    "auto_tutorials/*.json",
    "auto_tutorials/*.codeobj.json",
]

# --- API reference: autodoc + napoleon (Google-style docstrings) ------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's page lists what its __all__ exports
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"  # no bare type lists for undocumented args
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # torch.nn.Module's docstrings are torch's, not ours
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Shape", "notes_style"), ("Reference", "notes_style")]
add_module_names = False


def _api_modules() -> list[str]:
    """The modules api/index.rst documents, in its order (one place to add a module)."""
    lines = (DOCS / "api" / "index.rst").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.startswith("   normkit")]


def _homes(modules: list[str]) -> dict[str, str]:
    """Where each exported class or function is documented: ``"normkit.fold_bn" -> "normkit.surgery"``.

    Most names are exported by more than one module (``normkit.fold_bn`` is
    ``normkit.surgery.fold_bn``). Each gets one page, under the documented module that defines it
    (the longest documented prefix of its ``__module__`` that exports it); the other modules'
    pages link there. Two pages for one class would be a duplicate description, and a warning.
    """
    import importlib
    import inspect

    homes: dict[str, str] = {}
    mods = {name: importlib.import_module(name) for name in modules}
    for name, mod in mods.items():
        for attr in getattr(mod, "__all__", []):
            if not hasattr(mod, attr):  # a stale __all__ entry: autosummary skips it as well
                continue
            obj = getattr(mod, attr)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            defined = getattr(obj, "__module__", None) or name
            owners = [
                m for m in mods if (defined == m or defined.startswith(m + ".")) and attr in mods[m].__all__
            ]
            home = max(owners, key=len) if owners else name
            homes[f"{name}.{attr}"] = f"{home}.{attr}"
    return homes


API_MODULES = _api_modules()
autosummary_context = {"nk_home": _homes(API_MODULES)}

# --- Markdown pages (the repository's own docs/*.md are pages of the site) --------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- Tutorials: executed on every build --------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r"/\d\d_",  # every numbered tutorial is executed
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "min_reported_time": 0,
    "plot_gallery": "True",
}

# --- HTML ---------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"normkit {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# MathJax: the CDN copy by default; NORMKIT_DOCS_MATHJAX points at a local MathJax 3 (offline viewing).
if os.environ.get("NORMKIT_DOCS_MATHJAX"):
    mathjax_path = os.environ["NORMKIT_DOCS_MATHJAX"]

nitpicky = False
suppress_warnings: list[str] = []


def _experiments_page(app, docname, source):
    """List docs/EXPERIMENTS.md (the lab's protocol, when the repository has it) under the lab page."""
    if docname == "lab" and (DOCS / "EXPERIMENTS.md").exists():
        source[0] = source[0].replace(
            "<!-- normkit-docs: experiments -->", "```{toctree}\n:maxdepth: 1\n\nEXPERIMENTS\n```\n"
        )


def _public_bases(app, name, obj, options, bases):
    """Show a class's public bases: ``torch.nn.BatchNorm2d``, not normkit's private ``_BatchNorm`` mixins."""
    import torch

    public = []
    for base in bases:
        if base.__name__.startswith("_"):
            continue
        if base.__module__.startswith("torch.") and getattr(torch.nn, base.__name__, None) is base:
            base = f"torch.nn.{base.__name__}"
        public.append(base)
    bases[:] = public or bases[:1]


def _one_letter_args(app, what, name, obj, options, lines):
    """An argument described as just ``C.`` would render as an enumerated list: make it the symbol ``C``.

    Runs after napoleon, which puts such a description on the line after ``:param name:``.
    """
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s+[A-Z]\.", line) and i and lines[i - 1].lstrip().startswith(":param "):
            lines[i] = re.sub(r"([A-Z])\.", r"``\1``.", line)


def setup(app):
    app.connect("autodoc-process-docstring", _one_letter_args)
    app.connect("source-read", _experiments_page)
    # The lab page's contents depend on whether EXPERIMENTS.md exists: re-read it on every build.
    app.connect("env-get-outdated", lambda app, env, added, changed, removed: ["lab"])
    app.connect("autodoc-process-bases", _public_bases)
