"""Shards to training batches: split by node and worker, shuffled, deterministic, resumable mid-epoch.

The layout follows open_clip's ``get_wds_dataset``: every rank reads a disjoint subset of shards
(``split_by_node``), every DataLoader worker a disjoint subset of its rank's (``split_by_worker``),
each worker batches its own samples (the DataLoader only forwards whole batches), and each worker
yields a fixed number of batches per epoch so that every rank makes exactly the same number of
steps (a rank that ran dry would hang DDP). open_clip gets that with ``with_epoch``; here a worker
whose shards run out starts another pass over them (a few repeated samples, as open_clip's
"roll over and repeat a few samples" comment says), and the quota stops it.

Choices that differ from a plain ``open_shards(..., shuffle=N)``, and why:

- Reproducibility. webdataset's sample shuffle and resampled shard draws seed themselves from the
  pid and the clock, so neither a resumed run nor a rerun would see the same batches. Here the shard
  list is shuffled before node splitting with ``seed + epoch`` (the same order on every rank, as
  open_clip's ``detshuffle2``), the sample buffer is shuffled by a RNG seeded from (seed, epoch,
  pass, rank, worker), resampled shard draws are made deterministic the same way, and the segments
  kept and the text drawn for each segment come from a RNG seeded by (seed, epoch, sample key).
  ``open_shards`` is therefore called with ``shuffle=0``.
- Resume mid-epoch without decoding what was already trained on. A DataLoader over an iterable
  dataset takes batch ``b`` of an epoch from worker ``b % W``. To resume at batch ``p``, each worker
  drops the raw samples of the batches it already produced (before any image decoding or RLE work)
  and the workers that had already produced their batch of the interrupted round yield one empty
  marker first, so the loader's round-robin lines up with the original order. The caveat: a sample
  that fails to decode is dropped, so a bad image before the resume point shifts that worker's
  batches by one sample after resume; the on-error log says so when it happens.

Each batch is a dict: ``keys`` (B), ``pixels`` {backbone: [B, 3, H, W]} or ``features``
{level: [B, 1 + G*G, C]} (feature cache), ``area_weights`` [S, G*G] (rows sum to 1),
``image_index`` Long[S] (which image of the batch each segment belongs to), ``texts`` (S) and, from
a feature cache that holds them, ``text_emb`` [S, E]: the frozen text tower's embeddings of
``texts``, so the step does not run the tower.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import shards
from shards import ShardSample

from .cache import FeatureCacheReader
from .config import DataConfig
from .distributed import rank_world
from .errors import InputError
from .model.segments import segment_inputs

log = logging.getLogger(__name__)

SKIP = "skip"  # key of the marker batch that realigns workers after a mid-epoch resume


def mix_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` of str differs between processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def count_samples(urls: list[str]) -> int:
    """Images in the shards, from their stats files (written by ``shards.ShardWriter``)."""
    total = 0
    for url in urls:
        try:
            total += shards.read_stats(url).samples
        except FileNotFoundError as e:
            raise InputError(f"{url} has no stats file (*.stats.json beside it): write the shards with "
                             f"the pipeline or set data.samples_per_epoch") from e
    return total


def steps_per_epoch(cfg: DataConfig, urls: list[str], world_size: int) -> int:
    """Full global batches in one epoch (the remainder is dropped, as open_clip's ``floor`` does)."""
    samples = cfg.samples_per_epoch or count_samples(urls)
    steps = samples // (cfg.batch_size * world_size)
    if steps < 1:
        raise InputError(f"{samples} samples do not fill one global batch of {cfg.batch_size} x {world_size}")
    return steps


def check_enough_shards(cfg: DataConfig, urls: list[str], world_size: int) -> None:
    """Without resampling every worker of every rank needs a shard of its own (open_clip asserts the same)."""
    needed = world_size * max(1, cfg.workers)
    if not cfg.resampled and len(urls) < needed:
        raise InputError(f"{len(urls)} shards for {world_size} ranks x {max(1, cfg.workers)} workers: each needs "
                         f"its own shard; write more, smaller shards, lower data.workers, or set data.resampled=true")


# -- per-sample work (runs in the DataLoader workers) ---------------------------------------------
@dataclass
class SampleProcessor:
    """Turns a :class:`ShardSample` into tensors; plain data only, so it travels into workers.

    Resize and area weights are :func:`trainer.model.segments.segment_inputs`, the code
    ``USEModel.embed_masks`` runs at evaluation time.
    """

    transform: Callable | None  # ImageTransform; None when reading the feature cache
    grid: int
    max_segments: int
    min_area: int
    cache: FeatureCacheReader | None = None

    def __call__(self, sample: ShardSample, rng: random.Random) -> dict[str, Any] | None:
        segments = [s for s in sample.meta.segments if s.area >= self.min_area and s.texts]
        if len(segments) > self.max_segments:
            segments = [segments[i] for i in sorted(rng.sample(range(len(segments)), self.max_segments))]
        if not segments:
            return None
        image = None if self.cache is not None else sample.image()
        inputs = segment_inputs(image, [s.rle for s in segments], transform=self.transform, grid=self.grid)
        keep = inputs.valid  # masks that decode empty carry no area
        texts = [rng.choice(s.texts).text for s, k in zip(segments, keep.tolist(), strict=True) if k]
        if not texts:
            return None
        out: dict[str, Any] = {"key": sample.key, "area_weights": inputs.weights[keep], "texts": texts}
        if self.cache is not None:
            out["features"] = self.cache.get(sample.url, sample.key)
            text_emb = self.cache.text_embeddings(sample.url, sample.key, texts)
            if text_emb is not None:
                out["text_emb"] = text_emb
        else:
            out["pixels"] = inputs.pixels
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked, segments concatenated with the index of their image."""
    batch: dict[str, Any] = {
        "keys": [it["key"] for it in items],
        "area_weights": torch.cat([it["area_weights"] for it in items]),
        "image_index": torch.cat([torch.full((len(it["texts"]),), i, dtype=torch.long) for i, it in enumerate(items)]),
        "texts": [t for it in items for t in it["texts"]],
    }
    if all("text_emb" in it for it in items):
        batch["text_emb"] = torch.cat([it["text_emb"] for it in items])
    for field in ("pixels", "features"):
        if field in items[0]:
            batch[field] = {name: torch.stack([it[field][name] for it in items]) for name in items[0][field]}
    return batch


def buffer_shuffle(samples: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """The usual streaming shuffle (a buffer of ``bufsize``), driven by a seeded RNG."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


class SegmentBatches(IterableDataset):
    """One epoch of batches for this rank, starting at batch ``start`` of the epoch."""

    def __init__(self, urls: list[str], cfg: DataConfig, processor: SampleProcessor, *, seed: int, epoch: int,
                 batches: int, start: int = 0):
        super().__init__()
        self.urls, self.cfg, self.processor = list(urls), cfg, processor
        self.seed, self.epoch, self.batches, self.start = seed, epoch, batches, start

    def _raw(self, rank: int, worker: int) -> Iterator[ShardSample]:
        """This worker's samples with at least one segment, shuffled, pass after pass."""
        for pass_ in itertools.count():
            urls = list(self.urls)
            if self.cfg.shard_shuffle and not self.cfg.resampled:
                # (seed, epoch) only: every pass of an epoch gives each rank the same shards, so ranks stay disjoint
                random.Random(mix_seed(self.seed, self.epoch, "shards")).shuffle(urls)
            ds = shards.open_shards(urls, on_error="skip", shuffle=0, resampled=self.cfg.resampled,
                                    split_by_node=True, split_by_worker=True, seed=self.seed)
            if self.cfg.resampled:  # make the draws reproducible (webdataset seeds them from pid/time)
                for stage in ds.pipeline:
                    if isinstance(stage, wds.shardlists.ResampledShards):
                        stage.deterministic, stage.seed = True, mix_seed(self.seed, self.epoch, "resampled")
            rng = random.Random(mix_seed(self.seed, self.epoch, pass_, rank, worker, "samples"))
            n = 0
            for s in buffer_shuffle((s for s in ds if s.meta.segments), self.cfg.shuffle_buffer, rng):
                n += 1
                yield s
            if n == 0:
                raise RuntimeError(f"rank {rank} worker {worker}: no samples with segments in its shards")
            log.debug("rank %d worker %d: pass %d of epoch %d done (%d samples)", rank, worker, pass_, self.epoch, n)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, _ = rank_world()
        quota = len(range(worker, self.batches, workers))  # batches b of the epoch with b % workers == worker
        rounds, offset = divmod(self.start, workers)
        done = rounds + (1 if worker < offset else 0)
        if worker < offset:
            yield {SKIP: True}
        if done >= quota:
            return
        bs = self.cfg.batch_size
        raw = itertools.islice(self._raw(rank, worker), done * bs, None)  # drop what was trained on, undecoded
        for _ in range(quota - done):
            items = []
            while len(items) < bs:
                sample = next(raw)
                rng = random.Random(mix_seed(self.seed, self.epoch, sample.key, "segments"))
                try:
                    item = self.processor(sample, rng)
                except Exception as e:  # a corrupt image must not stop the job; the log names it
                    log.warning("rank %d worker %d: dropped sample %s (%s: %s); resume alignment may shift by one",
                                rank, worker, sample.key, type(e).__name__, e)
                    continue
                if item is not None:
                    items.append(item)
            yield collate(items)


def make_loader(urls: list[str], cfg: DataConfig, processor: SampleProcessor, *, seed: int, epoch: int,
                batches: int, start: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding this rank's batches ``start..batches-1`` of ``epoch`` (and skip markers)."""
    ds = SegmentBatches(urls, cfg, processor, seed=seed, epoch=epoch, batches=batches, start=start)
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None)
