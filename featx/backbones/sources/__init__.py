"""The backbone sources: each module here registers its builder with `register_backbone`.

A new source is one new module in this folder; every module here is imported with the
`featx.backbones` package, so its backbones are known as soon as a name is looked up.
"""

import importlib
import pkgutil

__all__: list[str] = []

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
