"""Captioner on a tiny LLaVA loaded through from_pretrained: prompt format, image tokens, new tokens only."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_models import image_bytes, make_batch, tiny_model_dirs
from PIL import Image
from tiny_models import LLAVA_IMAGE_SEQ_LENGTH, build_tiny_llava

from pipeline.models import ModelNotFoundError
from pipeline.record import Record, records_of
from pipeline.stages.captioner import Captioner
from pipeline.stages.config import CaptionerConfig
from shards.schema import Caption

PROMPTS = {"scene": "Describe the scene.", "parts": "List the parts of each object in this image, with colors."}


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner(CaptionerConfig(model=str(tiny_model_dirs().llava), prompts=PROMPTS, max_new_tokens=6,
                                     generate_batch_size=3))


def test_prompt_comes_from_the_chat_template(captioner):
    assert captioner.prompts["scene"] == "USER: <image>\nDescribe the scene. ASSISTANT:"


def test_batched_prompts_hold_exactly_the_image_tokens_and_pad_left(captioner):
    prompts = [captioner.prompts["scene"], captioner.prompts["parts"]]
    inputs = captioner.processor(images=[Image.new("RGB", (50, 20)), Image.new("RGB", (20, 70))], text=prompts,
                                 padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    n_image = (ids == captioner.model.config.image_token_id).sum(dim=1)
    assert n_image.tolist() == [LLAVA_IMAGE_SEQ_LENGTH] * 2 == [captioner.expected_image_tokens] * 2
    pad = captioner.processor.tokenizer.pad_token_id
    assert ids[0, 0] == pad and ids[1, 0] != pad  # the shorter prompt is padded on the left...
    assert (ids[:, -1] == ids[0, -1]).all()  # ...so both end at "ASSISTANT:" where generation starts


def test_only_new_tokens_are_decoded(captioner, monkeypatch):
    tok = captioner.processor.tokenizer
    answer = tok("a dog", add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def fake_generate(input_ids, max_new_tokens, **kwargs):
        assert max_new_tokens == 6 and kwargs["do_sample"] is False
        return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(captioner.model, "generate", fake_generate)
    texts, finished = captioner.generate([Image.new("RGB", (40, 30))] * 2,
                                         [captioner.prompts["scene"], captioner.prompts["parts"]], 6)
    assert texts == ["a dog", "a dog"] and finished == [False, False]


def test_budget_per_prompt_and_answers_cut_without_eos_are_counted(monkeypatch):
    """Each prompt generates with its own budget; an answer that ends without EOS is kept and counted."""
    captioner = Captioner(CaptionerConfig(model=str(tiny_model_dirs().llava), prompts=PROMPTS,
                                          max_new_tokens={"scene": 3, "parts": 7}))
    tok = captioner.processor.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    budgets = []

    def fake_generate(input_ids, max_new_tokens, **kwargs):
        budgets.append(max_new_tokens)
        n = len(input_ids)
        words = tok("ab cd ef gh", add_special_tokens=False, return_tensors="pt")["input_ids"][0][:max_new_tokens]
        new = words.repeat(n, 1)
        if max_new_tokens == 7:  # the parts answer of the first image ends with EOS (then padding)
            new[0, 3:] = torch.tensor([eos] + [pad] * 3)
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(captioner.model, "generate", fake_generate)
    records = [Record(source="s", image_id=str(i)) for i in range(2)]
    out = records_of(captioner(make_batch(records, [image_bytes(40, 30), image_bytes(30, 40)])))
    assert sorted(budgets) == [3, 7]
    assert [[c.text for c in r.captions] for r in out] == [["ab", "ab"], ["ab", "ab cd e"]]
    assert [c.source for c in out[0].captions] == ["llava:scene", "llava:parts"]
    assert [r.captions_cut for r in out] == [1, 2]  # scene cut for both, parts cut for the second only
    assert CaptionerConfig().budget("objects") == 384 and CaptionerConfig(max_new_tokens=50).budget("parts") == 50
    with pytest.raises(ValueError, match="prompts that do not exist"):
        CaptionerConfig(max_new_tokens={"nope": 10})


def test_call_appends_one_caption_per_prompt_and_fails_bad_images(captioner):
    spy_lengths = []
    generate = captioner.model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        spy_lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    captioner.model.generate = spy
    try:
        good = Record(source="s", image_id="1", captions=[Caption("A dog.", "coco")])
        bad = Record(source="s", image_id="2")
        failed = Record(source="s", image_id="3")
        failed.fail("read", "missing file")
        other = Record(source="s", image_id="4")
        batch = make_batch([good, bad, failed, other],
                           [image_bytes(40, 30), b"not an image", image_bytes(30, 30), image_bytes(20, 64)])
        out = records_of(captioner(batch))
    finally:
        del captioner.model.generate
    assert [c.source for c in out[0].captions] == ["coco", "llava:scene", "llava:parts"]
    assert [c.source for c in out[3].captions] == ["llava:scene", "llava:parts"]
    assert out[0].failure is None and out[3].failure is None
    assert (out[0].width, out[0].height) == (40, 30)
    assert out[1].failure.stage == "captioner" and "not an image" in out[1].failure.error
    assert out[2].failure.stage == "read" and out[2].captions == []
    assert len(spy_lengths) == 2 and all(0 < n <= 6 for n in spy_lengths)  # 4 sequences in groups of 3
    assert all(c.text.strip() == c.text and c.text for r in (out[0], out[3]) for c in r.captions)


def test_a_failing_image_fails_alone(captioner, monkeypatch):
    def flaky(images, prompts, max_new_tokens):
        if any(im.size == (20, 64) for im in images):
            raise RuntimeError("CUDA out of memory")
        return [f"caption {len(p)}" for p in prompts], [True] * len(prompts)

    monkeypatch.setattr(captioner, "generate", flaky)
    records = [Record(source="s", image_id=str(i)) for i in range(3)]
    out = records_of(captioner(make_batch(records, [image_bytes(40, 30), image_bytes(20, 64), image_bytes(30, 30)])))
    assert [len(r.captions) for r in out] == [2, 0, 2]
    assert out[1].failure.stage == "captioner" and "out of memory" in out[1].failure.error


def test_image_token_mismatch_fails_at_load(tmp_path):
    path = build_tiny_llava(tmp_path / "llava")
    cfg_file = path / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["patch_size"] = 16  # 4 image tokens in the prompt, 16 features from the vision tower
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="4 image tokens.*16 features"):
        Captioner(CaptionerConfig(model=str(path)))


def test_missing_model_names_the_download_command(tmp_path):
    with pytest.raises(ModelNotFoundError, match="python -m pipeline models download"):
        Captioner(CaptionerConfig(model=str(tmp_path / "no-such-llava")))


def _stripe_image() -> Image.Image:
    """A wide grey image with a red stripe at its left border and a blue one at its right."""
    image = Image.new("RGB", (96, 40), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 8, 40))
    image.paste((0, 0, 255), (88, 0, 96, 40))
    return image


def _pixels_seen(captioner: Captioner, monkeypatch) -> torch.Tensor:
    """The pixel values that reach the model for the stripe image, in [0, 1] RGB (normalisation undone)."""
    seen = []

    def fake_generate(input_ids, pixel_values, **kwargs):
        seen.append(pixel_values)
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    monkeypatch.setattr(captioner.model, "generate", fake_generate)
    captioner.generate([_stripe_image()], [captioner.prompts["scene"]], 1)
    proc = captioner.processor.image_processor
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    return seen[0][0].float() * std + mean


@pytest.mark.parametrize("pad", [True, False])
def test_padding_to_a_square_keeps_the_image_borders(monkeypatch, pad):
    captioner = Captioner(CaptionerConfig(model=str(tiny_model_dirs().llava), prompts=PROMPTS, pad_to_square=pad))
    pixels = _pixels_seen(captioner, monkeypatch)  # [3, 32, 32]
    mid = pixels[:, 16]
    red = (mid[0] > 0.8) & (mid[1] < 0.2) & (mid[2] < 0.2)
    blue = (mid[2] > 0.8) & (mid[0] < 0.2) & (mid[1] < 0.2)
    if pad:  # 96x40 on a 96x96 square: both stripes reach the model, the pad has the processor's mean colour
        assert red[:2].all() and blue[-2:].all()
        assert pixels[:, 0, 16].tolist() == pytest.approx(captioner.processor.image_processor.image_mean, abs=0.01)
        assert captioner.pad_color == (123, 117, 104)
    else:  # the real llava-1.5 processor's shortest-edge resize + centre crop cuts both borders off
        assert not red.any() and not blue.any()
