"""Input checks shared by the public calls. Each raises ``TypeError`` (wrong kind or dtype) or
``ValueError`` (wrong shape or value) naming the argument, what it got and what is expected.

Two kinds:

* **structure** (types, shapes, dtypes, devices): read only metadata, always run;
* **values** (``topk_idx`` range and repeats, layout tensors agreeing with each other): read
  tensor contents. :func:`dispatch_value_flags` computes them *on the device* as one integer,
  which the normal-mode control round carries for free (no extra host read); the precise
  message is built on the host only when that integer says something is wrong
  (:func:`explain_dispatch_values`). :func:`check_topk_values` is the host-side check used
  where a host read is free (CPU tensors) or asked for.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .._dtypes import FLOAT8_DTYPES
from ..layout import expert_histogram

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_int(name: str, value, *, minimum: Optional[int] = None, multiple: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if multiple is not None and value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
    return value


def check_tensor(name: str, t, *, dim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None, rows: Optional[int] = None,
                 contiguous: bool = True, device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if rows is not None and t.size(0) != rows:
        raise ValueError(f"{name} must have {rows} rows (one per token), got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (same device as x), got {t.device}")
    return t


def split_x(x: Union[torch.Tensor, tuple], *, floats: Sequence[torch.dtype] = FLOAT_DTYPES,
            name: str = "x") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``x`` or ``(x_fp8, scales)`` -> ``(x, scales or None)``, checked.

    ``x: [T, H]`` float, or e4m3 ``[T, H]`` with ``scales [T, S]`` float32 or packed UE8M0 int32,
    any ``S`` (usually ``H/128`` float32 or ``ceil(H/512)`` int32) and any strides.
    """
    if isinstance(x, (tuple, list)):
        if not all(isinstance(part, torch.Tensor) for part in x):
            raise TypeError(f"{name} must be a torch.Tensor or an (x_fp8, scales) tuple of tensors, "
                            f"got {type(x).__name__} of {', '.join(sorted({type(p).__name__ for p in x}))}")
        if len(x) != 2:
            raise ValueError(f"{name} as a tuple must be (x_fp8 [T, H], scales [T, H/128]), "
                             f"got {len(x)} items")
        data, scales = x
        check_tensor(f"{name}[0]", data, dim=2, dtypes=tuple(FLOAT8_DTYPES) + (torch.uint8,))
        hidden = data.size(1)
        if hidden % 128:
            raise ValueError(f"{name}[0]: FP8 hidden size must be a multiple of 128, got {hidden}")
        # Any number of scale columns, as DeepEP (it moves them without reading them): H/128
        # float32 usually, ceil(H/512) packed UE8M0 int32, or finer blocks.
        check_tensor(f"{name}[1] (scales)", scales, dim=2, dtypes=(torch.float32, torch.int32),
                     rows=data.size(0), contiguous=False, device=data.device)
        return data, scales
    if isinstance(x, torch.Tensor) and x.dtype in FLOAT8_DTYPES:
        # The most common FP8 mistake: the scales were dropped on the way.
        raise TypeError(f"{name} is {str(x.dtype).replace('torch.', '')} without scales; expected "
                        f"(x_fp8 [T, H], scales [T, H/128] float32) or a {_names(floats)} tensor")
    check_tensor(name, x, dim=2, dtypes=floats)
    return x, None


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_topk_idx(topk_idx, num_tokens: Optional[int], num_experts: int, *, values: bool = True,
                   name: str = "topk_idx", device: Optional[torch.device] = None) -> torch.Tensor:
    """``[T, K]`` int64 (int32 accepted), entries ``-1`` or in ``[0, num_experts)``, no repeats.

    ``values=False`` checks the structure only (no read of the contents).
    """
    check_tensor(name, topk_idx, dim=2, dtypes=INDEX_DTYPES, rows=num_tokens, device=device)
    if values:
        check_topk_values(topk_idx, num_experts, name)
    return topk_idx.to(torch.int64)


def topk_flags(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """0-dim int64 on ``topk_idx``'s device: entries out of range plus rows repeating an expert."""
    if topk_idx.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=topk_idx.device)
    bad = ((topk_idx < -1) | (topk_idx >= num_experts)).sum()
    if topk_idx.size(1) > 1:
        srt = topk_idx.sort(1).values
        bad = bad + ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).sum()
    return bad


