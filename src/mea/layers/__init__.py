from .attention import HLC_INITS, MEAAttention, init_hlc
from .block import MEADecoderLayer, SwiGLU
from .differential import DifferentialAttention
from .norm import RMSNorm

__all__ = ["HLC_INITS", "DifferentialAttention", "MEAAttention", "MEADecoderLayer", "RMSNorm", "SwiGLU", "init_hlc"]
