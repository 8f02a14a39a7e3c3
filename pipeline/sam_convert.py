"""Official SAM checkpoints (``sam_vit_{b,l,h}_*.pth``) to the transformers ``SamModel`` layout.

``python -m pipeline models convert-sam CHECKPOINT OUT_DIR`` writes ``config.json``,
``model.safetensors`` and the processor config, a directory that ``segmenter.model`` (or the
evaluation's ``model``) can name, for users who already hold the official files.

The key renaming follows transformers' own ``convert_sam_to_hf.py``; unlike it, the config is
read off the tensors instead of chosen by file name, so any image encoder size converts (vit_b/l/h
and smaller test models): width and depth from the blocks, heads from the relative-position
tables (``2 * window - 1`` rows for windowed blocks, ``2 * grid - 1`` for global ones), image size
from the absolute position embedding, prompt and decoder widths from their layers. The one number
the tensors do not hold, the mask decoder's attention heads, is 8 in every official checkpoint
(``--decoder-heads`` otherwise). The checkpoint is read with ``torch.load(weights_only=True)``
(never unpickled) and loaded into ``SamModel`` strictly, so a missing or unexpected tensor is an
error, never a silently random weight.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Substring renames, applied in order (transformers' KEYS_TO_MODIFY_MAPPING less the MLP layer
#: renames, which :func:`hf_key` does by position for any depth).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_MLP = re.compile(r"(.*(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.(.*)")
_SKIP = ("pixel_mean", "pixel_std")  # buffers of segment-anything's Sam, not weights


class CheckpointError(ValueError):
    """The file is not a segment-anything SAM state dict."""


def hf_key(key: str, mlp_depths: Mapping[str, int]) -> str:
    """The transformers name of segment-anything tensor ``key``.

    segment-anything's MLPs are ``layers.0 .. layers.{d-1}``; transformers' ``SamFeedForward`` calls
    them ``proj_in``, ``layers.0 .. layers.{d-3}``, ``proj_out`` (``mlp_depths``: prefix -> d).
    """
    match = _MLP.fullmatch(key)
    if match:
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        depth = mlp_depths[prefix]
        name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        key = f"{prefix}.{name}.{rest}"
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def _mlp_depths(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in state_dict:
        match = _MLP.fullmatch(key)
        if match:
            depths[match.group(1)] = max(depths.get(match.group(1), 0), int(match.group(2)) + 1)
    return depths


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a segment-anything state dict to ``SamModel``'s (plus its tied image positional embedding)."""
    depths = _mlp_depths(state_dict)
    out = {hf_key(k, depths): v for k, v in state_dict.items() if k not in _SKIP}
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(state_dict: Mapping[str, torch.Tensor], *, decoder_num_heads: int = 8) -> dict:
    """``SamConfig`` keyword arguments read off a segment-anything state dict (see the module docstring)."""
    sd = state_dict
    try:
        patch = sd["image_encoder.patch_embed.proj.weight"]
        width, patch_size = patch.shape[0], patch.shape[-1]
        grid = sd["image_encoder.pos_embed"].shape[1]
        depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
        tables = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        head_dim = tables[0][1]
        global_blocks = [i for i, t in enumerate(tables) if t[0] == 2 * grid - 1]
        windowed = [t[0] for t in tables if t[0] != 2 * grid - 1]
        window = (windowed[0] + 1) // 2 if windowed else grid
        prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
        decoder_depth = _count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight")
        vision = {
            "hidden_size": width, "output_channels": prompt_dim, "num_hidden_layers": depth,
            "num_attention_heads": width // head_dim, "image_size": grid * patch_size, "patch_size": patch_size,
            "window_size": window, "global_attn_indexes": global_blocks,
            "mlp_dim": sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
            "num_pos_feats": sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1],
        }
        prompt = {"hidden_size": prompt_dim, "image_size": grid * patch_size, "patch_size": patch_size,
                  "mask_input_channels": sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]}
        decoder = {
            "hidden_size": prompt_dim, "num_hidden_layers": decoder_depth, "num_attention_heads": decoder_num_heads,
            "mlp_dim": sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            "num_multimask_outputs": sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            "iou_head_depth": _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
            "iou_head_hidden_dim": sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        }
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"not a segment-anything SAM state dict (missing or odd tensor {e})") from e
    return {"vision_config": vision, "prompt_encoder_config": prompt, "mask_decoder_config": decoder}


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A segment-anything checkpoint as a state dict, read with ``weights_only=True``."""
    import torch  # here, not at the top: `python -m pipeline --help` should not load torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(state)


def convert(state_dict: Mapping[str, torch.Tensor], *, decoder_num_heads: int = 8):
    """A ``SamModel`` (eval mode) holding a segment-anything state dict, loaded strictly, and its processor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(**infer_config(state_dict, decoder_num_heads=decoder_num_heads))
    model = SamModel(config).eval()
    result = model.load_state_dict(convert_state_dict(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"tensors do not fit SamModel: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    size = config.vision_config.image_size
    kwargs = {}
    if "pixel_mean" in state_dict and "pixel_std" in state_dict:  # the model's own normalisation, in 0..1 units
        kwargs = {"image_mean": [float(v) / 255 for v in state_dict["pixel_mean"].flatten()],
                  "image_std": [float(v) / 255 for v in state_dict["pixel_std"].flatten()]}
    processor = SamProcessor(SamImageProcessor(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": size // 4}, mask_pad_size={"height": size // 4, "width": size // 4}, **kwargs))
    return model, processor


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, decoder_num_heads: int = 8) -> Path:
    """Convert ``checkpoint`` and ``save_pretrained`` model (safetensors) and processor into ``out_dir``."""
    model, processor = convert(load_checkpoint(checkpoint), decoder_num_heads=decoder_num_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", help="official SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    parser.add_argument("out_dir", help="directory to write config.json, model.safetensors and the processor into")
    parser.add_argument("--decoder-heads", type=int, default=8,
                        help="mask decoder attention heads (not stored in the checkpoint; 8 in every official one)")
    return parser


def run(args: argparse.Namespace) -> int:
    """The ``models convert-sam`` command: 0 on success, 2 with one error line otherwise."""
    try:
        out = convert_checkpoint(args.checkpoint, args.out_dir, decoder_num_heads=args.decoder_heads)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