def check_topk_values(topk_idx: torch.Tensor, num_experts: int, name: str = "topk_idx") -> None:
    """Host-side value check of ``topk_idx`` (reads the tensor); raises ``ValueError``."""
    if not topk_idx.numel():
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}[{t}, {k}] = {int(topk_idx[t, k])} is out of range; expected -1 "
                         f"(unused slot) or an expert id in [0, {num_experts})")
    if topk_idx.size(1) > 1:
        srt = topk_idx.sort(1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            t = int(dup.any(1).nonzero()[0])
            raise ValueError(f"{name} row {t} selects an expert twice ({topk_idx[t].tolist()}); "
                             "each expert may appear at most once per token")


@dataclass(frozen=True)
class LayoutStamp:
    """What a ``get_dispatch_layout`` call read and returned, to recognise them in ``dispatch``.

    Holds weak references to ``topk_idx`` and the three layout tensors with their version
    counters (bumped by every in-place change), ``num_experts``, and whether ``topk_idx``'s
    values were checked then. A dispatch that passes these very tensors, unchanged, needs no
    consistency check: the layout was computed from that ``topk_idx``.
    """

    refs: tuple
    versions: tuple
    num_experts: int
    values_checked: bool

    @staticmethod
    def of(topk_idx: torch.Tensor, layout, num_experts: int, values_checked: bool) -> Optional[LayoutStamp]:
        """The stamp, or None when a tensor has no version counter (made under
        ``torch.inference_mode``): an in-place change could not be told then."""
        tensors = (topk_idx, layout.num_tokens_per_rank, layout.is_token_in_rank,
                   layout.num_tokens_per_expert)
        if any(t.is_inference() for t in tensors):
            return None
        return LayoutStamp(tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors),
                           num_experts, values_checked)

    def matches(self, req) -> bool:
        """Whether ``req`` (a DispatchRequest) carries exactly these tensors, unchanged."""
        tensors = (req.topk_idx, req.num_tokens_per_rank, req.is_token_in_rank, req.num_tokens_per_expert)
        return req.num_experts == self.num_experts and all(
            t is not None and ref() is t and not t.is_inference() and t._version == v
            for ref, v, t in zip(self.refs, self.versions, tensors))


def dispatch_value_flags(req, stamp: Optional[LayoutStamp] = None) -> Optional[torch.Tensor]:
    """0-dim int64 on the request's device, non-zero when a value check of ``req`` fails:
    ``topk_idx`` range/repeats, ``num_tokens_per_rank == is_token_in_rank.sum(0)``, and
    ``num_tokens_per_expert`` equal to the experts ``topk_idx`` chooses.

    With ``stamp`` matching ``req`` (the layout tensors of that very ``topk_idx``, unchanged)
    the counts agree by construction and only the ``topk_idx`` values are checked, unless the
    layout call checked them already: then None (nothing can fail).
    """
    if stamp is not None and stamp.matches(req):
        if stamp.values_checked:
            return None
        return topk_flags(req.topk_idx, req.num_experts)
    send_counts = req.is_token_in_rank.sum(0)
    bad = torch.zeros((), dtype=torch.int64, device=req.device)
    if req.num_tokens_per_rank is not None:
        bad = bad + (req.num_tokens_per_rank.to(send_counts.dtype) != send_counts).sum()
    if req.topk_idx is not None:
        bad = bad + topk_flags(req.topk_idx, req.num_experts)
        hist = expert_histogram(req.topk_idx, req.num_experts)
        bad = bad + (hist != req.num_tokens_per_expert.to(torch.int64)).sum()
    return bad


