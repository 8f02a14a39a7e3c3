"""SAM's prompt encoder stays float32 when the model runs in bfloat16, so box corners keep their place on large images.

In bfloat16 a corner at x ~ 1000 of the 1024 input frame is rounded to a multiple of 4 before its
positional encoding (sin/cos of the coordinate times random frequencies): the embedding moves as if
the box edge had moved by up to 2 input pixels (8 pixels of a 4000-pixel photo).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_sam
from transformers import SamModel, SamProcessor

from pipeline import sam as sam_utils
from pipeline.models import load_pretrained, load_sam

ORIGINAL = (3000, 4000)  # a 12 MP photo, (H, W)
BOXES = [[3000.7, 2100.3, 3990.2, 2995.6], [13.1, 7.9, 3987.4, 2991.1], [1234.5, 987.6, 2345.6, 1876.5]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sam(tmp_path_factory.mktemp("sam1024"), image_size=1024)


def _decoder_inputs(processor, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt encoder output, what the mask decoder receives) for ``BOXES`` through :func:`decode_prompts`."""
    seen = {}
    encoder, decoder = model.prompt_encoder.forward, model.mask_decoder.forward

    def encode(**kwargs):
        seen["encoded"] = encoder(**kwargs)[0]
        return encoder(**kwargs)

    def decode(**kwargs):
        seen["decoder"] = kwargs["sparse_prompt_embeddings"]
        return decoder(**kwargs)

    model.prompt_encoder.forward, model.mask_decoder.forward = encode, decode
    dtype = model.mask_decoder.iou_token.weight.dtype
    embedding = torch.zeros(1, 32, 64, 64, dtype=dtype)
    reshaped = (768, 1024)
    logits, _ = sam_utils.decode_prompts(model, processor, embedding, ORIGINAL, reshaped, boxes=BOXES)
    assert logits.shape == (3, 1, *ORIGINAL)
    return seen["encoded"].float(), seen["decoder"].float()


def test_box_prompt_embeddings_in_bf16_equal_fp32(model_dir):
    processor, fp32, _, _ = load_sam(str(model_dir), device="cpu", dtype="float32")
    _, bf16, _, dtype = load_sam(str(model_dir), device="cpu", dtype="bfloat16")
    assert dtype == torch.bfloat16 and bf16.vision_encoder.pos_embed.dtype == torch.bfloat16
    assert bf16.prompt_encoder.shared_embedding.positional_embedding.dtype == torch.float32
    want, _ = _decoder_inputs(processor, fp32)
    encoded, received = _decoder_inputs(processor, bf16)
    assert (encoded - want).abs().max() < 1e-5  # the prompt encoder itself ran in float32
    assert (received - want).abs().max() < 1e-2  # only the final cast to the decoder's bfloat16 remains

    # what today's main did: the whole model, prompt encoder included, in bfloat16
    _, plain, _, _ = load_pretrained(str(model_dir), SamProcessor, SamModel, device="cpu", dtype="bfloat16")
    _, rounded = _decoder_inputs(processor, plain)
    assert (rounded - want).abs().max() > 0.05
