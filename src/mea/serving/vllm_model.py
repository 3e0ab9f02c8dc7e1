"""`MEAForCausalLM` in vLLM's model API: MEA's compressed KV cache inside vLLM's paged attention.

Reads like vLLM's `llama.py`: the model computes q / k / v and positions itself and hands attention to one
`Attention` module per layer, which owns the paged cache. What each layer caches is decided by
`serving.layout` (from the checkpoint's `cache_layouts`): compressed layers are one multi-query head over the
concatenated components, with queries absorbed through W_lc^K and outputs read back through W_lc^V
(`ops.mixing`, the same functions as transformers' decode), and plain layers are GQA with HLC folded in.

Imported by vLLM only (registered lazily by `serving.plugin`); needs the environment of `make serve-env`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from ..models.configuration_mea import MEAConfig
from ..ops import absorb_query, mixing_shape, read_values
from .layout import ServingLayer, serving_layers
from .weights import folded_projection, per_query_head


def supported_head_sizes() -> list[int] | None:
    """Head sizes the platform's attention kernel accepts; None: any (the kernel checks its own)."""
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return CPUAttentionBackend.get_supported_head_sizes()
    return None


class MEAServingAttention(nn.Module):
    def __init__(self, config: MEAConfig, layer_idx: int, shape: ServingLayer, *, cache_config, quant_config,
                 prefix: str):
        super().__init__()
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        n, h, d, c = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        if n % tp or (not shape.absorbed and h % tp):
            raise ValueError(f"tensor-parallel size {tp} must divide the query heads ({n})"
                             + ("" if shape.absorbed else f" and the KV heads ({h}) of layer {layer_idx}"))
        self.shape, self.head_dim, self.num_heads = shape, d, n // tp
        kw = config.attention_kwargs(layer_idx)
        self.key_mixing, self.value_mixing = kw["key_mixing"], kw["value_mixing"]
        bias = config.attention_bias
        self.q_proj = ColumnParallelLinear(c, n * d, bias=bias, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        if shape.absorbed:  # the components: one KV head, the same on every rank
            self.k_proj = ReplicatedLinear(c, shape.key_width, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.k_proj")
            self.v_proj = ReplicatedLinear(c, shape.value_width, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.v_proj")
        else:  # the h composite heads (HLC folded in at load time), split over ranks
            self.k_proj = ColumnParallelLinear(c, h * d, bias=bias, quant_config=quant_config, prefix=f"{prefix}.k_proj")
            self.v_proj = ColumnParallelLinear(c, h * d, bias=bias, quant_config=quant_config, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(n * d, c, bias=config.attention_out_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.head_start = rank * self.num_heads
        if shape.absorbed:  # W_lc^K, W_lc^V per query head of this rank, filled by `load_mixing`
            for name, kind, width in (("w_k", self.key_mixing, kw["num_key_components"]),
                                      ("w_v", self.value_mixing, kw["value_latent_dim"] or kw["num_value_components"])):
                self.register_buffer(name, self._local(torch.zeros(mixing_shape(kind, width, h, d)), n),
                                     persistent=False)
        self.q_norm = RMSNorm(d, eps=config.qk_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(d, eps=config.qk_norm_eps) if config.use_qk_norm else None
        if config.mea_head_gain or config.mea_head_norm_blend or not config.mea_head_norm_weight:
            raise ValueError("the vLLM plugin serves the paper's GroupNorm only: mea_head_gain, mea_head_norm_blend "
                             "and mea_head_norm_weight=False run with transformers (`mea generate`, `mea eval`)")
        self.head_norm = RMSNorm(d, eps=config.mea_head_norm_eps) if config.mea_head_norm else None
        self.rotary_emb = get_rope(d, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=config.rope_parameters)
        kv_heads = 1 if shape.absorbed else h // tp
        self.attn = Attention(self.num_heads, shape.head_size, d**-0.5, num_kv_heads=kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def _local(self, w: torch.Tensor, total_heads: int) -> torch.Tensor:
        return per_query_head(w, num_heads=total_heads, start=self.head_start, stop=self.head_start + self.num_heads)

    @torch.no_grad()
    def load_mixing(self, w_k: torch.Tensor, w_v: torch.Tensor, total_heads: int) -> None:
        """A compressed layer's W_lc^K, W_lc^V from the checkpoint, kept per query head of this rank."""
        self.w_k.copy_(self._local(w_k, total_heads))
        self.w_v.copy_(self._local(w_v, total_heads))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, n, d, shape = x.shape[0], self.num_heads, self.head_dim, self.shape
        q, _ = self.q_proj(x)  # (T, n D)
        k, _ = self.k_proj(x)  # (T, h'_K D) components, or (T, h_local D) composite heads
        v, _ = self.v_proj(x)  # (T, h'_V D or R), or (T, h_local D)
        if self.q_norm is not None:
            q = self.q_norm(q.view(t, n, d)).view(t, n * d)
        if self.k_norm is not None:  # plain layers only (checked): the norm of composite keys
            k = self.k_norm(k.view(t, -1, d)).view(t, -1)
        q, k = self.rotary_emb(positions, q, k)  # every component / head rotated as a D-wide head
        if not shape.absorbed:
            out = self.attn(q, k, v).view(t, n, d)
        else:
            width = shape.head_size
            q = absorb_query(q.view(1, t, n, d), self.w_k, self.key_mixing, n)[0]  # (T, n, h'_K D)
            q = F.pad(q, (0, width - shape.key_width))
            k = F.pad(k, (0, width - shape.key_width))
            v = F.pad(v, (0, width - shape.value_width))
            u = self.attn(q.reshape(t, n * width), k, v).view(t, n, width)[..., :shape.value_width]
            out = read_values(u[None], self.w_v, self.value_mixing, n, d)[0]  # (T, n, D)
        if self.head_norm is not None:  # GroupNorm: RMSNorm of each head's output
            out = self.head_norm(out)
        out, _ = self.o_proj(out.reshape(t, n * d))
        return out


class MEAServingDecoderLayer(nn.Module):
    def __init__(self, config: MEAConfig, layer_idx: int, shape: ServingLayer, *, cache_config, quant_config,
                 prefix: str):
        super().__init__()
        self.self_attn = MEAServingAttention(config, layer_idx, shape, cache_config=cache_config,
                                             quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, quant_config=quant_config,
                            bias=config.mlp_bias, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class MEAServingModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MEAConfig = vllm_config.model_config.hf_config
        shapes = serving_layers(config, supported_head_sizes())
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            MEAServingDecoderLayer(config, i, shapes[i], cache_config=vllm_config.cache_config,
                                   quant_config=vllm_config.quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


# checkpoint name -> (our parameter, shard of a merged projection)
_STACKED = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
_ATTENTION_TENSORS = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "hlc_k", "hlc_v")


class MEAForCausalLM(nn.Module):
    """vLLM's view of an MEA checkpoint (config.json `architectures: ["MEAForCausalLM"]`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MEAConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = MEAServingModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our safetensors names as they are; each layer's k/v projections and HLC are held back until the
        layer is complete, then folded (plain layers) or loaded with the mixing kept per query head."""
        params = dict(self.named_parameters())
        attention: dict[int, dict[str, torch.Tensor]] = {}
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) > 4 and parts[3] == "self_attn" and ".".join(parts[4:]) in _ATTENTION_TENSORS:
                attention.setdefault(int(parts[2]), {})[".".join(parts[4:])] = tensor
                continue
            shard = None
            for old, (new, shard_id) in _STACKED.items():
                if old in name:
                    name, shard = name.replace(old, new), shard_id
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the served model; is this an MEA "
                                 "checkpoint written by this version of mea?")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(name)
        d = self.config.head_dim
        for i, layer in enumerate(self.model.layers):
            attn, found = layer.self_attn, attention.get(i, {})
            w_k, w_v = found.get("hlc_k"), found.get("hlc_v")
            if attn.shape.absorbed:
                if w_k is None or w_v is None:
                    raise ValueError(f"layer {i} caches components but the checkpoint has no hlc_k / hlc_v for it")
                attn.load_mixing(w_k, w_v, self.config.num_attention_heads)
            for proj, w, kind in (("k_proj", w_k, attn.key_mixing), ("v_proj", w_v, attn.value_mixing)):
                weight, bias = found[f"{proj}.weight"], found.get(f"{proj}.bias")
                if not attn.shape.absorbed:
                    weight, bias = folded_projection(weight, bias, w, kind, d)
                for field, value in (("weight", weight), ("bias", bias)):
                    if value is not None:
                        param = params[f"model.layers.{i}.self_attn.{proj}.{field}"]
                        getattr(param, "weight_loader", default_weight_loader)(param, value)
                        loaded.add(f"model.layers.{i}.self_attn.{proj}.{field}")
        return loaded
