"""seng-dist: the Sketchy Empirical Natural Gradient method for (distributed) PyTorch training.

``import seng_dist`` needs only torch.
"""

from . import kinds, schedules, solver
from .config import DiagonalConfig, DistributedConfig, SENGConfig, SketchConfig
from .kinds import register_layer_kind, supported_layer_types
from .optimizer import SENG
from .warn import SENGDeprecationWarning, SENGWarning

__all__ = [
    "SENG",
    "SENGConfig",
    "SketchConfig",
    "DistributedConfig",
    "DiagonalConfig",
    "SENGWarning",
    "SENGDeprecationWarning",
    "kinds",
    "register_layer_kind",
    "schedules",
    "solver",
    "supported_layer_types",
]
__version__ = "0.3.0.dev0"