def explain_dispatch_values(req) -> ValueError:
    """The ``ValueError`` behind a non-zero :func:`dispatch_value_flags` (reads the host)."""
    if req.topk_idx is not None:
        try:
            check_topk_values(req.topk_idx, req.num_experts)
        except ValueError as exc:
            return exc
    send_counts = req.is_token_in_rank.sum(0)
    if req.num_tokens_per_rank is not None and not torch.equal(
            req.num_tokens_per_rank.to(send_counts.dtype), send_counts):
        return ValueError("num_tokens_per_rank does not match is_token_in_rank.sum(0): got "
                          f"{req.num_tokens_per_rank.tolist()}, expected {send_counts.tolist()}")
    hist = expert_histogram(req.topk_idx, req.num_experts)
    return ValueError("num_tokens_per_expert does not match the experts topk_idx chooses: got "
                      f"{req.num_tokens_per_expert.tolist()}, expected {hist.tolist()} "
                      "(pass the counts get_dispatch_layout returned)")


def check_topk_weights(topk_weights, topk_idx: torch.Tensor, name: str = "topk_weights") -> torch.Tensor:
    check_tensor(name, topk_weights, dim=2, dtypes=(torch.float32,), device=topk_idx.device)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"{name} must have the shape of topk_idx {tuple(topk_idx.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    return topk_weights


def check_num_experts(num_experts, world: int, name: str = "num_experts") -> int:
    check_int(name, num_experts, minimum=1)
    if num_experts % world:
        raise ValueError(f"{name} ({num_experts}) must be divisible by the group size ({world})")
    return num_experts


def check_flags(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream=True requires previous_event and async_finish=True")


# ---- request structure --------------------------------------------------------------------
def check_dispatch(req, world: int) -> None:
    """Structure of a :class:`~flexep.algorithms.contract.DispatchRequest` for a group of ``world``."""
    x = req.x
    if req.scales is None:
        split_x(x)
    else:
        split_x((x, req.scales))
    num_tokens, device = x.size(0), x.device
    check_tensor("num_tokens_per_expert", req.num_tokens_per_expert, dim=1, dtypes=(torch.int32, torch.int64))
    check_num_experts(req.num_experts, world)
    if req.num_tokens_per_expert.numel() != req.num_experts:
        raise ValueError(f"num_tokens_per_expert must be [{req.num_experts}] (one count per expert), "
                         f"got {tuple(req.num_tokens_per_expert.shape)}")
    if req.num_tokens_per_rank is not None:
        check_tensor("num_tokens_per_rank", req.num_tokens_per_rank, dim=1, dtypes=(torch.int32, torch.int64))
        if req.num_tokens_per_rank.numel() != world:
            raise ValueError(f"num_tokens_per_rank must be [{world}], got "
                             f"{tuple(req.num_tokens_per_rank.shape)}")
    check_tensor("is_token_in_rank", req.is_token_in_rank, dim=2, dtypes=(torch.bool,), rows=num_tokens,
                 device=device)
    if req.is_token_in_rank.size(1) != world:
        raise ValueError(f"is_token_in_rank must be [{num_tokens}, {world}], "
                         f"got {tuple(req.is_token_in_rank.shape)}")
    check_tensor("num_tokens_per_expert", req.num_tokens_per_expert, device=device)
    if req.num_tokens_per_rank is not None:
        check_tensor("num_tokens_per_rank", req.num_tokens_per_rank, device=device)
    if (req.topk_idx is None) != (req.topk_weights is None):
        raise ValueError("topk_idx and topk_weights must be given together (or both None)")
    if req.topk_idx is not None:
        check_topk_idx(req.topk_idx, num_tokens, req.num_experts, values=False, device=device)
        if req.topk_idx.dtype != torch.int64:
            raise TypeError("topk_idx must be int64 in a DispatchRequest (convert with .long())")
        check_topk_weights(req.topk_weights, req.topk_idx)
    check_int("expert_alignment", req.expert_alignment, minimum=1)
    check_int("num_worst_tokens", req.num_worst_tokens, minimum=0)
    check_int("handle_channels", req.handle_channels, minimum=1)
    if req.num_worst_tokens and req.topk_idx is None:
        raise ValueError("num_worst_tokens > 0 requires topk_idx and topk_weights")


def check_cached(req) -> None:
    """Structure of a cached dispatch: rows of the handle's token count and hidden size."""
    h = req.handle
    data, _ = split_x(req.x if req.scales is None else (req.x, req.scales))
    if data.size(0) != h.num_tokens:
        raise ValueError(f"x must have {h.num_tokens} rows (the handle's tokens), got {tuple(data.shape)}")
    if data.device != h.is_token_in_rank.device:
        raise ValueError(f"x must be on {h.is_token_in_rank.device} (the handle's device), got {data.device}")


def check_combine(req) -> None:
    """Structure of a combine: ``x [M', H']`` float, optional weights and biases."""
    h, x = req.handle, req.x
    # Any width: combine may return rows of another size than were dispatched (DeepEP).
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES, rows=h.num_rows, device=h.recv_src_idx.device)
    if req.topk_weights is not None:
        check_tensor("topk_weights", req.topk_weights, dim=2, dtypes=(torch.float32,), rows=h.num_rows,
                     device=x.device)
    for i, b in enumerate(req.bias):
        check_tensor(f"bias[{i}]", b, dim=2, dtypes=(x.dtype,), rows=h.num_tokens, device=x.device)
        if b.size(1) != x.size(1):
            raise ValueError(f"bias[{i}] must be [{h.num_tokens}, {x.size(1)}], got {tuple(b.shape)}")


