"""Tiny randomly initialised LLaVA, Grounding DINO and SAM, saved with ``save_pretrained``.

The stages load them through the same ``from_pretrained`` code path as real weights. Configs follow
``../shared/TINY_MODELS.md``; nothing is downloaded (tokenizers are built from in-memory vocabularies).
Each builder returns the directory it wrote.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from evaluation.tiny_sam import build_tiny_segment_anything  # noqa: F401  (the reference SAM, shared with benchmarks)

#: LLaVA-1.5's chat template (llava-hf/llava-1.5-*-hf), so the tiny processor formats prompts the same way.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_IMAGE_TOKEN_ID = 99
LLAVA_IMAGE_SEQ_LENGTH = 16

#: Words the tiny Grounding DINO vocabulary knows whole (others fall back to single letters).
GDINO_WORDS = (
    "a an the man woman person dog cat horse car bus tree sky grass road fence shirt hat red blue green "
    "brown white black wooden small large big in on of with next to near and cup table chair window door "
    "wheel head leg hand building street water boat bird kitchen pizza plate"
).split()


def _manual_seed() -> None:
    torch.manual_seed(0)


def build_tiny_llava(directory: str | Path) -> Path:
    """LLaVA with a 2-layer CLIP vision tower (16 image tokens) and a character-level Llama tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    directory = Path(directory)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = list(" \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,:;!?'-()")
    vocab_list = (specials + chars)[:LLAVA_IMAGE_TOKEN_ID]
    vocab_list += [f"<x{i}>" for i in range(LLAVA_IMAGE_TOKEN_ID - len(vocab_list))] + ["<image>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == LLAVA_IMAGE_TOKEN_ID
    # As llava-hf/llava-1.5-7b-hf's CLIPImageProcessor (at 32 px instead of 336): shortest-edge resize,
    # centre crop, OpenAI CLIP mean/std; the crop is what the captioner's pad-to-square must defeat.
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         do_resize=True, do_center_crop=True, resample=3, do_normalize=True,
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3),
        image_token_index=LLAVA_IMAGE_TOKEN_ID, image_seq_length=LLAVA_IMAGE_SEQ_LENGTH,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    _manual_seed()
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _gdino_vocab() -> list[str]:
    """1100 BERT tokens with [PAD]/[UNK]/[CLS]/[SEP]/[MASK] and "."/"?" at BERT's own ids."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    fixed = {1012: ".", 1029: "?"}
    pieces = list(dict.fromkeys(GDINO_WORDS + list(string.ascii_lowercase) + list(string.digits)
                                + [",", "-", "'", "!", "(", ")"] + [f"##{c}" for c in string.ascii_lowercase]
                                + [f"##{d}" for d in string.digits]))
    for i in range(len(vocab), 1100):
        vocab.append(fixed.get(i) or (pieces.pop(0) if pieces else f"[unused{i}]"))
    assert not pieces
    return vocab


def build_tiny_grounding_dino(directory: str | Path, max_text_len: int = 32) -> Path:
    """Grounding DINO with a 4-stage Swin of width 16 and a 1-layer BERT over a 1100-line vocabulary."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / "vocab.txt"
    vocab_path.write_text("\n".join(_gdino_vocab()) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_path))
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=max_text_len,
        encoder_n_points=2, decoder_n_points=2,
    )
    _manual_seed()
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_sam(directory: str | Path, image_size: int = 64) -> Path:
    """SAM with a 2-layer ViT over 64x64 inputs (4x4 embeddings, 16x16 low-resolution masks).

    ``image_size=1024`` gives the real models' input frame (64x64 embeddings, 256x256 low-resolution
    masks) at the same width, for tests of coordinates at real scale. The one tiny-SAM definition is
    the demo's (``python -m evaluation tiny-sam``), so tests and demo load the same model.
    """
    from evaluation.tiny_sam import build_tiny_sam as build

    return build(directory, image_size=image_size, seed=0)
