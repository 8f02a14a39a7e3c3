"""pipeline.sam_convert: segment-anything state dicts to transformers SamModel, every tensor kept, configs read off shapes."""

from __future__ import annotations

import collections

import pytest
import torch
from segment_anything import sam_model_registry
from tiny_models import build_tiny_segment_anything
from transformers import SamConfig, SamModel

from pipeline.cli import main
from pipeline.sam_convert import CheckpointError, convert_state_dict, hf_key, infer_config, load_checkpoint


class NotATensor:
    """Pickled by the test to show that the converter never unpickles arbitrary objects."""


def test_converter_round_trips_a_segment_anything_state_dict(tmp_path, capsys):
    sam = build_tiny_segment_anything(image_size=128)
    original = sam.state_dict()
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(original, ckpt)
    assert main(["models", "convert-sam", str(ckpt), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "processor_config.json").is_file()
    loaded = SamModel.from_pretrained(tmp_path / "hf").state_dict()
    names = convert_state_dict(original)
    depths = {"mask_decoder.iou_prediction_head": 3, **{f"mask_decoder.output_hypernetworks_mlps.{i}": 3 for i in range(4)}}
    mapped = {hf_key(k, depths): k for k in original}
    assert len(mapped) == len(original)  # one-to-one
    assert set(loaded) == set(names) == set(mapped) | {"shared_image_embedding.positional_embedding"}
    for new, old in mapped.items():
        assert torch.equal(loaded[new], original[old]), new
    assert torch.equal(loaded["shared_image_embedding.positional_embedding"],
                       original["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    config = SamConfig.from_pretrained(tmp_path / "hf")
    assert (config.vision_config.image_size, config.vision_config.num_attention_heads,
            list(config.vision_config.global_attn_indexes), config.vision_config.window_size) == (128, 2, [1], 4)


# the official configurations (transformers' convert_sam_to_hf.py and facebook/sam-vit-* config.json)
@pytest.mark.parametrize(("name", "width", "depth", "heads", "global_attn"), [
    ("vit_b", 768, 12, 12, [2, 5, 8, 11]),
    ("vit_l", 1024, 24, 16, [5, 11, 17, 23]),
    ("vit_h", 1280, 32, 16, [7, 15, 23, 31]),
])
def test_official_sizes_are_read_off_the_shapes(name, width, depth, heads, global_attn):
    with torch.device("meta"):  # shapes only: no gigabytes of random weights
        state = sam_model_registry[name]().state_dict()
    config = infer_config(state)
    vision, prompt, decoder = config["vision_config"], config["prompt_encoder_config"], config["mask_decoder_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (width, depth, heads)
    assert vision["global_attn_indexes"] == global_attn
    assert (vision["image_size"], vision["patch_size"], vision["window_size"], vision["mlp_dim"]) == (1024, 16, 14, 4 * width)
    assert (vision["output_channels"], vision["num_pos_feats"]) == (256, 128)
    assert prompt == {"hidden_size": 256, "image_size": 1024, "patch_size": 16, "mask_input_channels": 16}
    assert decoder == {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "mlp_dim": 2048,
                       "num_multimask_outputs": 3, "iou_head_depth": 3, "iou_head_hidden_dim": 256}
    with torch.device("meta"):
        model = SamModel(SamConfig(**config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in convert_state_dict(state).items()} == expected


def test_bad_checkpoints_are_one_clear_error(tmp_path, capsys):
    pickled = tmp_path / "pickled.pth"
    torch.save({"obj": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(pickled)
    strings = tmp_path / "strings.pth"
    torch.save(collections.OrderedDict(a="b"), strings)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_checkpoint(strings)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    assert main(["models", "convert-sam", str(other), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a segment-anything SAM state dict" in err and err.count("\n") == 1
    assert main(["models", "convert-sam", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    assert "missing.pth" in capsys.readouterr().err
