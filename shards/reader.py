"""Safe shard reader: an iterable of typed samples over webdataset, ready for DDP.

webdataset's default decoders unpickle ``.pyd``/``.pickle`` members, so this module decodes by
hand with an allow-list (images kept as bytes or opened with PIL, ``.json``, ``.txt``, ``.npy``
with ``allow_pickle=False``); any other member extension is an error. Splitting by node and by
worker, shard shuffling and resampling are webdataset's own (as in open_clip's ``data.py``).

Shards are untrusted input, so the pipeline is webdataset's stages except the tar expander:
webdataset opens tars with ``tarfile`` mode ``r|*`` (transparent gzip/bz2/xz: a 3 MB gzip bomb
becomes gigabytes), while :func:`tar_members` opens them ``r|`` (plain tar only, streamed) and
does not read a member over ``SampleLimits.max_member_bytes``. :func:`decode_sample` applies the
schema's limits (pixels the JSON claims, segments, RLE string length) and checks the claimed size
against the image header before anything is decoded. Samples are decoded in windows of
:data:`DECODE_WINDOW`: their JSONs parsed by pydantic-core (:mod:`shards.sample_json`, same result
and messages as ``SampleMeta.from_dict``) with one batched RLE check, then yielded in order. With
``on_error="skip"`` every refused sample is a warning that carries the running count of skipped
samples of this process.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image

from . import storage
from .image import SHARD_POLICY, ImageDecodeError, ReadPolicy, decode_image
from .image import probe as probe_image
from .sample_json import parse_sample_jsons
from .schema import (
    ALLOWED_EXTENSIONS,
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    SampleLimits,
    SampleMeta,
    SchemaError,
)
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
    """A directory, a single tar, a brace pattern or a list of them, as a sorted list of shard paths.

    An ``s3://`` / ``gs://`` directory lists its committed shards (those whose stats object exists)."""
    if storage.is_remote(source) and not source.endswith(".tar") and "{" not in source:
        urls = list_shards(source)
        if not urls:
            raise FileNotFoundError(f"no committed shards (*.tar with *.stats.json) under {source}")
        return urls
    if isinstance(source, str | Path):
        p = Path(source)
        if p.is_dir():
            urls = [str(s) for s in list_shards(p)]
            if not urls:
                raise FileNotFoundError(f"no shards (*-NNNNNN.tar) in {p}")
            return urls
        return list(wds.shardlists.expand_urls(str(source)))
    return [u for s in source for u in shard_urls(s)]


#: Samples decoded together by the reader: their JSONs' RLE coverage is one batched check
#: (:func:`shards.sample_json.parse_sample_jsons`); samples are still yielded one by one, in order.
DECODE_WINDOW = 16


def decode_sample(raw: dict[str, Any], limits: SampleLimits = DEFAULT_LIMITS) -> ShardSample:
    """Decode one raw webdataset sample (bytes per extension) with the allow-list and the limits."""
    out = decode_window([raw], limits)[0]
    if isinstance(out, Exception):
        raise out
    return out


def decode_window(raws: Sequence[dict[str, Any]], limits: SampleLimits = DEFAULT_LIMITS,
                  ) -> list[ShardSample | Exception]:
    """:func:`decode_sample` of each raw sample, in order, a refused one as its exception; the JSONs
    are parsed together (one RLE coverage check for all their segments)."""
    prepared: list[tuple[str, str, dict[str, Any]] | Exception] = []
    for raw in raws:
        try:
            prepared.append(_members(raw, limits))
        except Exception as e:  # a refused sample is reported in order by the caller
            prepared.append(e)
    ok = [p for p in prepared if not isinstance(p, Exception)]
    metas = iter(parse_sample_jsons([p[2]["json"] for p in ok], limits))
    out: list[ShardSample | Exception] = []
    for p in prepared:
        if isinstance(p, Exception):
            out.append(p)
            continue
        try:
            out.append(_finish(*p, next(metas), limits))
        except Exception as e:
            out.append(e)
    return out


