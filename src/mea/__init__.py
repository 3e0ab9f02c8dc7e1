"""mea: Multi-head Explicit Attention (HLC + GroupNorm) and a KV cache of h' component heads.

`import mea` registers model_type "mea" with AutoConfig / AutoModel / AutoModelForCausalLM.
"""

from .cache import MEACache
from .layers import MEAAttention
from .models import PRESETS, VARIANTS, MEAConfig, MEAForCausalLM, MEAModel, make_config

__version__ = "0.1.0"

__all__ = ["PRESETS", "VARIANTS", "MEAAttention", "MEACache", "MEAConfig", "MEAForCausalLM", "MEAModel",
           "__version__", "make_config"]
