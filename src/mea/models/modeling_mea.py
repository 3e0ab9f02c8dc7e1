"""`MEAForCausalLM`: a Llama-style decoder whose attention is `MEAAttention`, Hugging Face native.

Reads top to bottom: embeddings -> (RoPE tables, mask) -> decoder layers -> final norm -> lm_head.
The KV cache is an `MEACache` holding only the h' component heads of each layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..cache import MEACache
from ..layers import DifferentialAttention, MEAAttention, MEADecoderLayer, RMSNorm
from ..layers.attention import AttentionMap
from ..ops import rope_cos_sin, rope_inv_freq
from ..ops.eager import causal_mask
from .configuration_mea import MEAConfig

# what `attn_implementation` may be: the fused kernels (default) or explicit probabilities (output_attentions)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def build_attention_mask(attention_mask: torch.Tensor | None, past: int, q_len: int,
                         device: torch.device | str) -> torch.Tensor | None:
    """2D padding mask (B, past+T) -> bool (B, 1, T, past+T) on `device`, or None when plain causal attention is
    exact (no padding, and either no past or a single query). Padded query rows may see their own slot, so
    that no row is fully masked (their outputs are never used).

    Whether a mask has padding is read on the host only where that costs no device synchronisation: once per
    prompt (past = 0), and at every step for a mask held in CPU memory. A decoding step with an accelerator's
    mask builds the mask without looking at it (exact with or without padding)."""
    total = past + q_len
    if attention_mask is not None:
        attention_mask = attention_mask[:, -total:]
        if (past == 0 or attention_mask.device.type == "cpu") and bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and (past == 0 or q_len == 1):
        return None
    allowed = causal_mask(q_len, total, device)  # (1, 1, T, S)
    if attention_mask is not None:
        own_slot = torch.arange(total, device=device) == torch.arange(past, total, device=device)[:, None]  # (T, S)
        allowed = (allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None]) | own_slot
    return allowed


def position_ids_from_mask(attention_mask: torch.Tensor | None, past: int, q_len: int, device) -> torch.Tensor:
    """Positions count real tokens only, so left-padded rows start at 0 like unpadded ones."""
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -q_len:]


def decoder_layer(config: MEAConfig, i: int) -> MEADecoderLayer:
    """Decoder block `i` of a model with `config` (also built alone, to compress a checkpoint one layer at a time)."""
    attention_class = DifferentialAttention if config.mea_differential else MEAAttention
    return MEADecoderLayer(
        attention=attention_class(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            **config.attention_kwargs(i),
            hlc=config.mea_hlc,
            head_norm=config.mea_head_norm,
            head_norm_eps=config.mea_head_norm_eps,
            head_norm_weight=config.mea_head_norm_weight,
            head_norm_init=config.head_norm_start(),
            head_gain=config.mea_head_gain,
            head_norm_blend=config.mea_head_norm_blend,
            hlc_init=config.mea_hlc_init,
            qk_norm=config.use_qk_norm,
            qk_norm_eps=config.qk_norm_eps,
            qkv_bias=config.attention_bias,
            out_bias=config.attention_out_bias,
            layer_idx=i,
        ),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        mlp_bias=config.mlp_bias,
    )


class MEAPreTrainedModel(PreTrainedModel):
    config_class = MEAConfig
    config: MEAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MEADecoderLayer"]
    _supports_sdpa = True
    # output_hidden_states: the embeddings, then each block's output (the last one after the final norm);
    # output_attentions: each layer's probabilities (B, N, T, S), recorded under attn_implementation="eager"
    _can_record_outputs = {"hidden_states": MEADecoderLayer, "attentions": OutputRecorder(AttentionMap, index=0)}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (MEACache)

    def attn_implementation(self) -> str:
        """The attention implementation the config asks for (transformers' `attn_implementation`), checked."""
        chosen = self.config._attn_implementation or "sdpa"
        if chosen not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"MEA models run attn_implementation {' or '.join(map(repr, ATTN_IMPLEMENTATIONS))}, "
                             f"got {chosen!r}")
        return chosen

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding: normal(0, initializer_range); RMSNorm: ones
        if isinstance(module, MEAAttention) and module.hlc:
            # HLC starts from its configured init (identity when h' = h), not from noise
            w_k, w_v = module.initial_mixing(self.config.mea_hlc_init)
            init.copy_(module.hlc_k, w_k)
            init.copy_(module.hlc_v, w_v)
        if isinstance(module, MEAAttention) and module.head_norm is not None and module.head_norm.weight is not None:
            init.constant_(module.head_norm.weight, module.head_norm_init)
        if isinstance(module, MEAAttention) and module.head_gain is not None:
            init.ones_(module.head_gain)
        if isinstance(module, MEAAttention) and module.head_norm_blend is not None:
            init.zeros_(module.head_norm_blend)
        if isinstance(module, DifferentialAttention):
            for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(p, mean=0.0, std=0.1)
        elif isinstance(module, MEAModel):  # non-persistent buffer: recomputed, never loaded
            inv_freq, _ = rope_inv_freq(self.config.rope_parameters or {}, self.config.head_dim,
                                        self.config.max_position_embeddings)
            init.copy_(module.inv_freq, inv_freq)


class MEAModel(MEAPreTrainedModel):
    def __init__(self, config: MEAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(decoder_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        inv_freq, self.rope_scaling = rope_inv_freq(config.rope_parameters or {}, config.head_dim,
                                                    config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable(); then training runs uncached
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MEACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        eager = self.attn_implementation() == "eager"
        if kwargs.get("output_attentions", self.config.output_attentions) and not eager:
            raise ValueError("output_attentions=True needs the eager attention (the fused kernels never form the "
                             "probabilities): load with attn_implementation='eager' or call "
                             "model.set_attn_implementation('eager')")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None and not isinstance(cache, MEACache):
            raise ValueError(f"MEA models cache component heads in an MEACache, got {type(cache).__name__}; "
                             "pass cache=None and let the model create it")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = MEACache(self.config.num_hidden_layers)
        past = cache.get_seq_length() if cache is not None else 0
        q_len = x.shape[1]
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past, q_len, x.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids.to(x.device), self.rope_scaling, x.dtype)
        mask = build_attention_mask(attention_mask, past, q_len, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask=mask, cache=cache, eager=eager)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache if use_cache else None)


class MEAForCausalLM(MEAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MEAConfig):
        super().__init__(config)
        self.model = MEAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """`generate` knows the final length: preallocate the component-head cache to exactly that."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        model_kwargs["cache"] = MEACache(self.config.num_hidden_layers, capacity=max_cache_length)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MEACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                      attentions=out.attentions)
