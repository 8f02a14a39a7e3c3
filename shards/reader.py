"""Safe shard reader: an iterable of typed samples over webdataset, ready for DDP.

webdataset's default decoders unpickle ``.pyd``/``.pickle`` members, so this module decodes by
hand with an allow-list (images kept as bytes or opened with PIL, ``.json``, ``.txt``, ``.npy``
with ``allow_pickle=False``); any other member extension is an error. Splitting by node and by
worker, shard shuffling and resampling are webdataset's own (as in open_clip's ``data.py``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image

from .image import SHARD_POLICY, ReadPolicy, decode_image
from .schema import ALLOWED_EXTENSIONS, IMAGE_EXTENSIONS, SampleMeta, SchemaError
from .writer import list_shards

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class UnsafeMemberError(ValueError):
    """A shard member whose extension is not on the allow-list (e.g. a pickle)."""


@dataclass
class ShardSample:
    """One decoded sample: typed metadata, original image bytes and any extra safe members."""

    key: str
    meta: SampleMeta
    image_bytes: bytes
    url: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def image(self, policy: ReadPolicy | None = None) -> Image.Image:
        """The image as the pipeline's stages saw it: the one decoder (:mod:`shards.image`), EXIF
        orientation applied, transparency on the policy's background, 16-bit scaled by bit depth."""
        return load_image(self.image_bytes, policy)


def load_image(data: bytes, policy: ReadPolicy | None = None) -> Image.Image:
    """Decode a shard image with :func:`shards.image.decode_image` (``SHARD_POLICY`` by default)."""
    return decode_image(data, policy or SHARD_POLICY)


def shard_urls(source: str | Path | Sequence[str | Path]) -> list[str]:
    """A directory, a single tar, a brace pattern or a list of them, as a sorted list of shard paths."""
    if isinstance(source, str | Path):
        p = Path(source)
        if p.is_dir():
            urls = [str(s) for s in list_shards(p)]
            if not urls:
                raise FileNotFoundError(f"no shards (*-NNNNNN.tar) in {p}")
            return urls
        return list(wds.shardlists.expand_urls(str(source)))
    return [u for s in source for u in shard_urls(s)]


def decode_sample(raw: dict[str, Any]) -> ShardSample:
    """Decode one raw webdataset sample (bytes per extension) with the allow-list."""
    key = raw["__key__"]
    url = raw.get("__url__", "")
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    for ext in members:
        if ext.lower() not in ALLOWED_EXTENSIONS:
            raise UnsafeMemberError(f"{url}: sample {key!r} has member .{ext}, which is not an allowed type")
    if "json" not in members:
        raise SchemaError(f"{url}: sample {key!r} has no .json member")
    try:
        meta = SampleMeta.from_dict(json.loads(members["json"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{url}: sample {key!r}: .json is not valid JSON ({e})") from e
    except SchemaError as e:
        raise SchemaError(f"{url}: sample {key!r}: {e}") from e
    if meta.key != key:  # the member name is untrusted: tools name files after the JSON's checked key
        raise SchemaError(f"{url}: sample {key!r}: member key differs from the JSON's key {meta.key!r}")
    images = [ext for ext in members if ext.lower() in IMAGE_EXTENSIONS]
    if len(images) != 1:
        raise SchemaError(f"{url}: sample {key!r} must have exactly one image member, has {images}")
    extras = {}
    for ext, data in members.items():
        if ext == "json" or ext in images:
            continue
        if ext == "txt":
            extras[ext] = data.decode("utf-8")
        elif ext == "npy":
            extras[ext] = np.load(io.BytesIO(data), allow_pickle=False)
    return ShardSample(key=key, meta=meta, image_bytes=members[images[0]], url=url, extras=extras)


def _handler(on_error: OnError):
    if on_error == "raise":
        return wds.reraise_exception

    def skip(exn: Exception) -> bool:
        log.warning("skipping bad sample: %s", exn)
        return True

    return skip


def open_shards(source: str | Path | Sequence[str | Path], *, on_error: OnError = "raise", shuffle: int = 0,
                resampled: bool = False, split_by_node: bool = False, split_by_worker: bool = True,
                seed: int = 0) -> wds.WebDataset:
    """An iterable of :class:`ShardSample` over shards.

    Args:
        source: a shard directory, tar path, brace pattern, or a list of them.
        on_error: ``"raise"`` stops at the first bad shard or sample; ``"skip"`` logs and goes on.
        shuffle: sample shuffle buffer (0 = file order); shard order is shuffled when > 0.
        resampled: draw shards with replacement forever (use ``.with_epoch(n)``), as open_clip does.
        split_by_node: give each torch.distributed rank a disjoint subset of shards.
        split_by_worker: give each DataLoader worker a disjoint subset of shards.
    """
    urls = shard_urls(source)
    handler = _handler(on_error)
    ds = wds.WebDataset(
        urls, handler=handler, resampled=resampled, shardshuffle=100 if shuffle > 0 and not resampled else False,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker if split_by_worker else None, empty_check=False, seed=seed,
    )
    ds = ds.map(decode_sample, handler=handler)
    if shuffle > 0:
        ds = ds.shuffle(shuffle)
    return ds


def iter_samples(source: str | Path | Sequence[str | Path], on_error: OnError = "raise") -> Iterator[ShardSample]:
    """All samples in file order, one process (tools, tests, notebooks)."""
    yield from open_shards(source, on_error=on_error, split_by_worker=False)
