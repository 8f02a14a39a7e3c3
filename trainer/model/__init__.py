"""The USE segment embedding model: frozen CLIP + DINOv2, multi-level merge, area-weighted head.

Public API: :class:`ModelConfig`, :class:`USEModel`, :class:`ImageTransform`, :func:`area_weights`,
:func:`area_weights_from_rle`, :func:`segment_inputs` (resize + area weights, shared by training and
:meth:`USEModel.embed_masks`), :class:`SegmentTextLoss` (and :func:`text_ids` for it).
"""

from .area_weights import area_weights, area_weights_from_rle, valid_rows
from .config import ClipBackboneConfig, DinoBackboneConfig, ModelConfig, PretrainedClip, TinyClip
from .loss import SegmentTextLoss, text_ids
from .segments import SegmentInputs, segment_inputs, segment_weights
from .transforms import ImageTransform
from .use_model import USEModel, named_trainable, pool_segments

__all__ = [
    "ClipBackboneConfig", "DinoBackboneConfig", "ImageTransform", "ModelConfig", "PretrainedClip",
    "SegmentTextLoss", "TinyClip", "USEModel", "area_weights", "area_weights_from_rle", "named_trainable",
    "pool_segments",
    "SegmentInputs", "segment_inputs", "segment_weights", "text_ids", "valid_rows",
]
