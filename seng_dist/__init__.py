"""seng-dist: the Sketchy Empirical Natural Gradient method for (distributed) PyTorch training.

``import seng_dist`` needs only torch.
"""

from . import schedules, solver
from .config import DiagonalConfig, DistributedConfig, SENGConfig, SketchConfig
from .optimizer import SENG
from .warn import SENGWarning

__all__ = ["SENG", "SENGConfig", "SketchConfig", "DistributedConfig", "DiagonalConfig",
           "SENGWarning", "schedules", "solver"]
__version__ = "0.2.0"
