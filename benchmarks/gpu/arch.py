"""The benchmarked architectures, built from configs with random weights directly on the device.

``full``: the published configurations (SAM ViT-H as ``facebook/sam-vit-huge``; Grounding DINO with
Swin-T / Swin-B backbones and BERT-base as ``IDEA-Research/grounding-dino-tiny`` / ``-base``;
LLaVA-1.5-7B as ``llava-hf/llava-1.5-7b-hf``: CLIP ViT-L/14-336 + Llama-2-7B; CLIP ViT-L/14-336 and
DINOv2-L as ``trainer/configs/model-vitl14.yaml``). ``tiny``: the few-layer configs of
``tests/tiny_models.py``, for the CPU test. A config's ``arch`` mapping overrides top-level
keyword arguments (tests use it to make a model fail on purpose).

Models are constructed under ``torch.device(device)`` in the benchmark dtype, so a 7B model is
initialised on the GPU in seconds and never passes through host memory.
"""

from __future__ import annotations

from typing import Any

import torch

# --- SAM ------------------------------------------------------------------------------------------
SAM_FULL = {"vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                              "global_attn_indexes": [7, 15, 23, 31], "mlp_dim": 5120}}
SAM_TINY = {
    "vision_config": {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 16, "window_size": 2, "global_attn_indexes": [1],
                      "mlp_dim": 64, "num_pos_feats": 16},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}

# --- Grounding DINO --------------------------------------------------------------------------------
SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
          "image_size": 224, "out_indices": [2, 3, 4]}
SWIN_B = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12,
          "image_size": 384, "out_indices": [2, 3, 4]}
GDINO_TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
              "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 20, "max_text_len": 32,
              "encoder_n_points": 2, "decoder_n_points": 2,
              "text_config": {"vocab_size": 1100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 64, "max_position_embeddings": 64}}
SWIN_TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4, "image_size": 64,
             "out_indices": [2, 3, 4]}
#: BERT ids the model hard-codes: [CLS], [SEP], "." (the phrase separator).
CLS, SEP, DOT = 101, 102, 1012

# --- LLaVA -----------------------------------------------------------------------------------------
LLAVA_FULL = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    "text_config": {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5},
    "image_token_index": 32000, "image_seq_length": 576, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "pad_token_id": 32001,
}
LLAVA_TINY = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "text_config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2},
    "image_token_index": 99, "image_seq_length": 16, "vision_feature_select_strategy": "default",
}

# --- USE (CLIP + DINOv2 + head), as trainer.model.ModelConfig ---------------------------------------
USE_FULL = {
    "clip": {"tiny": {"embed_dim": 768, "image_size": 336, "patch_size": 14, "vision_width": 1024, "vision_layers": 24,
                      "vision_head_width": 64, "text_width": 768, "text_layers": 12, "text_heads": 12,
                      "context_length": 77}},
    "clip_layers": [8, 16, 24],
    "dino": {"enabled": True, "path": None, "tiny": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                     "num_attention_heads": 16, "intermediate_size": 4096,
                                                     "image_size": 518, "patch_size": 14}},
    "dino_layers": [8, 16, 24], "dino_image_size": 518, "hidden_dim": 1024,
}
USE_TINY = {
    "clip": {"tiny": {"embed_dim": 32, "image_size": 64, "patch_size": 8, "vision_width": 64, "vision_layers": 3,
                      "vision_head_width": 32, "text_width": 32, "text_layers": 2, "text_heads": 2,
                      "context_length": 16}},
    "clip_layers": [1, 2, 3],
    "dino": {"enabled": True, "path": None, "tiny": {"hidden_size": 32, "num_hidden_layers": 2,
                                                     "num_attention_heads": 2, "intermediate_size": 64,
                                                     "image_size": 56, "patch_size": 14}},
    "dino_layers": [1, 2], "dino_image_size": 56, "hidden_dim": 64,
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested dicts merge key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_sam(size: str, overrides: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """(SamModel, SamProcessor); the prompt encoder in float32 as :func:`pipeline.models.load_sam` keeps it."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(**merged(SAM_FULL if size == "full" else SAM_TINY, overrides))
    with torch.device(device):
        model = SamModel._from_config(cfg, dtype=dtype).eval()
    model.prompt_encoder.float()
    if size == "full":
        image_processor = SamImageProcessor()
    else:
        side = cfg.vision_config.image_size
        image_processor = SamImageProcessor(size={"longest_edge": side}, pad_size={"height": side, "width": side})
    return model, SamProcessor(image_processor=image_processor)


def build_grounding_dino(size: str, variant: str, overrides: dict[str, Any], device: torch.device,
                         dtype: torch.dtype):
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    if size == "full":
        kwargs = {"backbone_config": SwinConfig(**(SWIN_T if variant == "swin-t" else SWIN_B))}
    else:
        swin = dict(SWIN_TINY, depths=[1, 1, 2, 1]) if variant == "swin-b" else SWIN_TINY
        kwargs = {**GDINO_TINY, "backbone_config": SwinConfig(**swin)}
    kwargs = merged(kwargs, overrides)
    cfg = GroundingDinoConfig(**kwargs)
    with torch.device(device):
        return GroundingDinoForObjectDetection._from_config(cfg, dtype=dtype).eval()


def build_llava(size: str, overrides: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    kw = merged(LLAVA_FULL if size == "full" else LLAVA_TINY, overrides)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**kw.pop("vision_config")),
                      text_config=LlamaConfig(**kw.pop("text_config")), **kw)
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()


def build_use(size: str, overrides: dict[str, Any], device: torch.device):
    """A :class:`trainer.model.USEModel` (fp32 weights, run under bf16 autocast as the trainer does)."""
    from trainer.model import ModelConfig, USEModel

    cfg = ModelConfig.from_dict(merged(USE_FULL if size == "full" else USE_TINY, overrides))
    with torch.device(device):
        return USEModel(cfg)
