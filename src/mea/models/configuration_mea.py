"""`MEAConfig`: a Llama-style decoder config with Hugging Face field names plus the MEA knobs (`mea_*`)."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..cache import CacheLayout, cache_layout
from ..ops import HLC_INITS, check_mixing
from ..ops.kvquant import DEFAULT_GROUP_SIZE, DEFAULT_RESIDUAL, KVQuant
from ..ops.rope import SUPPORTED_ROPE_TYPES

MEASURED = "measured"  # mea_head_norm_init: set from the data at the start of training (models.head_norm_init)

class MEAConfig(PreTrainedConfig):
    model_type = "mea"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias also sets o)
    attention_out_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    use_qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3), on composite key heads
    qk_norm_eps: float | None = None  # defaults to rms_norm_eps, as in Qwen3
    # --- MEA ---
    mea_hlc: bool = True  # Head-level Linear Composition of key and value heads
    mea_head_norm: bool = True  # the paper's GroupNorm: RMSNorm of each attention head's output
    mea_head_norm_eps: float = 1e-5  # as the Differential Transformer's subln
    # variations of GroupNorm (need mea_head_norm=True; not with differential attention):
    mea_head_norm_weight: bool = True  # the norm's learnable per-feature scale (False: plain RMS normalisation)
    mea_head_norm_init: float | str = 1.0  # the per-feature weight's initial value (the scale of the norm's output at init), or "measured": the raw head outputs' RMS on the first training batch (models.head_norm_init)
    mea_head_gain: bool = False  # a learnable gain per head after the norm (init 1): heads keep a magnitude each
    mea_head_norm_blend: bool = False  # (1 - a_i) o_i + a_i norm(o_i), a learnable a_i per head from 0: the norm's strength is learned
    mea_num_component_heads: int | list | None = None  # h' (per layer if a list); None: h' = h
    mea_num_key_components: int | list | None = None  # h'_K (per layer if a list); None: h'
    mea_num_value_components: int | list | None = None  # h'_V (per layer if a list); None: h'
    mea_key_mixing: str = "head"  # "head" (the paper's HLC) or "rope_pair" (complex weight per RoPE pair)
    mea_value_mixing: str = "head"  # "head" (the paper's HLC) or "latent" (a value latent of any width)
    mea_value_latent_dim: int | list | None = None  # R per layer (with mea_value_mixing="latent")
    mea_hlc_init: str | None = None  # "identity" (default when h' = h) or "shared" (default when h' < h)
    mea_differential: bool = False  # Differential attention (Ye et al. 2024) instead of softmax attention
    mea_kv_bits: int | None = None  # store the KV cache as 8- or 4-bit codes with scales; None: the model's dtype
    mea_kv_group_size: int = DEFAULT_GROUP_SIZE  # tokens (keys, per channel) / features (values, per token) per scale
    mea_kv_residual: int = DEFAULT_RESIDUAL  # most recent tokens kept in full precision by a quantized cache

    def __post_init__(self, **kwargs):
        unknown = sorted(k for k in kwargs if k.startswith("mea_"))
        if unknown:
            raise ValueError(f"unknown MEA option(s) {unknown}; known: {sorted(_mea_fields())}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.qk_norm_eps is None:
            self.qk_norm_eps = self.rms_norm_eps
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError, naming the field and the fix, for settings no model can have."""
        n, h = self.num_attention_heads, self.num_key_value_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if n % h:
            raise ValueError(f"num_attention_heads ({n}) must be a multiple of num_key_value_heads ({h})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.mea_hlc_init is not None and self.mea_hlc_init not in HLC_INITS:
            raise ValueError(f"mea_hlc_init must be one of {HLC_INITS}, got {self.mea_hlc_init!r}")
        if self.mea_differential and (self.mea_hlc or self.use_qk_norm or n % 2 or h % 2):
            raise ValueError("mea_differential=True is the Differential Transformer baseline: it needs mea_hlc=False, "
                             f"use_qk_norm=False and even head counts (got {n} query, {h} KV heads)")
        variations = [f for f in ("mea_head_gain", "mea_head_norm_blend") if getattr(self, f)]
        variations += [] if self.mea_head_norm_weight else ["mea_head_norm_weight=False"]
        variations += [] if self.mea_head_norm_init == 1.0 else ["mea_head_norm_init"]
        if isinstance(self.mea_head_norm_init, str) and self.mea_head_norm_init != MEASURED or \
                not isinstance(self.mea_head_norm_init, str) and not self.mea_head_norm_init > 0:
            raise ValueError(f"mea_head_norm_init must be a positive number or {MEASURED!r}, got "
                             f"{self.mea_head_norm_init!r}")
        if variations and (not self.mea_head_norm or self.mea_differential):
            raise ValueError(f"{', '.join(variations)} vary GroupNorm: they need mea_head_norm=True and "
                             "mea_differential=False")
        quant = self.kv_quant()
        if quant is not None and self.mea_differential:
            raise ValueError("mea_kv_bits: the quantized cache does not apply to differential attention; set "
                             "mea_kv_bits=None")
        if quant is not None:
            quant.check_features(self.head_dim, "head_dim")
        components = self.component_heads()
        for layer, m in enumerate(components):
            if not 1 <= m <= h:
                raise ValueError(f"layer {layer}: mea_num_component_heads must be in [1, {h}] (h' <= h), got {m}")
            if m != h and not self.mea_hlc:
                raise ValueError(f"layer {layer}: h'={m} < h={h} needs mea_hlc=True (HLC rebuilds the h heads)")
        if self.mea_value_mixing == "latent" and self.mea_num_value_components is not None:
            raise ValueError("mea_num_value_components counts value heads; with mea_value_mixing='latent' give "
                             "mea_value_latent_dim instead")
        for layer, (m_k, m_v, r) in enumerate(zip(self.key_components(), self.value_components(),
                                                  self.value_latent_dims())):
            check_mixing(num_kv_heads=h, head_dim=self.head_dim, key_components=m_k, value_components=m_v,
                         key_mixing=self.mea_key_mixing, value_mixing=self.mea_value_mixing, value_latent_dim=r,
                         hlc=self.mea_hlc, qk_norm=self.use_qk_norm, where=f"layer {layer}: ")
            if self.mea_hlc_init == "identity" and (m_k != h or m_v != h or r is not None):
                raise ValueError(f"layer {layer}: mea_hlc_init='identity' needs h' = h; use 'shared' or leave it unset")

    def _per_layer(self, name: str, default: list) -> list:
        """A per-layer MEA field: None -> `default`, an int -> that for every layer, a list -> as given."""
        value = getattr(self, name)
        if value is None:
            return list(default)
        if isinstance(value, int):
            return [value] * self.num_hidden_layers
        if len(value) != self.num_hidden_layers:
            raise ValueError(f"{name} has {len(value)} entries but the model has {self.num_hidden_layers} layers; "
                             "give one value per layer or a single int")
        if not all(isinstance(x, int) for x in value):
            raise ValueError(f"{name} entries must be ints, got {value}")
        return list(value)

    def component_heads(self) -> list[int]:
        """h' of every layer (the default of h'_K and h'_V)."""
        return self._per_layer("mea_num_component_heads", [self.num_key_value_heads] * self.num_hidden_layers)

    def key_components(self) -> list[int]:
        """h'_K of every layer."""
        return self._per_layer("mea_num_key_components", self.component_heads())

    def value_components(self) -> list[int]:
        """h'_V of every layer (with a value latent: h'; unused)."""
        return self._per_layer("mea_num_value_components", self.component_heads())

    def value_latent_dims(self) -> list[int | None]:
        """R of every layer with mea_value_mixing='latent', else None per layer."""
        if self.mea_value_mixing != "latent":
            if self.mea_value_latent_dim is not None:
                raise ValueError("mea_value_latent_dim needs mea_value_mixing='latent'")
            return [None] * self.num_hidden_layers
        if self.mea_value_latent_dim is None:
            raise ValueError("mea_value_mixing='latent' needs mea_value_latent_dim (the latent width R per layer)")
        return self._per_layer("mea_value_latent_dim", [])

    def head_norm_start(self) -> float:
        """GroupNorm's weight when the model is built: mea_head_norm_init, or 1 until a "measured" one is set."""
        return 1.0 if self.mea_head_norm_init == MEASURED else float(self.mea_head_norm_init)

    def kv_quant(self) -> KVQuant | None:
        """How the cache stores keys and values: quantized (`mea_kv_*`), or None for the model's dtype."""
        if self.mea_kv_bits is None:
            return None
        return KVQuant(bits=self.mea_kv_bits, group_size=self.mea_kv_group_size, residual=self.mea_kv_residual)

    def attention_kwargs(self, layer: int) -> dict:
        """The key/value cache arguments of layer `layer`'s `MEAAttention`."""
        latent = self.value_latent_dims()[layer]
        return dict(num_component_heads=self.component_heads()[layer],
                    num_key_components=self.key_components()[layer],
                    num_value_components=None if latent is not None else self.value_components()[layer],
                    key_mixing=self.mea_key_mixing, value_mixing=self.mea_value_mixing, value_latent_dim=latent,
                    kv_quant=self.kv_quant())

    def cache_layouts(self) -> list[CacheLayout]:
        """What every layer caches per token and which kernel decodes it (the layers use the same rule)."""
        return [cache_layout(num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
                             key_components=kw["num_key_components"], value_components=kw["num_value_components"],
                             value_latent_dim=kw["value_latent_dim"], hlc=self.mea_hlc, qk_norm=self.use_qk_norm,
                             kv_quant=kw["kv_quant"])
                for kw in map(self.attention_kwargs, range(self.num_hidden_layers))]

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> float:
        """Bytes the cache holds per token, all layers: h'_K D + (h'_V D or R) per layer (+ h float32 k-scales
        per compressed layer with QK-norm), as `cache_layouts` says; quantized: codes and scales per token of a
        long context (the full-precision tail aside, see `kv_cache_bytes`)."""
        return sum(layout.bytes_per_token(bytes_per_element) for layout in self.cache_layouts())

    def kv_cache_bytes(self, tokens: int, bytes_per_element: int = 2) -> int:
        """Bytes a cache of `tokens` tokens (one sequence) holds, exactly, all layers."""
        return sum(layout.bytes(tokens, bytes_per_element) for layout in self.cache_layouts())


def _mea_fields() -> list[str]:
    return [name for name in MEAConfig.__dataclass_fields__ if name.startswith("mea_")]