def check_ll_dispatch(req, world: int) -> None:
    """Structure of a low-latency dispatch (capacity, FP8 modes, statistics tensor)."""
    x = req.x
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    check_num_experts(req.num_experts, world)
    check_topk_idx(req.topk_idx, x.size(0), req.num_experts, values=False, device=x.device)
    check_int("num_max_dispatch_tokens_per_rank", req.capacity, minimum=1)
    if req.use_ue8m0 and not req.round_scale:
        raise ValueError("use_ue8m0=True requires round_scale=True")
    multiple = 512 if req.use_fp8 and req.use_ue8m0 else 128 if req.use_fp8 else 1
    if x.size(1) % multiple:
        raise ValueError(f"x: hidden ({x.size(1)}) must be a multiple of {multiple} for this FP8 mode "
                         "(per-128-channel scales, 4 per int32 with UE8M0)")
    stats = req.cumulative_local_expert_recv_stats
    if stats is not None:
        check_tensor("cumulative_local_expert_recv_stats", stats, dim=1, dtypes=(torch.int32, torch.int64),
                     rows=req.num_experts // world, device=x.device)


def check_ll_combine(req) -> None:
    """Structure of a low-latency combine against its handle."""
    h = req.handle
    shape = (h.num_local_experts, h.num_ranks * h.num_max_dispatch_tokens_per_rank, h.hidden)
    check_tensor("x", req.x, dim=3, dtypes=FLOAT_DTYPES, contiguous=False, device=h.topk_idx.device)
    if tuple(req.x.shape) != shape:
        raise ValueError(f"x must be {list(shape)} (the dispatch's [L, W*Q, H]), got {list(req.x.shape)}")
    check_topk_weights(req.topk_weights, h.topk_idx)
    if req.use_logfmt and req.x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16 with use_logfmt=True (LogFMT encodes BF16), got "
                        f"{str(req.x.dtype).replace('torch.', '')}")
    if req.use_logfmt and h.hidden % 128:
        raise ValueError(f"use_logfmt=True needs hidden to be a multiple of 128, got {h.hidden}")
    check_tensor("out", req.out, dim=2, dtypes=(req.x.dtype,), rows=h.num_tokens, device=req.x.device)
    if req.out.size(1) != h.hidden:
        raise ValueError(f"out must be [{h.num_tokens}, {h.hidden}], got {list(req.out.shape)}")


# ---- DeepEP V2: slot-order combine and sync-free calls --------------------------------------
def check_slot_order(order, num_tokens: int, x: torch.Tensor, world: int) -> int:
    """A :class:`~flexep.algorithms.contract.SlotOrder` for ``num_tokens`` tokens and rows ``x``;
    returns the hidden width H' the combine produces."""
    check_num_experts(order.num_experts, world, name="slot_order.num_experts")
    topk = check_tensor("slot_order.topk_idx", order.topk_idx, dim=2, dtypes=(torch.int64,), rows=num_tokens,
                        contiguous=False, device=x.device)
    check_int("slot_order.ranks_per_node", order.ranks_per_node, minimum=0)
    if order.ranks_per_node and world % order.ranks_per_node:
        raise ValueError(f"slot_order.ranks_per_node ({order.ranks_per_node}) must divide the group "
                         f"size ({world})")
    if not order.per_slot:
        return x.size(1)
    k = topk.size(1)
    if k == 0 or x.size(1) % k:
        raise ValueError(f"per-slot combine rows must be [M, K * H'] with K = {k}, got {tuple(x.shape)}")
    return x.size(1) // k


