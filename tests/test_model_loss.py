"""SegmentTextLoss: hand-written reference, duplicate-text masking, padding across 2 gloo ranks."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from trainer.model import SegmentTextLoss, text_ids


def _pairs(n: int, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, e, generator=gen), dim=-1),
            F.normalize(torch.randn(n, e, generator=gen), dim=-1))


def _reference(seg: torch.Tensor, txt: torch.Tensor, scale: float, same: list[list[bool]] | None = None) -> float:
    """Loops: row i's softmax over the columns that are not another pair with the same text."""
    n = seg.shape[0]
    logit = [[scale * float(seg[i] @ txt[j]) for j in range(n)] for i in range(n)]
    keep = [[j == i or not (same and same[i][j]) for j in range(n)] for i in range(n)]
    seg_side = sum(-logit[i][i] + math.log(sum(math.exp(logit[i][j]) for j in range(n) if keep[i][j]))
                   for i in range(n)) / n
    txt_side = sum(-logit[j][j] + math.log(sum(math.exp(logit[i][j]) for i in range(n) if keep[j][i]))
                   for j in range(n)) / n
    return (seg_side + txt_side) / 2


def test_equals_hand_written_symmetric_cross_entropy() -> None:
    seg, txt = _pairs(5)
    scale = torch.tensor(10.0)
    got = SegmentTextLoss()(seg, txt, scale)
    assert got.item() == pytest.approx(_reference(seg, txt, 10.0), rel=1e-5)
    assert got.item() == pytest.approx(ClipLoss()(seg, txt, scale).item(), rel=1e-6)


def test_duplicate_texts_are_not_negatives() -> None:
    seg, txt = _pairs(6)
    texts = ["red circle", "blue square", "red circle", "sky", "blue square", "red circle"]
    uniq = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    txt = txt[[uniq[t] for t in texts]]  # equal texts have equal embeddings, as from the text tower
    same = [[a == b for b in texts] for a in texts]
    ref = _reference(seg, txt, 7.0, same)
    by_embedding = SegmentTextLoss()(seg, txt, torch.tensor(7.0))
    by_ids = SegmentTextLoss()(seg, txt, torch.tensor(7.0), text_ids=text_ids(texts))
    assert by_embedding.item() == pytest.approx(ref, rel=1e-5)
    assert by_ids.item() == pytest.approx(ref, rel=1e-5)
    plain = SegmentTextLoss(mask_duplicate_texts=False)(seg, txt, torch.tensor(7.0))
    assert plain.item() == pytest.approx(_reference(seg, txt, 7.0), rel=1e-5) and plain > by_ids


def test_text_ids_are_stable() -> None:
    assert text_ids(["a", "b", "a"]).tolist()[0] == text_ids(["a"]).item() != text_ids(["b"]).item()


def test_gradient_reaches_scale_and_embeddings() -> None:
    seg, txt = _pairs(4)
    seg.requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    SegmentTextLoss()(seg, txt, log_scale.exp()).backward()
    assert seg.grad is not None and log_scale.grad is not None and torch.isfinite(seg.grad).all()


# --- two gloo ranks with different segment counts --------------------------------------------------
N_GLOBAL, SCALE = 8, 5.0
TEXTS = ["a", "b", "a", "c", "d", "b", "e", "a"]


def _case_rows(case: int, rank: int) -> slice:
    """Case 0: rank 0 holds 3 pairs, rank 1 holds 5. Case 1: rank 0 holds none, rank 1 holds 4."""
    return [[slice(0, 3), slice(3, 8)], [slice(0, 0), slice(0, 4)]][case][rank]


def _global(case: int) -> tuple[torch.Tensor, torch.Tensor]:
    seg, txt = _pairs(N_GLOBAL, seed=1)
    uniq = {t: i for i, t in enumerate(dict.fromkeys(TEXTS))}
    txt = txt[[uniq[t] for t in TEXTS]]
    return (seg, txt) if case == 0 else (seg[:4], txt[:4])


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    shapes: list[tuple[int, ...]] = []
    cross_entropy = F.cross_entropy

    def spy(logits, *args, **kwargs):  # the logits each rank materialises
        shapes.append(tuple(logits.shape))
        return cross_entropy(logits, *args, **kwargs)

    F.cross_entropy = spy  # this forked child only
    results = {}
    try:
        for case in (0, 1):
            seg, txt = _global(case)
            rows = _case_rows(case, rank)
            local = seg[rows].clone().requires_grad_(True)
            local_txt = txt[rows].clone().requires_grad_(True)
            scale = torch.tensor(SCALE, requires_grad=True)
            ids = text_ids(TEXTS[: seg.shape[0]])[rows] if case == 0 else None  # case 1: by embedding
            shapes.clear()
            loss = SegmentTextLoss()(local, local_txt, scale, text_ids=ids)
            loss.backward()
            results[f"loss{case}"] = loss.detach().reshape(1)
            results[f"grad{case}"] = local.grad.clone()
            results[f"txtgrad{case}"] = local_txt.grad.clone()
            results[f"scalegrad{case}"] = scale.grad.reshape(1).clone()
            results[f"shapes{case}"] = torch.tensor(shapes)
    finally:
        F.cross_entropy = cross_entropy
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unequal_segment_counts_across_two_ranks(tmp_path: Path) -> None:
    """Local rows against global columns (open_clip's ``local_loss=True``) gives the single-process
    loss on all pairs, and the gradient of it.

    Each rank materialises only ``[S_max, N]`` logits, not ``[N, N]``. Every rank returns the
    global loss. ``torch.distributed.nn.all_gather`` sums the ranks' gradients in backward, so a
    rank's embedding gradient is ``world_size`` times the global one and DDP's averaging divides that
    back, exactly as in open_clip; the temperature's gradient, averaged over ranks as DDP does, is
    the global one.
    """
    # fork: the children inherit the imported modules (spawn would re-import open_clip, ~10 s each)
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for case, (s_max, n) in ((0, (5, 10)), (1, (4, 8))):
        seg, txt = _global(case)
        seg = seg.clone().requires_grad_(True)
        txt = txt.clone().requires_grad_(True)
        scale = torch.tensor(SCALE, requires_grad=True)
        ids = text_ids(TEXTS[: seg.shape[0]]) if case == 0 else None
        ref = SegmentTextLoss(rank=0, world_size=1)(seg, txt, scale, text_ids=ids)
        ref.backward()
        for rank in (0, 1):
            assert res[rank][f"shapes{case}"].tolist() == [[s_max, n], [s_max, n]], (case, rank)
            assert res[rank][f"loss{case}"].item() == pytest.approx(ref.item(), rel=1e-5), (case, rank)
            rows = _case_rows(case, rank)
            torch.testing.assert_close(res[rank][f"grad{case}"], 2 * seg.grad[rows])
            torch.testing.assert_close(res[rank][f"txtgrad{case}"], 2 * txt.grad[rows])
        mean_scale_grad = (res[0][f"scalegrad{case}"] + res[1][f"scalegrad{case}"]) / 2
        torch.testing.assert_close(mean_scale_grad, scale.grad.reshape(1))
