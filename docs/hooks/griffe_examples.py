"""Griffe extension for the API pages: torchfg's docstring habits, rendered properly.

* torchfg's docstrings (Google style) title their doctest section ``Example:``. Griffe reads only
  the plural ``Examples:`` as an examples section and turns the singular into an admonition whose
  ``>>>`` lines would render as nested block quotes; the title is renamed before parsing.
* Sphinx roles (``:class:`SemanticFusion```, ``:func:`~torchfg.knn```) become inline code: the
  pages are Markdown, and a role's target is often relative to the module, which a strict build
  could not resolve as a link.

The docstrings themselves are untouched (doctest does not care about either).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`~?(?P<target>[^`]+)`")


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE_TITLE.sub(r"\g<indent>Examples:", docstring.value)
        docstring.value = _SPHINX_ROLE.sub(r"`\g<target>`", text)
