"""Segment-text contrastive loss over the global batch (CLIP-style, symmetric).

Built on open_clip's :class:`ClipLoss` (``local_loss=False, gather_with_grad=True``): every rank
gathers all segment and text embeddings with ``torch.distributed.nn.all_gather`` (gradients flow
back to their rank), computes the same global ``N x N`` logits and the mean of the two
cross-entropies. Two things plain ``ClipLoss`` cannot do, and what we chose:

* **Unequal segment counts across ranks.** ``all_gather`` needs equal shapes, and images carry
  different numbers of segments. Each step the ranks exchange their counts (one tiny
  ``all_gather``), pad their embeddings with zeros to the largest count, and the padded entries are
  masked: padded columns get ``-inf`` logits and padded rows are left out of the mean. Nothing is
  dropped or capped here (capping segments per image is the data loader's job).
* **Duplicate texts.** Two segments drawn with the same text ("red circle") are not negatives of
  each other; plain CLIP loss would push them apart. By default each pair's off-diagonal duplicates
  are masked out of both softmaxes (``-inf``), so the target stays the segment's own text and no
  true match acts as a negative; with no duplicates and no padding this is exactly ``ClipLoss``.
  Duplicates are identified by ``text_ids`` when given (use :func:`text_ids`, stable across
  processes) and otherwise by text-embedding cosine ``>= 1 - dup_eps`` (identical texts embed
  identically; near-identical ones the frozen text tower cannot tell apart are treated alike).

``logit_scale`` is the multiplicative scale (``model.logit_scale_exp()``), as in open_clip. Every
rank returns the same global scalar; as in open_clip the all_gather backward sums the ranks'
gradients and DDP averages them, which gives the gradient of that global loss.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features

from ..distributed import rank_world


def text_ids(texts: list[str]) -> torch.Tensor:
    """Stable int64 ids of texts (blake2b, same in every process; Python's ``hash`` is salted)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                         for t in texts], dtype=torch.long)


class SegmentTextLoss(ClipLoss):
    """``loss(seg_emb [S, E], txt_emb [S, E], logit_scale) -> scalar``; row i of both is a pair.

    Construct it after ``torch.distributed`` is initialised (rank and world size are read then,
    unless given). ``S`` may differ between ranks and may be 0 on some of them.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None,
                 mask_duplicate_texts: bool = True, dup_eps: float = 1e-3) -> None:
        r, w = rank_world()
        super().__init__(local_loss=False, gather_with_grad=True, cache_labels=True,
                         rank=r if rank is None else rank, world_size=w if world_size is None else world_size)
        self.mask_duplicate_texts = mask_duplicate_texts
        self.dup_eps = dup_eps

    def _gather(self, seg: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pad to the largest S across ranks and gather; returns features, validity mask, ids."""
        n_local = torch.tensor([seg.shape[0]], device=seg.device, dtype=torch.long)
        counts = [torch.zeros_like(n_local) for _ in range(self.world_size)]
        dist.all_gather(counts, n_local)
        counts_t = torch.cat(counts)
        s_max = int(counts_t.max())
        pad = s_max - seg.shape[0]
        if pad:
            seg = torch.cat([seg, seg.new_zeros(pad, seg.shape[1])])
            txt = torch.cat([txt, txt.new_zeros(pad, txt.shape[1])])
        all_seg, all_txt = gather_features(seg, txt, local_loss=False, gather_with_grad=True,
                                           rank=self.rank, world_size=self.world_size)
        valid = (torch.arange(s_max, device=seg.device)[None, :] < counts_t[:, None]).flatten()
        all_ids = None
        if ids is not None:
            ids = torch.cat([ids, ids.new_zeros(pad)]) if pad else ids
            gathered = [torch.zeros_like(ids) for _ in range(self.world_size)]
            dist.all_gather(gathered, ids)
            all_ids = torch.cat(gathered)
        return all_seg, all_txt, valid, all_ids

    def forward(self, seg_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                text_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch; ``text_ids [S]`` optionally marks equal texts."""
        if seg_emb.shape != txt_emb.shape:
            raise ValueError(f"segment {tuple(seg_emb.shape)} and text {tuple(txt_emb.shape)} embeddings differ")
        ids = None if text_ids is None else text_ids.to(device=seg_emb.device, dtype=torch.long)
        seg, txt = seg_emb.float(), txt_emb.float()  # logits in fp32 whatever autocast produced
        if self.world_size > 1:
            seg, txt, valid, ids = self._gather(seg, txt, ids)
        else:
            valid = torch.ones(seg.shape[0], dtype=torch.bool, device=seg.device)
        if not bool(valid.any()):
            return seg_emb.sum() * 0.0  # nothing to contrast anywhere; keeps the graph for DDP
        scale = logit_scale.float() if torch.is_tensor(logit_scale) else float(logit_scale)
        logits = scale * seg @ txt.T  # [N, N], rows: segments, cols: texts
        # Symmetric mask: a valid row never sees padded columns (and vice versa, so padded rows stay
        # finite and their ignored loss has no NaN gradient); duplicates block each other.
        blocked = valid[:, None] != valid[None, :]
        if self.mask_duplicate_texts:
            if ids is not None:
                same = ids[:, None] == ids[None, :]
            else:
                t = F.normalize(txt, dim=-1)
                same = (t @ t.T) >= 1.0 - self.dup_eps
            same = same & valid[:, None] & valid[None, :]
            same.fill_diagonal_(False)
            blocked = blocked | same
        logits = logits.masked_fill(blocked, float("-inf"))
        labels = self.get_ground_truth(seg.device, logits.shape[0])
        per_seg = F.cross_entropy(logits, labels, reduction="none")
        per_txt = F.cross_entropy(logits.T, labels, reduction="none")
        return ((per_seg + per_txt)[valid]).mean() / 2
