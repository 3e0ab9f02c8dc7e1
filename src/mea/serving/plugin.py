"""The vLLM plugin (entry point `vllm.general_plugins` -> `mea = mea.serving.plugin:register`).

vLLM calls `register` in every process it starts. It makes config.json's model_type "mea" readable by
transformers and registers the architecture lazily (the model module, which imports vLLM's layers, is
imported only when a model is built). Safe to call more than once.
"""

from __future__ import annotations

ARCHITECTURE = "MEAForCausalLM"  # config.json `architectures`, as `mea.models` saves it


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..models.configuration_mea import MEAConfig

    AutoConfig.register("mea", MEAConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "mea.serving.vllm_model:MEAForCausalLM")
