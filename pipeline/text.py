"""The one text normalisation of the pipeline, shared by the phrase stage, grounding and mask NMS.

Two texts name the same thing for the pipeline when their :func:`text_key` is equal: lower case,
single spaces, no punctuation at either end, and no leading article ("a man", "The man." and
"the  man" are one text). The phrase stage uses the key to keep one phrase per image, the grounder
builds its prompts from :func:`normalise`, and mask NMS uses the key to merge the texts of
near-duplicate masks, so that a text the phrase stage would have merged is never written twice to
one segment (the trainer would sample it twice). The displayed text keeps its article: "a man in a
red shirt" reads the way CLIP's training captions do.

Written by hand because it is a few lines of ``str`` methods; spaCy's lemmatiser is not wanted here
(it would merge "a man" and "men", which are different referring expressions).
"""

from __future__ import annotations

import re

#: Leading words that never count for identity (the article of a referring expression).
ARTICLES = ("a", "an", "the")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def normalise(text: str, strip_determiners: bool = False) -> str:
    """Lower case, single spaces, no punctuation at the ends; optionally no leading article."""
    text = _EDGE_PUNCT.sub("", " ".join(text.lower().split()))
    if strip_determiners:
        text = strip_article(text)
    return text


def strip_article(text: str) -> str:
    """``text`` without a leading a/an/the (a lone article stays: it is all there is)."""
    words = text.split(" ", 1)
    if len(words) > 1 and words[0] in ARTICLES:
        return words[1]
    return text


def text_key(text: str) -> str:
    """The identity of a text: :func:`normalise` without the leading article ("" for an empty text)."""
    return strip_article(normalise(text))
