from .attention import MEAAttention
from .block import MEADecoderLayer, SwiGLU
from .differential import DifferentialAttention
from .norm import RMSNorm

__all__ = ["DifferentialAttention", "MEAAttention", "MEADecoderLayer", "RMSNorm", "SwiGLU"]
