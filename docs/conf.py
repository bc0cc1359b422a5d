"""Sphinx configuration of the sessionscope docs (``make docs`` builds them, warnings as errors)."""

from importlib.metadata import version as _version

project = "sessionscope"
author = "the sessionscope authors"
copyright = "2026, the sessionscope authors"
release = _version("sessionscope")

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.graphviz",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_tools", "Thumbs.db", ".DS_Store"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "sessionscope"
graphviz_output_format = "svg"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
