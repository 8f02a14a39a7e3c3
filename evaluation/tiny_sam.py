"""``python -m evaluation tiny-sam --out DIR``: a tiny randomly initialised SAM for the demo and CI.

No SAM weights can be downloaded where the demo runs, so ``make demo`` exercises the SAM path of the
evaluation with this model: transformers' ``SamModel`` at width 32, 2 encoder layers, a 64-pixel
input (the same configuration the SAM tests build in ``tests/tiny_models.py``), saved
with ``save_pretrained`` and loaded back by ``pipeline.models.load_sam`` like real weights. Its masks
are blocks of a 4x4 embedding grid and mean nothing; the demo's SAM-path mIoU shows the plumbing,
not SAM's quality.
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-sam", help="write a tiny random SAM (demo / CI; no weights needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.set_defaults(func=lambda a: print(f"tiny SAM written to {build_tiny_sam(a.out, seed=a.seed)}") or 0)
