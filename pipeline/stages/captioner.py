"""Multi-granular captioning with LLaVA-1.5 (``LlavaForConditionalGeneration``).

Each image is asked every prompt of ``CaptionerConfig.prompts``; the (image, prompt) pairs of a
batch are generated prompt by prompt, ``generate_batch_size`` sequences per ``generate`` call, each
prompt with its own answer budget (``max_new_tokens``: a list of objects needs far more tokens than
a scene sentence). An answer that reaches its budget without an end-of-sequence token was cut; it is
kept (its phrases are still good) and counted in ``record.captions_cut``, which the job sums into
``summary.json`` so that a budget too small for the prompts shows. The prompt
text comes from the processor's chat template (never a hand-written "USER: <image>..." string,
which silently differs between LLaVA releases), the processor expands ``<image>`` into as many
image tokens as the vision tower yields (checked once at load time, so a mismatched processor fails
the job at start instead of every image), the tokenizer pads on the left so that every sequence
ends where generation starts, and only the newly generated tokens are decoded.

The ``llava-hf`` processors resize the short side and centre-crop, so a 640x480 photo loses 12.5% at
each side before LLaVA sees it, while LLaVA-1.5 was trained padding every image to a square
(``image_aspect_ratio: pad``, ``expand2square`` filled with the image processor's mean colour).
With ``pad_to_square`` (default) images are padded that way before the processor, so its crop
is a no-op and the whole image is captioned. Decoding is greedy:
the same image gives the same captions on every run, which makes resumed jobs consistent.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.record import Record, records_of, with_records
from pipeline.retry import retry_per_item
from shards.schema import Caption

from .common import chunks, decode_pending, load_model
from .config import CaptionerConfig

STAGE = "captioner"


class Captioner:
    """Ray Data callable: appends a ``Caption(text, "llava:<prompt name>")`` to ``record.captions``."""

    def __init__(self, config: CaptionerConfig | dict):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.config = config if isinstance(config, CaptionerConfig) else CaptionerConfig.model_validate(config)
        self.processor, self.model, self.device, self.dtype = load_model(STAGE, self.config, AutoProcessor, LlavaForConditionalGeneration)
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.image_token_id = self.model.config.image_token_id
        self.expected_image_tokens = expected_image_tokens(self.model.config)
        self.prompts = {name: self.chat_prompt(text) for name, text in self.config.prompts.items()}
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id]
        self.eos_ids = torch.tensor(sorted({*eos, tok.eos_token_id}))
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
        self.pad_color = tuple(int(round(255 * m)) for m in mean)
        self._check_image_tokens()

    def chat_prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _check_image_tokens(self) -> None:
        probe = self.processor(images=[Image.new("RGB", (64, 48))], text=[next(iter(self.prompts.values()))],
                               return_tensors="pt")
        n = int((probe["input_ids"][0] == self.image_token_id).sum())
        if n != self.expected_image_tokens:
            raise RuntimeError(
                f"{STAGE}: the processor of {self.config.model!r} puts {n} image tokens in a prompt but the "
                f"vision tower gives {self.expected_image_tokens} features (processor patch_size / "
                f"vision_feature_select_strategy do not match the model)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        pending = decode_pending(batch, records, STAGE, policy=self.config.read)
        pending = list(pending)
        for name in self.prompts:  # one generate call holds one prompt, so one answer budget
            items = [(i, image, name) for i, image in pending if records[i].failure is None]
            for group in chunks(items, self.config.generate_batch_size):
                for done, answers in retry_per_item(group, self._caption_group,
                                                    lambda item, e: records[item[0]].fail(STAGE, e),
                                                    what=f"{STAGE}: generation",
                                                    describe=lambda item: records[item[0]].image_id):
                    self._add_captions(done, answers, records)
        return with_records(batch, records)

    def _caption_group(self, group) -> tuple[list[str], list[bool]]:
        """Answers to one prompt for a group of (row, image, prompt name), and whether each ended."""
        name = group[0][2]
        return self.generate([image for _, image, _ in group], [self.prompts[name]] * len(group),
                             self.config.budget(name))

    @staticmethod
    def _add_captions(group, answers: tuple[list[str], list[bool]], records: list[Record]) -> None:
        name = group[0][2]
        texts, finished = answers
        for (i, _, _), text, done in zip(group, texts, finished, strict=True):
            text = " ".join(text.split())
            if text and records[i].failure is None:
                records[i].captions.append(Caption(text, f"llava:{name}"))
                records[i].captions_cut += 0 if done else 1

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str],
                 max_new_tokens: int) -> tuple[list[str], list[bool]]:
        """Greedy captions for aligned ``images`` and chat-formatted ``prompts`` (only new tokens decoded),
        and for each whether it ended with an end-of-sequence token (False: cut at ``max_new_tokens``)."""
        if self.config.pad_to_square:
            images = [pad_to_square(image, self.pad_color) for image in images]
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tok = self.processor.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=tok.pad_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        finished = torch.isin(new_tokens.cpu(), self.eos_ids).any(dim=1).tolist()
        return tok.batch_decode(new_tokens, skip_special_tokens=True), finished


def expected_image_tokens(config) -> int:
    """Image features LLaVA's vision tower yields per image: patches, plus CLS for the "full" strategy."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of ``color`` (LLaVA-1.5's ``expand2square``), side = its long side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square
