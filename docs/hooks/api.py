"""Fill the API page with one `::: module.name` block per public name of `featx`.

The names come from `featx.__all__` and each block points at the module that defines the
object, so the reference follows the code: a name added to `featx.__all__` appears here
without editing the page.
"""

from __future__ import annotations

import inspect

import featx

MARKER = "<!-- featx-public-names -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    blocks = []
    for name in featx.__all__:
        obj = getattr(featx, name)
        if name.startswith("__") or inspect.ismodule(obj):
            continue
        module = obj.__module__
        blocks.append(f"::: {module}.{name}\n    options:\n      heading: featx.{name}\n")
    return markdown.replace(MARKER, "\n".join(blocks))
