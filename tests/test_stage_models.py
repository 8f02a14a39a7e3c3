"""pipeline.models: local directories, the models directory, one clear error; download never runs here."""

from __future__ import annotations

import pytest

from pipeline import models
from pipeline.models import ModelNotFoundError, model_specs, resolve
from pipeline.stages.config import CaptionerConfig, GrounderConfig, SegmenterConfig


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_local_directory_and_models_dir(tmp_path, monkeypatch):
    local = _model_dir(tmp_path / "my-sam")
    assert resolve(str(local)) == str(local)
    downloaded = _model_dir(tmp_path / "cache" / "facebook" / "sam-vit-huge")
    assert resolve("facebook/sam-vit-huge", tmp_path / "cache") == str(downloaded)
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path / "cache"))
    assert resolve("facebook/sam-vit-huge") == str(downloaded)


def test_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "_from_hf_cache", lambda repo_id: None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve("llava-hf/llava-1.5-7b-hf", tmp_path / "models")
    msg = str(info.value)
    assert "'llava-hf/llava-1.5-7b-hf'" in msg and str(tmp_path / "models") in msg
    assert "python -m pipeline models download" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="no-such-dir"):
        resolve(str(tmp_path / "no-such-dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError):  # a directory without config.json is not a model
        resolve(str(empty))


def test_model_specs_from_mapping_job_config_or_defaults():
    assert model_specs({"segmenter": "x/y"}) == {"segmenter": "x/y"}
    assert model_specs(None) == {"captioner": CaptionerConfig().model, "grounder": GrounderConfig().model,
                                 "segmenter": SegmenterConfig().model}

    class Job:
        captioner = CaptionerConfig(enabled=False)
        grounder = GrounderConfig(model="a/b")
        segmenter = SegmenterConfig()
        phrases = None

    assert model_specs(Job()) == {"grounder": "a/b", "segmenter": "facebook/sam-vit-huge"}


def test_download_refuses_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        models.download({"segmenter": "facebook/sam-vit-huge"}, None)


def test_default_models_equal_the_stage_defaults_without_importing_stages():
    assert models.DEFAULT_MODELS == {"captioner": CaptionerConfig().model, "grounder": GrounderConfig().model,
                                     "segmenter": SegmenterConfig().model}
    import ast
    import inspect

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(models)))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(m.startswith("pipeline.stages") for m in imported)


def test_device_and_dtype_from_plain_arguments(monkeypatch):
    import torch

    assert models.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device(None) == torch.device("cpu")
    assert models.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.pick_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="float64"):
        models.pick_dtype("float64", torch.device("cpu"))


def test_load_pretrained_and_load_sam(tmp_path):
    import torch
    from fixtures_models import tiny_model_dirs
    from transformers import SamModel, SamProcessor

    processor, model, device, dtype = models.load_pretrained(str(tiny_model_dirs().sam), SamProcessor, SamModel,
                                                             device="cpu", dtype="auto")
    assert isinstance(model, SamModel) and not model.training and (device, dtype) == (torch.device("cpu"), torch.float32)
    processor, model, _, dtype = models.load_sam(str(tiny_model_dirs().sam), device="cpu", dtype="bfloat16")
    assert dtype == torch.bfloat16 and model.mask_decoder.iou_token.weight.dtype == torch.bfloat16
    assert model.prompt_encoder.no_mask_embed.weight.dtype == torch.float32
    broken = _model_dir(tmp_path / "broken")  # config.json "{}": resolves, but is no model
    with pytest.raises(RuntimeError, match="could not load model"):
        models.load_sam(str(broken), device="cpu")
