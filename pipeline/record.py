"""The row that flows between pipeline stages (the contract between sources, model stages and writer).

Ray Data batches are ``dict[str, np.ndarray]`` (``batch_format="numpy"``) with three columns:

- ``key``: the sample key (``shards.make_key``), str.
- ``image``: the original image bytes (written to the shard unchanged), bytes.
- ``record``: a JSON string of :class:`Record`: everything known about the image so far.

Pixels are decoded once per stage actor batch from ``image`` only by stages that need them (see
``shards.image.decode_image``); masks are COCO RLE from the segmenter on. A stage never raises for
one bad image: it sets ``record.failure`` and later stages pass that record through untouched, so
that the writer records it as a failure with its stage and reason.

Captions, segments and their texts are the shard schema's own types (:mod:`shards.schema`
``Caption``, ``Segment``, ``Text``), so a record is a sample in the making: :meth:`Record.to_sample_meta`
turns it into the ``SampleMeta`` the writer stores, checked by the same ``SampleMeta.from_dict`` the
reader and validator use, under the current ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from shards.schema import SCHEMA_VERSION, Caption, SampleMeta, Segment, Text


@dataclass
class Phrase:
    """A referring expression and where it came from (``llava:<prompt>``, ``caption:coco``, ``vg``...)."""

    text: str
    source: str
    caption: str = ""


@dataclass
class Box:
    """A box prompt for SAM in absolute pixels of the EXIF-oriented image, ``[x0, y0, x1, y1]``."""

    xyxy: list[float]
    text: str
    source: str
    score: float = 1.0


@dataclass
class Failure:
    stage: str
    error: str
    #: The cause is the environment (file missing, permission), not the input: a rerun retries it.
    retry: bool = False


@dataclass
class Record:
    source: str
    image_id: str
    width: int = 0
    height: int = 0
    image_ext: str = "jpg"
    file_name: str = ""
    captions: list[Caption] = field(default_factory=list)
    phrases: list[Phrase] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    failure: Failure | None = None
    #: MLLM answers that reached their token budget without an end-of-sequence token (kept, but cut).
    captions_cut: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> Record:
        d = json.loads(s)
        d["captions"] = [Caption(**c) for c in d.get("captions", [])]
        d["phrases"] = [Phrase(**p) for p in d.get("phrases", [])]
        d["boxes"] = [Box(**b) for b in d.get("boxes", [])]
        d["segments"] = [Segment(**{**g, "texts": [Text(**t) for t in g["texts"]]}) for g in d.get("segments", [])]
        d["failure"] = Failure(**d["failure"]) if d.get("failure") else None
        return cls(**d)

    def to_sample_meta(self, key: str) -> SampleMeta:
        """The shard sample of this record under ``key``, at :data:`shards.schema.SCHEMA_VERSION`.

        Goes through ``SampleMeta.from_dict``, the reader's and validator's check, so a sample the
        validator would refuse raises :class:`shards.SchemaError` (naming the field) here instead of
        being written.
        """
        return SampleMeta.from_dict({
            "schema_version": SCHEMA_VERSION, "key": key, "image_id": self.image_id, "source": self.source,
            "width": self.width, "height": self.height, "image_ext": self.image_ext, "file_name": self.file_name,
            "captions": [asdict(c) for c in self.captions], "segments": [asdict(g) for g in self.segments]})

    def fail(self, stage: str, error: str | BaseException, retry: bool = False) -> None:
        """Mark the record failed at ``stage`` (the first failure wins); ``retry``: see :class:`Failure`."""
        if self.failure is None:
            msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            self.failure = Failure(stage=stage, error=msg, retry=retry)


def records_of(batch: dict[str, np.ndarray]) -> list[Record]:
    return [Record.from_json(str(s)) for s in batch["record"]]


def with_records(batch: dict[str, np.ndarray], records: list[Record]) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["record"] = np.array([r.to_json() for r in records], dtype=object)
    return out
