"""LLaVA-style vision-language models: a vision tower, a projector, and one of the engine's language models.

``LlavaForConditionalGeneration`` checkpoints (LLaVA 1.5 and the many models built the same way) are served as
their language model (``hf_files.vision_language_model_config``) with images: :func:`vision_language_class` makes
the language model's class into one that also holds the vision tower (transformers' own CLIP or SigLIP vision
model, run as it is) and LLaVA's two-layer projector. The runner asks it for each image's features
(:meth:`VisionLanguageModel.encode_image`) and hands them to ``forward`` in place of the image tokens'
embeddings; everything after the embeddings is the language model's own (paged KV, chunked prefill, the device's
kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from inferneo.multimodal.config import VisionLanguageConfig

# Checkpoint name prefixes of the language model (transformers 4 and 5 layouts) -> the text model's names.
_LANGUAGE_MODEL_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def _vision_tower(config: VisionLanguageConfig) -> nn.Module:
    """transformers' vision model of the checkpoint's ``vision_config`` (weights loaded later)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    values = {k: v for k, v in config.vision_config.items() if k != "model_type"}
    if config.vision_config["model_type"] == "siglip_vision_model":
        return SiglipVisionModel(SiglipVisionConfig(**values))
    return CLIPVisionModel(CLIPVisionConfig(**values))


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Modules built inside are made on ``device`` in ``dtype`` (as the runner builds the whole model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


class LlavaProjector(nn.Module):
    """LLaVA's projector: the tower's features to the language model's width, through two linears."""

    def __init__(self, config: VisionLanguageConfig) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        layers = 1 if isinstance(config.feature_layer, int) else len(config.feature_layer)
        width = config.vision_config.get("hidden_size", 768) * layers
        self.linear_1 = nn.Linear(width, config.text_hidden_size, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_act]
        self.linear_2 = nn.Linear(config.text_hidden_size, config.text_hidden_size, bias=config.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class VisionLanguageModel:
    """The image half of a vision-language model, placed before its language model class (see
    :func:`vision_language_class`), which makes the rest."""

    vision_language: VisionLanguageConfig  # set on each class vision_language_class makes
    accepts_images = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_vision_half()

    def _build_vision_half(self) -> None:
        self.vision_tower = _vision_tower(self.vision_language)
        self.multi_modal_projector = self.build_projector()
        for module in (self.vision_tower, self.multi_modal_projector):
            for linear in module.modules():
                if isinstance(linear, nn.Linear):  # the vision half stays as the checkpoint has it, and as
                    linear.quantizable = False  # transformers' modules read it (SigLIP's attention-pooling head
                    linear.packable = False  # reads its output projection's ``weight``): no packed CPU copy

    def materialized(self, device: torch.device) -> None:
        """After ``tensor_parallel.materialize``: the vision half built again on ``device``, its buffers (position
        ids) computed as transformers computes them, not left as the uninitialized storage a meta model gets."""
        with built_on(device, self.embed_tokens.weight.dtype):
            self._build_vision_half()

    def build_projector(self) -> nn.Module:
        """The projector from the tower's features to the language model's width (LLaVA's two linears)."""
        return LlavaProjector(self.vision_language)

    @property
    def image_token_id(self) -> int:
        return self.vision_language.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.vision_language.num_image_tokens

    def blank_image(self, device: torch.device | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A blank image's pixels (and its grid: none), for memory profiling."""
        side = self.vision_language.vision_config.get("image_size", 224)
        return torch.zeros(3, side, side, device=device), ()

    def encode_image(self, pixels: torch.Tensor, grid: tuple[int, ...] = ()) -> torch.Tensor:
        """The features ``[num_image_tokens, hidden]`` of one preprocessed image ``pixels`` (``[3, H, W]`` or
        ``[1, 3, H, W]``), in the model's dtype, as transformers' LLaVA computes them (``grid``: unused, the
        images are of one size)."""
        config = self.vision_language
        weight = next(self.vision_tower.parameters())  # the linears may be packed by now: no ``weight``
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        states = self.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = [config.feature_layer] if isinstance(config.feature_layer, int) else list(config.feature_layer)
        chosen = [states[layer] for layer in layers]
        if config.select_strategy == "default":
            chosen = [hidden[:, 1:] for hidden in chosen]
        features = self.multi_modal_projector(torch.cat(chosen, dim=-1))[0]
        if features.shape[0] != self.num_image_tokens:
            raise ValueError(f"an image gave {features.shape[0]} features where the model takes "
                             f"{self.num_image_tokens} image tokens (pixels of shape {tuple(pixels.shape)})")
        return features

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """The vision tower's and projector's tensors into their modules (every one required, as ``strict`` asks
        of the language model's), the language model's under its text-only names through its own loader."""
        vision: dict[str, torch.Tensor] = {}
        tower_prefix = "vision_model." if any(k.startswith("vision_model.") for k in self.vision_tower.state_dict()) else ""
        projector: dict[str, torch.Tensor] = {}

        def language_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(_VISION_PREFIXES):  # with or without transformers 4's "vision_model."
                    key = name.split("vision_tower.", 1)[1].removeprefix("vision_model.")
                    vision[tower_prefix + key] = tensor
                elif name.startswith(_PROJECTOR_PREFIXES):
                    projector[name.split("multi_modal_projector.", 1)[1]] = tensor
                else:
                    for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
                        if name.startswith(prefix):
                            name = replacement + name.removeprefix(prefix)
                            break
                    yield name, tensor

        loaded = super().load_weights(language_weights(), strict)
        for module, tensors, label in ((self.vision_tower, vision, "vision_tower"),
                                       (self.multi_modal_projector, projector, "multi_modal_projector")):
            load_module_weights(module, tensors, label, strict)
            loaded |= {f"{label}.{name}" for name in tensors}
        return loaded

    def expected_weight_keys(self, pname: str, param: torch.Tensor) -> list[str]:
        """The language model's load keys (the vision half's are checked by ``load_module_weights``)."""
        if pname.startswith(("vision_tower.", "multi_modal_projector.")):
            return []
        return super().expected_weight_keys(pname, param)

    def cast(self, dtype: torch.dtype) -> None:
        super().cast(dtype)
        self.vision_tower.to(dtype=dtype)
        self.multi_modal_projector.to(dtype=dtype)


def load_module_weights(module: nn.Module, tensors: dict[str, torch.Tensor], label: str, strict: bool = True) -> None:
    """Copy ``tensors`` into ``module``'s state; ValueError for an unknown or misshapen tensor, and (``strict``) a
    missing parameter (buffers that transformers builds itself, such as position ids, may be absent)."""
    state = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    unknown = sorted(set(tensors) - set(state))
    missing = sorted(params - set(tensors)) if strict else []
    if unknown or missing:
        what = [f"unknown {', '.join(unknown[:4])}"] if unknown else []
        what += [f"missing {', '.join(missing[:4])}"] if missing else []
        raise ValueError(f"checkpoint's {label} weights do not match its config: {'; '.join(what)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = state[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {label}.{name} has shape {tuple(tensor.shape)}, the config expects "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor)


def vision_language_class(language_model: type[nn.Module], config: VisionLanguageConfig,
                          mixin: type[VisionLanguageModel] = VisionLanguageModel) -> type[nn.Module]:
    """``language_model``'s class made to take images as ``config`` says (see the module docstring), its image
    half ``mixin`` (LLaVA's unless a model family gives its own)."""
    if getattr(language_model, "forward", None) is None or not hasattr(language_model, "embed"):
        raise ValueError(f"{config.architecture}: its language model {language_model.__name__} cannot take images")
    return type(f"{mixin.__name__.removesuffix('VisionLanguageModel') or 'Llava'}{language_model.__name__}",
                (mixin, language_model),
                {"vision_language": config, "__module__": __name__})
