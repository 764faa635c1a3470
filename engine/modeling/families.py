"""recipekit's model classes for each family `add_modules` supports, as transformers subclasses, registered with
transformers' Auto classes when this module is imported (which `autoregister.py` does once transformers is; so
does importing a class from here first, which imports transformers).

Per family: a config (`model_type` `recipekit_<family>`, an `added_modules` field), a decoder layer and a
causal LM. Written out per family rather than generated, so each class can be read and found by name.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

from recipekit.engine.modeling.layers import AddedModulesCausalLM, AddedModulesLayer


class RecipekitLlamaConfig(LlamaConfig):
    model_type = "recipekit_llama"
    added_modules: dict | None = None


class RecipekitLlamaDecoderLayer(AddedModulesLayer, LlamaDecoderLayer):
    pass


class RecipekitLlamaForCausalLM(AddedModulesCausalLM, LlamaForCausalLM):
    config_class = RecipekitLlamaConfig
    layer_class = RecipekitLlamaDecoderLayer
    _no_split_modules = ["RecipekitLlamaDecoderLayer"]


class RecipekitMistralConfig(MistralConfig):
    model_type = "recipekit_mistral"
    added_modules: dict | None = None


class RecipekitMistralDecoderLayer(AddedModulesLayer, MistralDecoderLayer):
    pass


class RecipekitMistralForCausalLM(AddedModulesCausalLM, MistralForCausalLM):
    config_class = RecipekitMistralConfig
    layer_class = RecipekitMistralDecoderLayer
    _no_split_modules = ["RecipekitMistralDecoderLayer"]


class RecipekitQwen2Config(Qwen2Config):
    model_type = "recipekit_qwen2"
    added_modules: dict | None = None


class RecipekitQwen2DecoderLayer(AddedModulesLayer, Qwen2DecoderLayer):
    pass


class RecipekitQwen2ForCausalLM(AddedModulesCausalLM, Qwen2ForCausalLM):
    config_class = RecipekitQwen2Config
    layer_class = RecipekitQwen2DecoderLayer
    _no_split_modules = ["RecipekitQwen2DecoderLayer"]


class RecipekitQwen3Config(Qwen3Config):
    model_type = "recipekit_qwen3"
    added_modules: dict | None = None


class RecipekitQwen3DecoderLayer(AddedModulesLayer, Qwen3DecoderLayer):
    pass


class RecipekitQwen3ForCausalLM(AddedModulesCausalLM, Qwen3ForCausalLM):
    config_class = RecipekitQwen3Config
    layer_class = RecipekitQwen3DecoderLayer
    _no_split_modules = ["RecipekitQwen3DecoderLayer"]


CAUSAL_LMS = (RecipekitLlamaForCausalLM, RecipekitMistralForCausalLM, RecipekitQwen2ForCausalLM,
              RecipekitQwen3ForCausalLM)


for _model in CAUSAL_LMS:
    AutoConfig.register(_model.config_class.model_type, _model.config_class, exist_ok=True)
    AutoModelForCausalLM.register(_model.config_class, _model, exist_ok=True)
