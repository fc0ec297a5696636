"""Sphinx configuration of the skdeepmix documentation (``make docs``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "doc"))  # _gallery_order
os.environ.setdefault("OMP_NUM_THREADS", "1")  # gallery examples: reproducible, one thread

import skdeepmix  # noqa: E402

project = "skdeepmix"
author = "the skdeepmix developers"
copyright = "2026, the skdeepmix developers"
release = skdeepmix.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
    "sphinx_design",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "README.md",
    "**/GALLERY_HEADER.rst",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "sg_execution_times.rst",
]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "colon_fence"]

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": True}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "backreferences_dir": "gen_modules/backreferences",
    "doc_module": ("skdeepmix",),
    "reference_url": {"skdeepmix": None},
    "download_all_examples": False,
    "within_subsection_order": "_gallery_order.ExampleOrder",
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib",),
    "remove_config_comments": True,
    "show_memory": False,
    "abort_on_example_error": True,
}

html_theme = "pydata_sphinx_theme"
html_title = "skdeepmix"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "header_links_before_dropdown": 5,
    "navbar_align": "left",
    "navbar_end": ["navbar-icon-links"],
    "show_prev_next": False,
    # the examples' sections are short: their width goes to the code instead
    "secondary_sidebar_items": {
        "**": ["page-toc"],
        **{f"auto_examples/{p.stem}": [] for p in (ROOT / "examples").glob("*.py")},
    },
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_context = {"default_mode": "light"}
# pages without sub-pages: no (empty) section navigation on the left
html_sidebars = {
    page: []
    for page in ("index", "getting_started", "choosing", "drop_in", "scaling", "concepts",
                 "changelog", "design")
}

# Methods inherited from scikit-learn (``get_metadata_routing``, ``set_output``) carry
# references to labels of scikit-learn's own documentation; link them to its pages.
SKLEARN_LABELS = {
    "metadata_routing": "metadata_routing.html",
    "df_output_transform": "auto_examples/miscellaneous/plot_set_output.html",
    "sphx_glr_auto_examples_miscellaneous_plot_set_output.py":
        "auto_examples/miscellaneous/plot_set_output.html",
}


def _link_sklearn_labels(app, env, node, contnode):
    from docutils import nodes

    target = node.get("reftarget")
    if node.get("refdomain") == "std" and target in SKLEARN_LABELS:
        uri = "https://scikit-learn.org/stable/" + SKLEARN_LABELS[target]
        ref = nodes.reference("", "", internal=False, refuri=uri)
        ref += contnode
        return ref
    return None


def setup(app):
    app.connect("missing-reference", _link_sklearn_labels)