def decode_samples(src: Iterator[dict[str, Any]], limits: SampleLimits = DEFAULT_LIMITS,
                   handler: Any = wds.reraise_exception, window: int = DECODE_WINDOW) -> Iterator[ShardSample]:
    """The reader's decode stage: :func:`decode_window` over consecutive windows of ``window`` raw
    samples, yielded in order; each refused sample goes to ``handler`` as ``wds.map`` would hand it
    (go on if it returns true, stop otherwise). An error of the source is raised after the samples
    read before it are yielded."""
    src = iter(src)
    done = False
    while not done:
        chunk: list[dict[str, Any]] = []
        error: Exception | None = None
        try:
            while len(chunk) < window:
                chunk.append(next(src))
        except StopIteration:
            done = True
        except Exception as e:  # raised by the source (its handler re-raised): after what came before it
            error, done = e, True
        for out in decode_window(chunk, limits):
            if not isinstance(out, Exception):
                yield out
            elif not handler(out):
                return
        if error is not None:
            raise error


def _members(raw: dict[str, Any], limits: SampleLimits) -> tuple[str, str, dict[str, Any]]:
    """(key, url, members by extension) once the allow-list and the ``.json`` member's size pass."""
    key = raw["__key__"]
    url = raw.get("__url__", "")
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    for ext in members:
        if ext.lower() not in ALLOWED_EXTENSIONS:
            raise UnsafeMemberError(f"{url}: sample {key!r} has member .{ext}, which is not an allowed type")
    if "json" not in members:
        raise SchemaError(f"{url}: sample {key!r} has no .json member")
    if len(members["json"]) > limits.max_json_bytes:
        raise SchemaError(f"{url}: sample {key!r}: .json is {len(members['json'])} bytes, more than the limit of "
                          f"{limits.max_json_bytes}")
    return key, url, members


def _finish(key: str, url: str, members: dict[str, Any], meta: SampleMeta | Exception,
            limits: SampleLimits) -> ShardSample:
    """The sample from its checked members and parsed JSON: keys agree, one image whose header
    size is the JSON's, safe extras."""
    if isinstance(meta, json.JSONDecodeError | UnicodeDecodeError | RecursionError):
        raise SchemaError(f"{url}: sample {key!r}: .json is not valid JSON ({meta})") from meta
    if isinstance(meta, Exception):
        raise SchemaError(f"{url}: sample {key!r}: {meta}") from meta
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
    image_bytes = members[images[0]]
    try:  # the JSON's size against the image header (no pixel decoded): RLEs are sized from the JSON
        header = probe_image(image_bytes, _policy(limits.max_pixels))
    except ImageDecodeError as e:
        raise SchemaError(f"{url}: sample {key!r}: image: {e}") from e
    if (header.width, header.height) != (meta.width, meta.height):
        raise SchemaError(f"{url}: sample {key!r}: image is {header.width}x{header.height} but the JSON says "
                          f"{meta.width}x{meta.height}")
    return ShardSample(key=key, meta=meta, image_bytes=image_bytes, url=url, extras=extras)


@functools.lru_cache(maxsize=8)
def _policy(max_pixels: int) -> ReadPolicy:
    """The shard policy with the limits' pixel cap (one copy per cap, not one per sample)."""
    return SHARD_POLICY.model_copy(update={"max_pixels": max_pixels})


def _handler(on_error: OnError):
    if on_error == "raise":
        return wds.reraise_exception

    skipped = 0

    def skip(exn: Exception) -> bool:
        nonlocal skipped
        skipped += 1
        log.warning("skipping bad sample or shard (%d skipped so far in this process): %s", skipped, exn)
        return True

    return skip


