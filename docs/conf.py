"""Sphinx configuration for invertnet."""

project = "invertnet"
author = "invertnet developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build"]
