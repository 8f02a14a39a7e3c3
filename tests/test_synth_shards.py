"""The trainer's synthetic shards are made by the curation job's own path (source -> read -> mask NMS ->
writer), so what the pipeline drops or merges is dropped or merged in them too."""

from __future__ import annotations

import copy
import json

from conftest import SYNTH_TRAIN_IDS
from synth_shards import write_synth_shards

import shards
from pipeline import synth
from shards.reader import iter_samples


def test_the_fixture_keeps_its_shape(synth_shards):
    samples = [s for url in shards.list_shards(synth_shards) for s in iter_samples(url)]
    assert len(shards.list_shards(synth_shards)) == 5 and len(samples) == 40
    assert [s.meta.image_id for s in samples] == [str(i) for i in SYNTH_TRAIN_IDS]
    assert all(s.meta.segments and s.meta.captions and s.meta.schema_version == shards.SCHEMA_VERSION
               for s in samples)


def test_duplicates_are_merged_and_crowd_regions_skipped_as_the_job_does(tmp_path):
    data = synth.generate(tmp_path / "synth", 4, seed=3)
    inst = json.loads((data / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    first = inst["annotations"][0]
    other = next(c for c in names if c != first["category_id"])
    duplicate = {**copy.deepcopy(first), "id": 10_000, "category_id": other}  # the same mask, another name
    crowd = {**copy.deepcopy(first), "id": 10_001, "iscrowd": 1}
    inst["annotations"] += [duplicate, crowd]
    (data / "instances.json").write_text(json.dumps(inst))

    out = write_synth_shards(data, tmp_path / "shards", max_samples=2)
    samples = {s.meta.image_id: s.meta for url in shards.list_shards(out) for s in iter_samples(url)}
    assert len(samples) == 4 and len(shards.list_shards(out)) == 2
    meta = samples[str(first["image_id"])]
    n_anns = sum(a["image_id"] == first["image_id"] for a in inst["annotations"])
    assert len(meta.segments) == n_anns - 2  # the duplicate merged by NMS, the crowd region skipped
    merged = next(s for s in meta.segments if len(s.texts) > 1)
    assert {t.text for t in merged.texts} == {names[first["category_id"]], names[other]}
    assert [s.id for s in meta.segments] == list(range(len(meta.segments)))
