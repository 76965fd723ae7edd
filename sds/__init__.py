"""sds: Sparse-Dense-Sparse pruning of language models (arXiv 2408.10473).

    from sds import prune
    report = prune(model, calibration, method="sparsegpt", pattern="2:4", sds=True)

The names below are imported on first use (PEP 562), so that `import sds.options` or
`import sds.errors` does not import torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PruneReport": "api", "oneshot": "api", "prune": "api",
    "ConfigError": "errors", "DataError": "errors", "ModelError": "errors",
    "NumericalError": "errors", "SDSError": "errors", "StoreError": "errors",
    "Needs": "layerwise",
    "SDSConfig": "options", "SolverOptions": "options",
    "LayerRules": "patterns", "Pattern": "patterns",
    "magnitude": "pruners", "sparsegpt": "pruners", "wanda": "pruners",
    "admm": "pruners",
}

# the submodules, also reachable after a plain `import sds` (sds.data, sds.evaluate, ...)
_SUBMODULES = ("api", "data", "demo", "errors", "evaluate", "layerwise", "models", "options",
               "patterns", "pruners", "reconstruct", "solver", "suite")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # binds sds.<name> on import
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sds' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
