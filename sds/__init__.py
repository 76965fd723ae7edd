"""sds: Sparse-Dense-Sparse pruning of language models (arXiv 2408.10473).

    from sds import prune
    report = prune(model, calibration, method="sparsegpt", pattern="2:4", sds=True)
"""

from .api import PruneReport, oneshot, prune
from .errors import ConfigError, DataError, ModelError, NumericalError, SDSError, StoreError
from .layerwise import Needs
from .patterns import LayerRules, Pattern
from .pruners import magnitude, sparsegpt, wanda
from .solver import SolverOptions, admm

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "LayerRules", "ModelError", "Needs", "NumericalError", "Pattern",
    "PruneReport", "SDSError", "SolverOptions", "StoreError", "admm", "magnitude", "oneshot",
    "prune", "sparsegpt", "wanda",
]
