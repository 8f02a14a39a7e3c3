"""Where model weights come from: local directories, never a download during a job.

A model spec in a config is either a local directory (absolute, or relative to the working
directory or to ``models_dir``) or a Hugging Face hub id such as ``llava-hf/llava-1.5-7b-hf``.
:func:`resolve` looks only at the disk: the directory itself, ``models_dir/<id>`` (where
``python -m pipeline models download`` puts weights) and the Hugging Face cache
(``local_files_only``). A job therefore never touches the network, whatever ``HF_HUB_OFFLINE``
says, and every actor on every node loads the same bytes; a missing model fails at actor start with
one :class:`ModelNotFoundError` naming the spec, where it was looked for, and the download command.
:func:`download` is the one place that goes online (for users with internet).

Loading takes plain arguments (a spec, a models directory, a device, a dtype), so that evaluation
and benchmarks load SAM exactly as the segmenter stage does, without a stage config:
:func:`load_pretrained` for any transformers processor/model pair, :func:`load_sam` for SAM (its
prompt encoder kept in float32, see :func:`load_sam`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Environment variable naming the default models directory (used when a config gives none).
MODELS_DIR_ENV = "USE_MODELS_DIR"
DOWNLOAD_COMMAND = "python -m pipeline models download"
#: Job-config sections whose ``model`` is a transformers checkpoint.
MODEL_STAGES = ("captioner", "grounder", "segmenter")
#: The stages' default weights (the ``model`` defaults of ``pipeline.stages.config``; a test keeps
#: the two equal). A table here, so this module never imports the stages that import it.
DEFAULT_MODELS: dict[str, str] = {
    "captioner": "llava-hf/llava-1.5-7b-hf",
    "grounder": "IDEA-Research/grounding-dino-base",
    "segmenter": "facebook/sam-vit-huge",
}
#: Dtype names a config may give; "auto" is bfloat16 on GPU and float32 on CPU.
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: Files never needed to load with transformers + PyTorch (other frameworks' weights).
_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "tf_model*", "flax_model*", "rust_model*", "*.gguf"]


class ModelNotFoundError(FileNotFoundError):
    """A configured model is neither a local directory nor already downloaded."""


def models_dir_default(models_dir: str | os.PathLike | None = None) -> Path | None:
    value = models_dir if models_dir is not None else os.environ.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else None


def resolve(spec: str, models_dir: str | os.PathLike | None = None) -> str:
    """Return a local directory holding the model ``spec``, or raise :class:`ModelNotFoundError`."""
    if not spec:
        raise ModelNotFoundError("no model configured (empty model spec)")
    tried: list[str] = []
    path = Path(spec).expanduser()
    if _is_model_dir(path):
        return str(path)
    tried.append(str(path.resolve()))
    base = models_dir_default(models_dir)
    if base is not None and not path.is_absolute():
        candidate = base / spec
        if _is_model_dir(candidate):
            return str(candidate)
        tried.append(str(candidate))
    if _looks_like_hub_id(spec):
        cached = _from_hf_cache(spec)
        if cached is not None:
            return cached
        tried.append(f"Hugging Face cache ({spec})")
    raise ModelNotFoundError(
        f"model {spec!r} not found (looked in: {'; '.join(tried)}). Jobs never download weights: run "
        f"`{DOWNLOAD_COMMAND} --config CFG --cache DIR` on a machine with internet, then set "
        f"<stage>.models_dir=DIR or ${MODELS_DIR_ENV}=DIR, or point the config at a local directory.")


def download(config_models: Mapping[str, str] | Any = None, cache_dir: str | os.PathLike | None = None
             ) -> dict[str, str]:
    """Fetch the hub weights of the model stages; returns ``{stage: local directory}``.

    ``config_models`` is ``{stage: spec}``, a job config (its enabled model stages' ``model``), or
    None (every model stage's default). With ``cache_dir`` each id lands in ``cache_dir/<id>`` and
    :func:`resolve` with ``models_dir=cache_dir`` finds it; without, it goes to the Hugging Face cache,
    which :func:`resolve` also reads. Local directories are left alone.
    """
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to download model weights")
    out: dict[str, str] = {}
    for name, spec in model_specs(config_models).items():
        if _is_model_dir(Path(spec).expanduser()):
            out[name] = spec
            continue
        if not _looks_like_hub_id(spec):
            raise ModelNotFoundError(f"{name}: {spec!r} is neither a local model directory nor a hub id")
        local_dir = Path(cache_dir).expanduser() / spec if cache_dir is not None else None
        log.info("downloading %s weights %s", name, spec)
        out[name] = snapshot_download(repo_id=spec, local_dir=local_dir, ignore_patterns=_IGNORE)
    return out


def model_specs(config_models: Mapping[str, str] | Any = None) -> dict[str, str]:
    """``{stage: model spec}`` from a mapping, a job config with stage sections, or None (defaults)."""
    if isinstance(config_models, Mapping):
        return {str(k): str(v) for k, v in config_models.items()}
    if config_models is None:
        return dict(DEFAULT_MODELS)
    specs = {}
    for name in MODEL_STAGES:
        section = getattr(config_models, name, None)
        if section is not None and getattr(section, "enabled", True) and getattr(section, "model", None):
            specs[name] = section.model
    return specs


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or the first visible GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor), else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 on GPU for ``"auto"`` (the checkpoints' training precision, no fp16 overflow), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_pretrained(spec: str, processor_cls: Any, model_cls: Any, *, models_dir: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, dtype: str | torch.dtype = "auto"
                    ) -> tuple[Any, Any, torch.device, torch.dtype]:
    """Resolve ``spec`` on disk and load ``(processor, model, device, dtype)``, the model in eval mode.

    A missing model raises :class:`ModelNotFoundError` (naming the download command); any other load
    failure raises ``RuntimeError`` naming the model and the directory.
    """
    path = resolve(spec, models_dir)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    try:
        processor = processor_cls.from_pretrained(path)
        model = model_cls.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise RuntimeError(f"could not load model {spec!r} from {path}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    return processor, model, device, dtype


def load_sam(spec: str, *, models_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype = "auto") -> tuple[Any, Any, torch.device, torch.dtype]:
    """``(SamProcessor, SamModel, device, dtype)`` with the prompt encoder in float32 whatever ``dtype``
    (:class:`pipeline.sam.SamModelFp32Prompts`: box corners are not rounded to bfloat16)."""
    from transformers import SamProcessor

    from pipeline.sam import SamModelFp32Prompts  # here: loading pipeline.models stays light

    return load_pretrained(spec, SamProcessor, SamModelFp32Prompts, models_dir=models_dir, device=device, dtype=dtype)


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) in (1, 2) and all(parts) and not spec.startswith((".", "~"))
            and not any(p in (".", "..") for p in parts))


def _from_hf_cache(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id=repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return path if _is_model_dir(Path(path)) else None
