"""Which model class serves which Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

from inferneo.model_executor.models.bert import BertEmbeddingModel, RobertaEmbeddingModel
from inferneo.model_executor.models.cohere import Cohere2ForCausalLM, CohereForCausalLM
from inferneo.model_executor.models.cross_encoder import BertCrossEncoder, RobertaCrossEncoder
from inferneo.model_executor.models.decoder_classifier import (
    Gemma2ForSequenceClassification,
    LlamaForSequenceClassification,
    Phi3ForSequenceClassification,
    Qwen2ForSequenceClassification,
    Qwen3ForSequenceClassification,
)
from inferneo.model_executor.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from inferneo.model_executor.models.ernie import Ernie4_5ForCausalLM
from inferneo.model_executor.models.exaone import Exaone4ForCausalLM
from inferneo.model_executor.models.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextOfMultimodal,
    GemmaForCausalLM,
)
from inferneo.model_executor.models.gemma3_vision import Gemma3VisionLanguageModel
from inferneo.model_executor.models.glm import Glm4ForCausalLM, GlmForCausalLM
from inferneo.model_executor.models.gpt_oss import GptOssForCausalLM
from inferneo.model_executor.models.granite import GraniteForCausalLM
from inferneo.model_executor.models.llama import LlamaForCausalLM
from inferneo.model_executor.models.llava import VisionLanguageModel, vision_language_class
from inferneo.model_executor.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from inferneo.model_executor.models.olmo import Olmo2ForCausalLM, OlmoForCausalLM
from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM
from inferneo.model_executor.models.qwen2_vl import qwen_vl_class
from inferneo.model_executor.models.smollm3 import SmolLM3ForCausalLM
from inferneo.model_executor.models.starcoder2 import Starcoder2ForCausalLM
from inferneo.multimodal.config import GEMMA3, vision_language_of

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    # text only, for a checkpoint without preprocessor_config.json (one with it: Gemma3ForCausalLM with images)
    "Gemma3ForConditionalGeneration": Gemma3TextOfMultimodal,
    "GraniteForCausalLM": GraniteForCausalLM,
    "SmolLM3ForCausalLM": SmolLM3ForCausalLM,
    "OlmoForCausalLM": OlmoForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "CohereForCausalLM": CohereForCausalLM,
    "Cohere2ForCausalLM": Cohere2ForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
    "Ernie4_5ForCausalLM": Ernie4_5ForCausalLM,
    "Exaone4ForCausalLM": Exaone4ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    # encoders, embeddings only (``bert.py``); a masked-LM checkpoint loads without its head
    "BertModel": BertEmbeddingModel,
    "BertForMaskedLM": BertEmbeddingModel,
    "RobertaModel": RobertaEmbeddingModel,
    "RobertaForMaskedLM": RobertaEmbeddingModel,
    "XLMRobertaModel": RobertaEmbeddingModel,
    "XLMRobertaForMaskedLM": RobertaEmbeddingModel,
    # cross-encoders (rerankers), scoring only (``cross_encoder.py``)
    "BertForSequenceClassification": BertCrossEncoder,
    "RobertaForSequenceClassification": RobertaCrossEncoder,
    "XLMRobertaForSequenceClassification": RobertaCrossEncoder,
    # decoder sequence classifiers (``decoder_classifier.py``): classification, and scoring with one label
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "Qwen3ForSequenceClassification": Qwen3ForSequenceClassification,
    "Gemma2ForSequenceClassification": Gemma2ForSequenceClassification,
    "Phi3ForSequenceClassification": Phi3ForSequenceClassification,
}


def get_model_class(hf_config: dict) -> type[nn.Module]:
    """The model class for a config's ``architectures``; ValueError naming the supported ones otherwise."""
    names = hf_config.get("architectures") or []
    vision_language = vision_language_of(hf_config)
    for name in names:
        if name in MODEL_REGISTRY:
            if vision_language is None:
                return MODEL_REGISTRY[name]
            if not issubclass(MODEL_REGISTRY[name], LlamaForCausalLM):
                raise ValueError(f"{vision_language.architecture} with a {name} language model is not supported")
            if vision_language.mrope:
                return qwen_vl_class(MODEL_REGISTRY[name], vision_language)
            mixin = Gemma3VisionLanguageModel if vision_language.architecture == GEMMA3 else VisionLanguageModel
            return vision_language_class(MODEL_REGISTRY[name], vision_language, mixin)
    asked = ", ".join(names) if names else f"(none listed; model_type {hf_config.get('model_type')!r})"
    raise ValueError(f"unsupported architecture {asked}; supported: {', '.join(MODEL_REGISTRY)}")
