"""Baselines of ``flexep bench`` built from raw collectives: a raw ``all_to_all_single`` of the
bytes flexep's dispatch and combine send, and a naive per-(token, expert) exchange as the
all-to-all token dispatchers of training frameworks do it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm.objects import all_gather_object

__all__ = ["naive_exchange", "raw_a2a", "raw_buffers", "meta_bytes"]


def naive_exchange(buf_group, x, topk_idx, topk_w, experts, rank, world):
    """Megatron-style: one row per (token, expert), exchanged, then weighted-reduced on return."""
    local = experts // world
    flat = topk_idx.flatten()
    valid = (flat >= 0).nonzero().squeeze(1)
    order = valid[torch.argsort(flat[valid], stable=True)]
    token_of = order // topk_idx.size(1)
    send_counts = torch.bincount(flat[order] // local, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=buf_group)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    send = x.index_select(0, token_of)
    recv = x.new_empty(sum(rc), x.size(1))
    dist.all_to_all_single(recv, send, rc, sc, group=buf_group)
    back = x.new_empty(send.shape)
    dist.all_to_all_single(back, recv, sc, rc, group=buf_group)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, back.float() * topk_w.flatten()[order].unsqueeze(1))
    return out.to(x.dtype), sum(sc) * x.size(1) * x.element_size()


def raw_a2a(raw: dict, send: str, out_counts: str, in_counts: str) -> torch.Tensor:
    """Raw ``all_to_all_single`` of a prepared buffer into a new tensor, as a call that returns
    its result must do (on the host, the new tensor's first touch costs page faults)."""
    src = raw[send]
    out = src.new_empty(sum(raw[out_counts]), src.size(1))
    dist.all_to_all_single(out, src, raw[out_counts], raw[in_counts])
    return out


def raw_buffers(cfg, is_token_in_rank: torch.Tensor, rank: int, world: int,
                 device: torch.device) -> dict:
    """Buffers for raw ``all_to_all_single`` of flat dispatch's rows and combine's rows.

    Send buffers are allocated once and written before timing. The baseline receives into a
    new tensor per call (:func:`_raw_a2a`); the "floor" also reuses a pre-touched receive buffer,
    so it times the transport alone.
    """
    send_counts = is_token_in_rank.sum(0).tolist()
    gathered = all_gather_object(None, send_counts, device if device.type != "cpu" else None)
    recv_counts = [gathered[s][rank] for s in range(world)]
    row = cfg.hidden * (1 if cfg.fp8 else 2) + meta_bytes(cfg)
    back_row = cfg.hidden * 2

    def touched(n: int, width: int) -> torch.Tensor:
        return torch.ones(n, width, dtype=torch.uint8, device=device)

    return dict(send=touched(sum(send_counts), row), recv=touched(sum(recv_counts), row),
                back_src=touched(sum(recv_counts), back_row), back_dst=touched(sum(send_counts), back_row),
                send_counts=send_counts, recv_counts=recv_counts,
                bytes=sum(send_counts) * row + sum(recv_counts) * back_row)


def meta_bytes(cfg) -> int:
    """Per-row metadata flexep's dispatch moves: source index, top-k ids and weights, scales."""
    return 4 + cfg.topk * 12 + (cfg.hidden // 128 * 4 if cfg.fp8 else 0)
