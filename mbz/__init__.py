"""mbz: prune and quantize a MobileNet-v2 into a .mbz file that runs without torch.

``mbz.pack(model, output, **options)`` and ``mbz.load(path)`` (``mbz.api``) are imported on
first use, so that ``import mbz`` (and ``mbz.format`` / ``mbz.runtime``) stays free of torch.
"""

import sys
import types

__version__ = "0.1.0"

_API = ("pack", "load")


class _Package(types.ModuleType):
    """The ``mbz`` package. ``mbz.pack`` is the API function although ``mbz/pack.py`` is also a
    submodule: importing that submodule (``from mbz.pack import ...``) does not replace the
    attribute, since the import system's ``setattr`` of a submodule named like an API function
    is dropped here (the submodule stays reachable through ``sys.modules``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> object:
        if name not in _API:
            raise AttributeError(f"module 'mbz' has no attribute {name!r}")
        from mbz import api  # torch and the whole library load here, on first use

        return getattr(api, name)


sys.modules[__name__].__class__ = _Package
