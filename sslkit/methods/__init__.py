"""Methods by name: ``create_method(cfg)`` looks up ``cfg.method.name`` in ``METHODS``.

Each module of this package is one method (its config with the paper's defaults, its step, its
registration) or a base several methods share; every module is imported here, so adding a file
adds the method.
"""

import importlib
import pkgutil

from sslkit.methods.base import METHODS, LossTerms, Method, create_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "LossTerms", "Method", "create_method"]
