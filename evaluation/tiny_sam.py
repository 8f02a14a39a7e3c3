"""``python -m evaluation tiny-sam --out DIR``: a tiny randomly initialised SAM for the demo and CI.

No SAM weights can be downloaded where the demo runs, so ``make demo`` exercises the SAM path of the
evaluation with this model: transformers' ``SamModel`` at width 32, 2 encoder layers, a 64-pixel
input (the same configuration the SAM tests build in ``tests/tiny_models.py``), saved
with ``save_pretrained`` and loaded back by ``pipeline.models.load_sam`` like real weights. Its masks
are blocks of a 4x4 embedding grid and mean nothing; the demo's SAM-path mIoU shows the plumbing,
not SAM's quality.

:func:`build_tiny_segment_anything` builds the same kind of model in segment-anything, the reference
implementation, for the tests and benchmarks that check our SAM code against it on shared weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_tiny_sam(directory: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write a tiny random ``SamModel`` + ``SamProcessor`` to ``directory`` (same seed, same weights)."""
    import torch  # here, not at the top: ``python -m evaluation --help`` does not load torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    directory = Path(directory)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=image_size, patch_size=16, window_size=2, global_attn_indexes=[1],
                                      mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                 iou_head_hidden_dim=32),
    )
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": image_size},
                                               pad_size={"height": image_size, "width": image_size}))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_segment_anything(image_size: int = 256, decoder_heads: int = 8, seed: int = 0,
                                logit_gain: float = 1.0):
    """A randomly initialised segment-anything ``Sam`` (the reference implementation), small enough for CPU tests.

    Built like ``segment_anything.build_sam._build_sam`` (ViT image encoder with windowed and global
    relative-position attention, prompt encoder, two-way transformer decoder) at width 32, 2 encoder
    blocks, ``image_size`` input (patch 16). Random decoders give logits near 0; ``logit_gain``
    scales the mask hypernetworks' last layer so that masks are confident enough for SAM's
    stability filter to keep some, and the decoder's two 2x2 transposed convolutions get one weight
    per kernel (their mean), so masks are blocks of the embedding grid instead of a random 4x4
    checkerboard that spans the whole image (weight changes, the same on both sides of a comparison).
    """
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=dim, img_size=image_size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4,
                                      out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(image_size // 16, image_size // 16),
                                     input_image_size=(image_size, image_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64,
                                                               num_heads=decoder_heads),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for conv in (sam.mask_decoder.output_upscaling[0], sam.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight.mean(dim=(2, 3), keepdim=True).expand_as(conv.weight))
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_gain)
            mlp.layers[-1].bias.mul_(logit_gain)
    return sam.eval()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-sam", help="write a tiny random SAM (demo / CI; no weights needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.set_defaults(func=lambda a: print(f"tiny SAM written to {build_tiny_sam(a.out, seed=a.seed)}") or 0)
