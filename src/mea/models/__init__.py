from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mea import MEAConfig
from .modeling_mea import MEAForCausalLM, MEAModel, MEAPreTrainedModel
from .presets import PAPER_VARIANTS, PRESETS, VARIANTS, make_config

AutoConfig.register("mea", MEAConfig, exist_ok=True)
AutoModel.register(MEAConfig, MEAModel, exist_ok=True)
AutoModelForCausalLM.register(MEAConfig, MEAForCausalLM, exist_ok=True)

__all__ = ["PAPER_VARIANTS", "PRESETS", "VARIANTS", "MEAConfig", "MEAForCausalLM", "MEAModel", "MEAPreTrainedModel", "make_config"]
