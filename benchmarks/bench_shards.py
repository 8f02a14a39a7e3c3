"""Shard reading: our reader against raw ``tarfile`` iteration of the same shards (``shard-read``).

Raw: ``tarfile`` opens each shard and reads every member's bytes, nothing decoded (the floor for
any reader of these files). Ours: :func:`shards.iter_samples` (webdataset, the member allow-list,
JSON parsed into a typed :class:`shards.SampleMeta` with the schema's checks, which include every
segment's RLE counts parsed and checked against the image size), i.e. everything a consumer gets
before it materialises pixels. Both read the shard set several times per timed run (page
cache warm), runs alternate, medians. The physical floor is the bytes over the measured memory
bandwidth.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from benchmarks.common import Entry, Section, compare, entry_table, machine, profile_table
from benchmarks.data import sample_shards

PASSES, REPEATS = 5, 7


def read_raw(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile():
                    tar.extractfile(m).read()
                    n += 1
    return n


def read_ours(urls: list[str]) -> int:
    import shards

    return sum(1 for _ in shards.iter_samples(urls))


def run() -> Section:
    import shards

    with tempfile.TemporaryDirectory() as d:
        name, shard_dir, n_samples, n_segments = sample_shards(Path(d))
        urls = shards.shard_urls(shard_dir)
        nbytes = sum(Path(u).stat().st_size for u in urls)
        profile = profile_table(read_ours, urls)
        raw, ours = compare(lambda: [read_raw(urls) for _ in range(PASSES)],
                            lambda: [read_ours(urls) for _ in range(PASSES)], repeat=REPEATS)
    assert ours.result[0] == n_samples, f"reader gave {ours.result[0]} samples, wrote {n_samples}"
    total = PASSES * n_samples
    raw_rate, our_rate = total / raw.median, total / ours.median
    floor = machine().bytes_bound_s(PASSES * nbytes) * 1000
    entry = Entry.rate("shard-read", raw_rate, our_rate, "samples/s", 0.5,
                       f"{name}, {len(urls)} shards, {nbytes / 1e6:.1f} MB; ratio = ours / raw tarfile; "
                       f"{PASSES} passes per run, ours {ours.spread(scale=1000, unit='ms')}, "
                       f"raw {raw.spread(scale=1000, unit='ms')}; memory-bandwidth floor {floor:.1f} ms per run; where our time goes: the profile below the table")
    md = "\n".join([
        "## Shard reading (`benchmarks/bench_shards.py`)", "",
        "Command: `make bench` (or `python -m benchmarks.run --only bench_shards`).", "",
        *entry_table([entry]), "",
        f"Raw: `tarfile` reads every member's bytes ({raw_rate:.0f} samples/s). Ours: `shards.iter_samples` "
        "(webdataset, member allow-list, JSON -> typed `SampleMeta` with the schema's checks, every segment's RLE "
        f"counts parsed and checked against the image size) ({our_rate:.0f} samples/s, {n_segments / n_samples:.1f} segments per sample). "
        "Where our time goes, one pass over the shards:", "", *profile,
    ])
    return Section(md, [entry])