def check_scales_packs(scales, data: torch.Tensor, name: str = "x[1] (scales)") -> None:
    """DeepEP V2 scales: ``[T, S]`` 4-byte packs (float32 or int32), any ``S``, any strides."""
    check_tensor(name, scales, dim=2, dtypes=(torch.float32, torch.int32), rows=data.size(0),
                 contiguous=False, device=data.device)


def check_sync_free(req, world: int) -> None:
    """Structure of a :class:`~flexep.algorithms.contract.SyncFreeDispatchRequest`."""
    x = req.x
    floats = tuple(FLOAT_DTYPES) + (tuple(FLOAT8_DTYPES) + (torch.uint8,) if req.scales is not None else ())
    check_tensor("x", x, dim=2, dtypes=floats)
    if req.scales is not None:
        check_scales_packs(req.scales, x)
    check_num_experts(req.num_experts, world)
    check_int("num_max_tokens_per_rank", req.capacity, minimum=1)
    if x.size(0) > req.capacity:
        raise ValueError(f"x has {x.size(0)} tokens, more than num_max_tokens_per_rank ({req.capacity}); "
                         "raise num_max_tokens_per_rank (equal on all ranks) or split the batch")
    check_topk_idx(req.topk_idx, x.size(0), req.num_experts, values=False, device=x.device)
    if req.topk_idx.dtype != torch.int64:
        raise TypeError("topk_idx must be int64 (deep_ep.topk_idx_t)")
    if req.topk_weights is not None:
        check_topk_weights(req.topk_weights, req.topk_idx)


def check_sync_free_cached(req) -> None:
    """A sync-free replay: rows of the handle's token count, optional scales and weights."""
    h, x = req.handle, req.x
    floats = tuple(FLOAT_DTYPES) + (tuple(FLOAT8_DTYPES) + (torch.uint8,) if req.scales is not None else ())
    check_tensor("x", x, dim=2, dtypes=floats, rows=h.num_tokens, device=h.topk_idx.device)
    if req.scales is not None:
        check_scales_packs(req.scales, x)
    if req.topk_weights is not None:
        check_topk_weights(req.topk_weights, h.topk_idx)


def check_sync_free_combine(req, world: int) -> None:
    """A sync-free combine: ``x [W*Q, H']`` (or per-slot ``[W*Q, K*H']``), weights, biases."""
    h = req.handle
    _check_slot_combine(req, world, h.num_rows, h.num_tokens, h.topk_idx.device)


def check_slot_combine(req, world: int) -> None:
    """A counted combine in slot order: ``x [M, H']`` (or per-slot ``[M, K*H']``)."""
    h = req.handle
    _check_slot_combine(req, world, h.num_rows, h.num_tokens, h.recv_src_idx.device)


def _check_slot_combine(req, world: int, rows: int, tokens: int, device: torch.device) -> None:
    x = req.x
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES, rows=rows, device=device)
    hidden = check_slot_order(req.slot_order, tokens, x, world)
    if req.topk_weights is not None:
        check_tensor("topk_weights", req.topk_weights, dim=2, dtypes=(torch.float32,), rows=rows,
                     device=device)
        if req.topk_weights.size(1) != req.slot_order.topk_idx.size(1):
            raise ValueError(f"topk_weights must be [{rows}, {req.slot_order.topk_idx.size(1)}], "
                             f"got {tuple(req.topk_weights.shape)}")
    for i, b in enumerate(req.bias):
        check_tensor(f"bias[{i}]", b, dim=2, dtypes=(x.dtype,), rows=tokens, device=device)
        if b.size(1) != hidden:
            raise ValueError(f"bias[{i}] must be [{tokens}, {hidden}], got {tuple(b.shape)}")
