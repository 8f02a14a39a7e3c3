"""The shard format round-trips: writer -> stock webdataset/pycocotools, safe reader, manifest, resume."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from pycocotools import mask as mask_utils
from shards_util import make_sample, sample_members, write_dataset, write_tar

import shards
from shards import rle
from shards.reader import UnsafeMemberError
from shards.writer import next_index


def test_stock_webdataset_reads_every_field(tmp_path):
    """What our writer writes, the stock webdataset reader reads back byte for byte."""
    expected = {}
    with shards.ShardWriter(tmp_path, max_samples=2) as writer:
        for i in range(5):
            meta, image, masks = make_sample(i, fmt="jpg" if i % 2 else "png")
            writer.write(meta, image)
            expected[meta.key] = (meta, image, masks)
    urls = [str(p) for p in shards.list_shards(tmp_path)]
    assert [p.rsplit("/", 1)[1] for p in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta, image, masks = expected[sample["__key__"]]
        seen.append(sample["__key__"])
        assert sample[meta.image_ext] == image
        d = json.loads(sample["json"])
        assert d == meta.to_dict()
        assert shards.SampleMeta.from_dict(d) == meta
        decoded = np.stack([mask_utils.decode({"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()})
                            for s in d["segments"]])
        np.testing.assert_array_equal(decoded.astype(bool), masks)
    assert seen == list(expected)


def test_rle_area_and_bbox_beyond_255_masks():
    """pycocotools' area/toBbox overflow above 255 RLEs per call; ours are exact for 300."""
    rng = np.random.default_rng(0)
    masks = rng.random((300, 17, 23)) < rng.uniform(0.05, 0.95, (300, 1, 1))
    masks[0] = False
    rles = rle.encode(masks)
    np.testing.assert_array_equal(rle.area(rles), masks.sum(axis=(1, 2)))
    boxes = rle.bbox(rles)
    for m, box in zip(masks[1:], boxes[1:], strict=True):
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
    np.testing.assert_array_equal(boxes[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(rle.decode(rles), masks)


def test_reader_skips_or_raises_on_a_bad_sample(tmp_path):
    good = [make_sample(i) for i in range(3)]
    broken = good[1][0].to_dict()
    del broken["width"]
    members = sample_members(*good[0][:2]) + sample_members(broken, good[1][1]) + sample_members(*good[2][:2])
    write_tar(tmp_path / "shard-000000.tar", members)
    with pytest.raises(shards.SchemaError, match="test_1.*missing field 'width'"):
        list(shards.iter_samples(tmp_path, on_error="raise"))
    assert [s.key for s in shards.iter_samples(tmp_path, on_error="skip")] == ["test_0", "test_2"]


def test_reader_rejects_a_pickle_member_without_unpickling_it(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (marker.touch, ())

    meta, image, _ = make_sample(0)
    write_tar(tmp_path / "shard-000000.tar", [*sample_members(meta, image), ("test_0.pickle", pickle.dumps(Trap()))])
    with pytest.raises(UnsafeMemberError, match=r"test_0.*\.pickle"):
        list(shards.iter_samples(tmp_path))
    assert not marker.exists()


def _worker_and_key(sample: shards.ShardSample) -> tuple[int, str]:
    return torch.utils.data.get_worker_info().id, sample.key


def test_split_by_worker_gives_disjoint_keys(tmp_path):
    """Two DataLoader workers read disjoint shards, and together every sample exactly once."""
    keys = write_dataset(tmp_path, 8, max_samples=2)
    ds = shards.open_shards(tmp_path, split_by_worker=True).map(_worker_and_key)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    by_worker: dict[int, list[str]] = {0: [], 1: []}
    for worker, key in loader:
        by_worker[int(worker)].append(key)
    assert by_worker[0] and by_worker[1]
    assert not set(by_worker[0]) & set(by_worker[1])
    assert sorted(by_worker[0] + by_worker[1]) == sorted(keys)


def test_manifest_and_failures_parquet(tmp_path):
    with shards.ShardWriter(tmp_path, prefix="x", max_samples=2) as writer:
        for i in range(3):
            meta, image, _ = make_sample(i, n_segments=i + 1)
            writer.write(meta, image)
        writer.add_failure("test_99", "decode", "truncated JPEG")
    shards.build_manifest(tmp_path)
    rows = shards.read_manifest(tmp_path).to_pylist()
    assert rows == [
        {"shard": "x-000000.tar", "key": "test_0", "image_id": "0", "source": "test", "width": 40, "height": 30,
         "segments": 1, "texts": 2},
        {"shard": "x-000000.tar", "key": "test_1", "image_id": "1", "source": "test", "width": 40, "height": 30,
         "segments": 2, "texts": 4},
        {"shard": "x-000001.tar", "key": "test_2", "image_id": "2", "source": "test", "width": 40, "height": 30,
         "segments": 3, "texts": 6},
    ]
    assert shards.read_failures(tmp_path).to_pylist() == [
        {"shard": "x-000001.tar", "key": "test_99", "stage": "decode", "error": "truncated JPEG"}]


def test_resume_continues_numbering_and_knows_done_keys(tmp_path):
    with shards.ShardWriter(tmp_path, max_samples=2) as writer:
        for i in range(3):
            writer.write(*make_sample(i)[:2])
        writer.add_failure("test_3", "segment", "no masks")
    written, failed = shards.done_keys(tmp_path)
    assert (written, failed) == ({"test_0", "test_1", "test_2"}, {"test_3"})
    assert next_index(tmp_path, "shard") == 2
    with shards.ShardWriter(tmp_path, max_samples=2) as writer:
        assert writer.index == 2
        for i in range(6):
            if f"test_{i}" not in written | failed:
                writer.write(*make_sample(i)[:2])
    assert [p.name for p in shards.list_shards(tmp_path)] == ["shard-000000.tar", "shard-000001.tar",
                                                               "shard-000002.tar"]
    assert shards.done_keys(tmp_path) == ({"test_0", "test_1", "test_2", "test_4", "test_5"}, {"test_3"})
    assert [s.key for s in shards.iter_samples(tmp_path)] == ["test_0", "test_1", "test_2", "test_4", "test_5"]


def test_manifest_of_a_shard_without_stats_reads_the_tar(tmp_path):
    """done_keys takes a stats-less tar's keys from the tar; the manifest (and so the job's summary)
    must too, instead of failing after the whole job has run."""
    with shards.ShardWriter(tmp_path, max_samples=2) as writer:
        for i in range(3):
            writer.write(*make_sample(i, n_segments=2)[:2])
    (tmp_path / "shard-000001.stats.json").unlink()
    shards.build_manifest(tmp_path)
    rows = shards.read_manifest(tmp_path).to_pylist()
    assert [(r["shard"], r["key"], r["segments"], r["texts"]) for r in rows] == [
        ("shard-000000.tar", "test_0", 2, 4), ("shard-000000.tar", "test_1", 2, 4),
        ("shard-000001.tar", "test_2", 2, 4)]
    assert {r["key"] for r in rows} == shards.done_keys(tmp_path)[0]


def test_writer_knows_what_it_wrote(tmp_path):
    from shards_util import make_sample

    from shards import ShardWriter

    with ShardWriter(tmp_path) as w:
        meta, image, _ = make_sample(1)
        w.write(meta, image)
        w.add_failure("k2", "read", "bad")
        assert meta.key in w and "k2" in w and "k3" not in w
        with pytest.raises(ValueError, match="written twice"):
            w.write(meta, image)
