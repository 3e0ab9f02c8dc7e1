from .attention import HLC_INITS, MEAAttention, init_hlc
from .block import MEADecoderLayer, SwiGLU
from .norm import RMSNorm

__all__ = ["HLC_INITS", "MEAAttention", "MEADecoderLayer", "RMSNorm", "SwiGLU", "init_hlc"]
