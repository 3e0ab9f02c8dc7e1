"""`cache_bytes_held` (whole allocation) and `cache_bytes_used` (stored tokens) of any Hugging Face cache."""

import torch
from transformers import DynamicCache

from mea.cache import MEACache, cache_bytes_held, cache_bytes_used


def test_mea_cache_held_counts_spare_capacity_used_does_not():
    cache = MEACache(num_layers=2, capacity=10)
    for layer in range(2):  # (B, T, h', D): 4 tokens of h' = 1 component head of width 8
        kv = torch.randn(3, 4, 1, 8)
        cache.update(kv, kv.clone(), layer)
    used = 2 * 2 * 3 * 4 * 8 * 4  # layers x (K, V) x batch x tokens x width x fp32 bytes
    assert cache_bytes_used(cache) == used == cache.bytes_used()
    assert cache_bytes_held(cache) == cache.bytes_held() == used * 10 // 4  # capacity 10 tokens


def test_dynamic_cache_held_equals_used():
    cache = DynamicCache()
    for layer in range(3):
        k = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16)
        cache.update(k, k.clone(), layer)
    assert cache_bytes_held(cache) == cache_bytes_used(cache) == 3 * 2 * (2 * 4 * 5 * 16) * 2
