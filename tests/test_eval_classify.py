"""evaluation.aggregate (vectorised vote == the per-mask loop) and evaluation.classify (templates, synonyms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.aggregate import aggregate, coverage_sets
from evaluation.classify import TEMPLATE_SETS, TextClassifier, resolve_templates


def naive_vote(masks: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The straightforward per-mask loop: add each mask's probabilities to its pixels, argmax."""
    score = np.zeros((probs.shape[1], *masks.shape[1:]), np.float32)
    for m, p in zip(masks, probs, strict=True):
        score[:, m] += p[:, None]
    return score.argmax(axis=0)


@settings(max_examples=60, deadline=None)
@given(s=st.integers(1, 140), k=st.integers(1, 7), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), density=st.floats(0.05, 0.9))
def test_vote_equals_per_mask_loop(s, k, h, w, seed, density):
    rng = np.random.default_rng(seed)
    masks = rng.random((s, h, w)) < density
    masks[0] = True  # every pixel covered: the loop's argmax over zeros would differ on holes
    probs = rng.dirichlet(np.ones(k), size=s).astype(np.float32)
    assert np.array_equal(aggregate(masks, probs), naive_vote(masks, probs))
    sets, index = coverage_sets(masks)  # s > 64 takes the multi-word path
    assert np.array_equal(sets[index].T.reshape(masks.shape), masks)
    assert len({tuple(r) for r in sets}) == len(sets)


def test_uncovered_pixels_nearest_and_image_rules():
    masks = np.zeros((2, 1, 7), bool)
    masks[0, 0, :2] = True   # class 0
    masks[1, 0, 5:] = True   # class 1
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]], np.float32)
    image = np.array([0.1, 0.2, 0.7], np.float32)
    assert aggregate(masks, probs, "nearest", image).tolist() == [[0, 0, 0, 0, 1, 1, 1]]  # ties to the first found
    assert aggregate(masks, probs, "image", image).tolist() == [[0, 0, 2, 2, 2, 1, 1]]
    assert aggregate(masks[:0], probs[:0], "nearest", image).tolist() == [[2] * 7]  # no mask: the image's class
    with pytest.raises(ValueError, match="uncovered"):
        aggregate(masks, probs, "zero")


class FixedText:
    """encode_text from a table: each text's embedding is given."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table
        self.calls: list[int] = []

    def encode_text(self, texts):
        self.calls.append(len(texts))
        return torch.stack([self.table[t] for t in texts])

    def logit_scale_exp(self):
        return torch.tensor(10.0)


def test_templates_synonyms_mean_and_max():
    e = torch.eye(4)
    table = {f"a {n}": v for n, v in [("cat", e[0]), ("kitty", e[1]), ("dog", e[2])]}
    table |= {f"the {n}": v for n, v in [("cat", e[0]), ("kitty", e[1]), ("dog", e[3])]}
    model = FixedText(table)
    clf = TextClassifier(model, [["cat", "kitty"], ["dog"]], ["a {}", "the {}"], "mean", batch_size=4)
    assert model.calls == [4, 2]  # 6 texts in batches of 4
    # dog: mean of its two template embeddings; cat: mean of the synonyms' (each a template mean)
    assert torch.allclose(clf.class_embeddings[1], F.normalize(e[2] + e[3], dim=0))
    assert torch.allclose(clf.class_embeddings[0], F.normalize(e[0] + e[1], dim=0))
    kitty = e[1][None]
    assert torch.allclose(clf.logits(kitty), 10 * kitty @ clf.class_embeddings.T)
    mx = TextClassifier(model, [["cat", "kitty"], ["dog"]], ["a {}", "the {}"], "max")
    assert torch.allclose(mx.logits(kitty), torch.tensor([[10.0, 0.0]]))  # the best synonym's similarity
    assert torch.allclose(mx.probabilities(kitty).sum(-1), torch.ones(1))


def test_template_sets():
    assert len(TEMPLATE_SETS["imagenet80"]) == 80 and TEMPLATE_SETS["imagenet80"][0] == "a bad photo of a {}."
    assert resolve_templates("identity") == ("{}",)
    with pytest.raises(ValueError, match="'{}'"):
        resolve_templates(["no placeholder"])


def test_hash_collisions_fall_back_to_exact_grouping(monkeypatch):
    import evaluation.aggregate as agg

    rng = np.random.default_rng(3)
    masks = rng.random((130, 6, 7)) < 0.5
    probs = rng.dirichlet(np.ones(4), size=130).astype(np.float32)
    monkeypatch.setattr(agg, "_mix64", lambda x: np.zeros_like(x))  # every multi-word key collides
    sets, index = coverage_sets(masks)
    assert np.array_equal(sets[index].T.reshape(masks.shape), masks)
    assert len({tuple(r) for r in sets}) == len(sets)
    masks[0] = True
    assert np.array_equal(aggregate(masks, probs), naive_vote(masks, probs))
