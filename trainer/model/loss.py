"""Segment-text contrastive loss over the global batch (CLIP-style, symmetric).

Built on open_clip's :class:`ClipLoss` with ``local_loss=True, gather_with_grad=True``: every rank
gathers all segment and text embeddings with ``torch.distributed.nn.all_gather`` (gradients flow
back to their rank) and computes the logits of *its own* rows against *all* columns: ``[S_local, N]``
for each direction instead of the full ``[N, N]`` (at the real config ~16k x 16k, 8 GB live per rank,
down to ``1 / world_size`` of it). Three things plain ``ClipLoss`` cannot do, and what we chose:

* **Unequal segment counts across ranks.** ``all_gather`` needs equal shapes, and images carry
  different numbers of segments. Each step the ranks exchange their counts (one tiny
  ``all_gather``), pad their embeddings with zeros to the largest count, and the padded entries are
  masked: padded columns get ``-inf`` logits and padded rows are left out. Nothing is dropped or
  capped here (capping segments per image is the data loader's job).
* **Duplicate texts.** Two segments drawn with the same text ("red circle") are not negatives of
  each other; plain CLIP loss would push them apart. By default each pair's off-diagonal duplicates
  are masked out of both softmaxes (``-inf``), so the target stays the segment's own text and no
  true match acts as a negative; with no duplicates and no padding this is exactly ``ClipLoss``.
  Duplicates are identified by ``text_ids`` when given (use :func:`text_ids`, stable across
  processes) and otherwise by text-embedding cosine ``>= 1 - dup_eps`` (identical texts embed
  identically; near-identical ones the frozen text tower cannot tell apart are treated alike).
* **The same value and gradient as the global loss.** The global loss is the mean over all valid
  pairs of both directions' cross-entropies, ``L = sum_k part_k / (2 N_valid)``. Rank ``k`` backpropagates
  ``world_size * part_k / (2 N_valid)``: the all_gather backward sums the ranks' gradients and DDP
  averages them, which gives exactly ``dL/dθ`` (the test checks it against a single process on all
  pairs). The value returned is ``L`` itself on every rank (one scalar all_reduce, no gradient), so
  logs and the finiteness check see the global loss.

``logit_scale`` is the multiplicative scale (``model.logit_scale_exp()``), as in open_clip.
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
        super().__init__(local_loss=True, gather_with_grad=True, cache_labels=True,
                         rank=r if rank is None else rank, world_size=w if world_size is None else world_size)
        self.mask_duplicate_texts = mask_duplicate_texts
        self.dup_eps = dup_eps

    def _pad_and_gather(self, seg: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                   tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """Pad this rank's pairs to the largest S of all ranks and gather them (with gradient).

        Returns the padded local ``(seg, txt, ids)``, the gathered ``(seg, txt, ids)`` (rank-major,
        ``world_size * s_max`` rows) and the validity of every gathered row.
        """
        n_local = torch.tensor([seg.shape[0]], device=seg.device, dtype=torch.long)
        counts = [torch.zeros_like(n_local) for _ in range(self.world_size)]
        dist.all_gather(counts, n_local)
        counts_t = torch.cat(counts)
        s_max = int(counts_t.max())
        pad = s_max - seg.shape[0]
        if pad:
            seg = torch.cat([seg, seg.new_zeros(pad, seg.shape[1])])
            txt = torch.cat([txt, txt.new_zeros(pad, txt.shape[1])])
            ids = torch.cat([ids, ids.new_zeros(pad)]) if ids is not None else None
        all_seg, all_txt = gather_features(seg, txt, local_loss=True, gather_with_grad=True,
                                           rank=self.rank, world_size=self.world_size)
        valid = (torch.arange(s_max, device=seg.device)[None, :] < counts_t[:, None]).flatten()
        all_ids = None
        if ids is not None:
            gathered = [torch.zeros_like(ids) for _ in range(self.world_size)]
            dist.all_gather(gathered, ids)
            all_ids = torch.cat(gathered)
        return (seg, txt, ids), (all_seg, all_txt, all_ids), valid

    def forward(self, seg_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                text_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch; ``text_ids [S]`` optionally marks equal texts."""
        if seg_emb.shape != txt_emb.shape:
            raise ValueError(f"segment {tuple(seg_emb.shape)} and text {tuple(txt_emb.shape)} embeddings differ")
        ids = None if text_ids is None else text_ids.to(device=seg_emb.device, dtype=torch.long)
        seg, txt = seg_emb.float(), txt_emb.float()  # logits in fp32 whatever autocast produced
        if self.world_size > 1:
            (seg, txt, ids), (all_seg, all_txt, all_ids), valid = self._pad_and_gather(seg, txt, ids)
        else:
            all_seg, all_txt, all_ids = seg, txt, ids
            valid = torch.ones(seg.shape[0], dtype=torch.bool, device=seg.device)
        n_valid = int(valid.sum())
        if n_valid == 0:
            return seg_emb.sum() * 0.0  # nothing to contrast anywhere; keeps the graph for DDP
        s_max = seg.shape[0]
        offset = self.rank * s_max if self.world_size > 1 else 0  # this rank's first global column
        rows_valid = valid[offset:offset + s_max]
        scale = logit_scale.float() if torch.is_tensor(logit_scale) else float(logit_scale)
        blocked = self._blocked(rows_valid, valid, txt, all_txt, ids, all_ids, offset)
        labels = self.get_ground_truth(seg.device, s_max)  # offset + arange(s_max) on several ranks
        per_seg = F.cross_entropy((scale * seg @ all_txt.T).masked_fill(blocked, float("-inf")), labels,
                                  reduction="none")  # [s_max, N]: this rank's segments against every text
        per_txt = F.cross_entropy((scale * txt @ all_seg.T).masked_fill(blocked, float("-inf")), labels,
                                  reduction="none")  # this rank's texts against every segment
        part = (per_seg + per_txt)[rows_valid].sum()
        local = part * (self.world_size / (2 * n_valid))
        if self.world_size == 1:
            return local
        total = part.detach().clone()
        dist.all_reduce(total)  # the global loss's value on every rank; the gradient stays the local one's
        return local + (total / (2 * n_valid) - local).detach()

    def _blocked(self, rows_valid: torch.Tensor, valid: torch.Tensor, txt: torch.Tensor, all_txt: torch.Tensor,
                 ids: torch.Tensor | None, all_ids: torch.Tensor | None, offset: int) -> torch.Tensor:
        """``[s_max, N]`` logits to leave out of both softmaxes.

        Symmetric in spirit: a valid row never sees padded columns and a padded row sees only padded
        ones (so its ignored loss stays finite, no NaN gradient); duplicates block each other.
        """
        blocked = rows_valid[:, None] != valid[None, :]
        if self.mask_duplicate_texts:
            if ids is not None:
                same = ids[:, None] == all_ids[None, :]
            else:
                same = F.normalize(txt, dim=-1) @ F.normalize(all_txt, dim=-1).T >= 1.0 - self.dup_eps
            same = same & rows_valid[:, None] & valid[None, :]
            own = torch.arange(same.shape[0], device=same.device)
            same[own, own + offset] = False
            blocked = blocked | same
        return blocked