def open_shards(source: str | Path | Sequence[str | Path], *, on_error: OnError = "raise", shuffle: int = 0,
                resampled: bool = False, split_by_node: bool = False, split_by_worker: bool = True,
                seed: int = 0, limits: SampleLimits = DEFAULT_LIMITS) -> ShardPipeline:
    """An iterable of :class:`ShardSample` over shards.

    Args:
        source: a shard directory, tar path, brace pattern, or a list of them.
        on_error: ``"raise"`` stops at the first bad shard or sample; ``"skip"`` logs and goes on.
        shuffle: sample shuffle buffer (0 = file order); shard order is shuffled when > 0.
        resampled: draw shards with replacement forever (use ``.with_epoch(n)``), as open_clip does.
        split_by_node: give each torch.distributed rank a disjoint subset of shards.
        split_by_worker: give each DataLoader worker a disjoint subset of shards.
        limits: caps on member bytes, JSON size, pixels, segments and RLE length (see ``SampleLimits``).
    """
    urls = shard_urls(source)
    handler = _handler(on_error)
    stages: list[Any] = [wds.ResampledShards(urls, seed=seed) if resampled else wds.SimpleShardList(urls)]
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    if shuffle > 0 and not resampled:
        stages.append(wds.shuffle(100, seed=seed))
    stages += [functools.partial(tar_members, handler=handler, max_member_bytes=limits.max_member_bytes),
               functools.partial(wds.tariterators.group_by_keys, handler=handler),
               functools.partial(decode_samples, limits=limits, handler=handler)]
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle))
    return ShardPipeline(*stages)


class ShardPipeline(wds.DataPipeline, wds.compat.FluidInterface):
    """A webdataset pipeline with the fluid methods (``.map``, ``.shuffle``, ``.with_epoch``)."""


def tar_members(urls: Iterator[dict[str, Any]], handler: Any = wds.reraise_exception,
                max_member_bytes: int = DEFAULT_LIMITS.max_member_bytes) -> Iterator[dict[str, Any]]:
    """``{fname, data, __url__}`` per regular member of each plain (uncompressed) tar, in order.

    Replaces webdataset's ``url_opener`` + ``tar_file_expander``, whose ``r|*`` mode decompresses
    transparently; written here because webdataset has no option for a plain-tar-only open. A
    local file is opened ``r:`` (plain tar, random access: a member's bytes are one ``read`` of
    the file, three times faster than ``tarfile``'s stream buffer), anything else ``r|`` (plain
    tar, streamed). A member over ``max_member_bytes`` is skipped unread (the file or stream seeks
    past it) and reported through ``handler``; the empty dict after each shard keeps samples of
    two shards apart, as in webdataset.
    """
    for item in urls:
        url = item["url"]
        try:
            # object storage through fsspec (webdataset would pipe gs:// through gsutil and has no s3://)
            opened = storage.open_read(url) if storage.is_remote(url) else wds.gopen(url)
            with opened as stream, tarfile.open(fileobj=stream, mode=_plain_tar_mode(stream)) as tf:
                seekable = _plain_tar_mode(stream) == "r:"
                for m in tf:
                    if not m.isreg():
                        continue
                    if m.size > max_member_bytes:
                        if not handler(SchemaError(f"{url}: member {m.name!r} is {m.size} bytes, more than the "
                                                   f"limit of {max_member_bytes}; not read")):
                            return
                        continue
                    data = _member_bytes(tf, stream, m) if seekable else tf.extractfile(m).read()
                    yield {"fname": m.name, "data": data, "__url__": url}
                    tf.members = []  # a tar keeps every TarInfo read otherwise
        except (tarfile.TarError, OSError, EOFError) as e:
            if not handler(SchemaError(f"{url}: not a readable plain tar (compressed shards are refused): {e}")):
                return
        yield {}


def _member_bytes(tf: tarfile.TarFile, stream: Any, m: tarfile.TarInfo) -> bytes:
    """A regular member's bytes straight from the file (``extractfile`` wraps one ``read`` in two
    file objects per member); sparse members go through ``extractfile``."""
    if m.issparse():
        return tf.extractfile(m).read()
    stream.seek(m.offset_data)
    data = stream.read(m.size)
    if len(data) != m.size:
        raise tarfile.ReadError(f"unexpected end of data in member {m.name!r}")
    return data


def _plain_tar_mode(stream: Any) -> str:
    """``r:`` for a seekable local file, ``r|`` for any other stream; both refuse compressed tars."""
    return "r:" if isinstance(stream, io.BufferedReader) and stream.seekable() else "r|"


def iter_samples(source: str | Path | Sequence[str | Path], on_error: OnError = "raise") -> Iterator[ShardSample]:
    """All samples in file order, one process (tools, tests, notebooks)."""
    yield from open_shards(source, on_error=on_error, split_by_worker=False)
