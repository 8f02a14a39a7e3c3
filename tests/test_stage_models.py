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
