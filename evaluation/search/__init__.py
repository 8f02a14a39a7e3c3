"""Segment search: every segment of a shard set indexed by its USE embedding, queried by text or by segment.

``python -m evaluation index`` builds an index (:mod:`.build`, layout in :mod:`.store`),
``python -m evaluation query`` searches it (:mod:`.query`) and writes hits and a contact sheet
(:mod:`.sheet`) or the browser's query data (:mod:`.export`).
"""
