"""The algorithm contract: frozen requests in, frozen results and handles out.

(Longer than the package's other modules on purpose: every type an algorithm takes or returns,
for every mode, sits here next to the one shape legend, so the contract reads in one place.)

Every exchange algorithm is an object built once with its process groups (flat, hierarchical,
low-latency) and satisfies :class:`NormalAlgorithm` or :class:`LowLatencyAlgorithm`. The core
(:mod:`flexep.core.communicator`) validates a request, runs the call's control round and hands
the algorithm the host-side :class:`~flexep.comm.control.Header`; the algorithm only moves and
rearranges data. A new backend (a vendor EP engine, a symmetric-memory kernel) is one new class
behind the same contract.

Shape legend for the whole package (each letter means one thing):

    T  tokens this rank sends (its batch)        H  hidden size (values per token row)
    K  top-k slots per token                     E  experts (global)
    W  ranks in the EP group                     L  local experts per rank, E / W
    N  nodes                                     P  ranks per node, W / N
    M  tokens this rank receives (normal mode)   S  FP8 scale columns per row (H/128, or H/512
    C  DeepEP's handle channel count (num_sms/2)    int32 words with packed UE8M0)
    Q  capacity, tokens per rank (low-latency ``num_max_dispatch_tokens_per_rank``, DeepEP
       V2's ``num_max_tokens_per_rank`` in sync-free calls)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Protocol, Sequence

import torch

from ..comm.control import Header
from .packing import channel_prefix, position_in_group, recv_channel_prefix

__all__ = ["DispatchRequest", "CachedDispatchRequest", "CombineRequest", "Sends", "Dispatched",
           "Combined", "NormalHandle", "LowLatencyHandle", "LLDispatchRequest", "LLCombineRequest",
           "NormalAlgorithm", "LowLatencyAlgorithm", "SlotOrder", "SyncFreeDispatchRequest",
           "SyncFreeCachedRequest", "SyncFreeCombineRequest", "SyncFreeHandle", "SyncFreeAlgorithm"]


@dataclass(frozen=True)
class DispatchRequest:
    """One normal-mode dispatch.

    Attributes:
        x: ``[T, H]`` bf16/fp16/fp32/fp64, or FP8 e4m3 (then ``scales`` is given).
        scales: ``[T, S]`` float32 (per 128 channels) or int32 (packed UE8M0), or None.
        is_token_in_rank: ``[T, W] bool``, token t has an expert on rank r.
        num_tokens_per_expert: ``[E]`` int32/int64, (token, slot) pairs per expert; gives the
            receivers their per-expert counts.
        num_experts: E.
        topk_idx: ``[T, K] int64`` global expert ids (``-1`` unused), or None.
        topk_weights: ``[T, K] float32``, with ``topk_idx``.
        num_tokens_per_rank: ``[W]``, checked against ``is_token_in_rank`` when given.
        expert_alignment: round each per-expert count up to this multiple.
        num_worst_tokens: if > 0, outputs have exactly this many rows (zero-padded).
        handle_channels: C, shapes the handle's DeepEP channel prefix matrices only.
    """

    x: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    num_experts: int
    scales: Optional[torch.Tensor] = None
    topk_idx: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None
    num_tokens_per_rank: Optional[torch.Tensor] = None
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    handle_channels: int = 10

    @property
    def num_tokens(self) -> int:
        return self.x.size(0)

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass(frozen=True)
class CachedDispatchRequest:
    """Dispatch ``x: [T, H]`` (and FP8 ``scales``) along an earlier dispatch's routing."""

    x: torch.Tensor
    handle: NormalHandle
    scales: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass(frozen=True)
class SlotOrder:
    """DeepEP V2's combine reduction, in top-k slot order (instead of flexep's rank order).

    For source token t with experts ``e_k = topk_idx[t, k]``: the row rank ``r`` returns is that
    rank's partial sum and counts at the *last* slot whose expert lives on r; with
    ``ranks_per_node`` the partials of one node are first summed in float32 in that slot order
    and rounded once (DeepEP's hybrid mode). Then ``acc = sum(bias)`` adds, slot by slot, the
    value counted there, in float32, rounded once. With ``per_slot`` the rows are ``[K * H']``
    wide and hold one value per slot (no partial sums: DeepEP without multiple reduction);
    slot k's value is taken from the rank owning ``e_k``. Returned weights: slot k of the row
    the owner of ``e_k`` returned (0 for unused slots), never summed.

    Attributes:
        topk_idx: ``[T, K] int64``, the dispatch's global expert ids (``-1`` unused).
        num_experts: E.
        ranks_per_node: P for the node level, 0 for none.
        per_slot: rows carry one value per slot.
    """

    topk_idx: torch.Tensor
    num_experts: int
    ranks_per_node: int = 0
    per_slot: bool = False


@dataclass(frozen=True)
class CombineRequest:
    """Return received rows to their sources and sum them per token.

    Attributes:
        x: ``[M', H']`` float rows (``M'`` the handle's rows; any width agreed across ranks).
        handle: from the dispatch.
        topk_weights: ``[M', K] float32`` summed the same way, or None.
        bias: tensors ``[T, H']`` of ``x``'s dtype added once per token (0, 1 or 2).
        slot_order: sum in DeepEP V2's slot order (:class:`SlotOrder`) instead of rank order.
    """

    x: torch.Tensor
    handle: NormalHandle
    topk_weights: Optional[torch.Tensor] = None
    bias: tuple = ()
    slot_order: Optional[SlotOrder] = None

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass(frozen=True)
class Sends:
    """What this rank sends, on the host: per-destination-rank counts and algorithm extras."""

    counts: list
    extra: list


@dataclass(frozen=True)
class Dispatched:
    """Outputs of a dispatch (``M'`` rows: M, or ``num_worst_tokens`` when that was used).

    Attributes:
        x: ``[M', H]`` rows grouped by source rank in rank order, source token order inside.
        scales: ``[M', S]`` when FP8 was dispatched, else None.
        topk_idx: ``[M', K] int64`` local expert ids, ``-1`` for experts elsewhere (or None).
        topk_weights: ``[M', K] float32``, 0 where ``topk_idx`` is -1 (or None).
        num_recv_tokens_per_expert: ``[L]`` python ints rounded up to the alignment; ``[]``
            with ``num_worst_tokens``; None for a cached dispatch.
        handle: for combine and cached dispatch.
    """

    x: torch.Tensor
    scales: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert: Optional[list]
    handle: NormalHandle


@dataclass(frozen=True)
class Combined:
    """Outputs of a combine: ``x [T, H']`` and ``topk_weights [T, K] float32`` (or None)."""

    x: torch.Tensor
    topk_weights: Optional[torch.Tensor]


@dataclass(frozen=True)
class NormalHandle:
    """Everything combine and cached dispatch need; also answers DeepEP's tuple indexing.

    Tuple view (``handle[i]``), as DeepEP's intranode handle (entries are built on first use):

    0. ``rank_prefix_matrix [W, W] int32``: ``[i][j]`` = tokens ranks ``0..i`` send to rank j;
       on rank j, source i occupies rows ``[prefix[i-1][j], prefix[i][j])``.
    1. ``channel_prefix_matrix [W, C] int32``: per destination, inclusive prefix over channels of
       the tokens sent (channel c covers source tokens ``[c*ceil(T/C), (c+1)*ceil(T/C))``).
    2. ``recv_channel_prefix_matrix [W, C] int32``: per source, start row of each channel's
       tokens inside that source's block.
    3. ``recv_src_idx [M'] int32``: token index inside its source rank for every received row
       (padded with -1 up to ``num_worst_tokens`` when that was used).
    4. ``is_token_in_rank [T, W] bool``.
    5. ``send_head [T, W] int32``: position of token t among the tokens sent to rank r, or -1.

    With more than one node the tuple view is DeepEP's 10-entry internode handle (see
    :mod:`flexep.algorithms.hierarchical`); ``handle[-4]`` is ``recv_gbl_rank_prefix_sum [W]``.

    Attributes:
        counts: ``[W, W] int64`` (host), the routing's count matrix from the control round.
        src_tokens: T of every rank. rank: this rank. handle_channels: C.
        owner: id of the communicator that made the handle (combine must use the same one).
        route: the algorithm's private replay state.
    """

    is_token_in_rank: torch.Tensor
    recv_src_idx: torch.Tensor
    counts: torch.Tensor = field(repr=False)
    src_tokens: tuple = ()
    rank: int = 0
    handle_channels: int = 1
    num_recv_tokens: int = 0
    hidden: int = 0
    owner: int = 0
    route: object = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.is_token_in_rank.size(0)

    @property
    def num_rows(self) -> int:
        """Rows of the dispatched ``x`` this handle describes (``num_worst_tokens`` if used)."""
        return self.recv_src_idx.size(0)

    @property
    def send_counts(self) -> list:
        return self.counts[self.rank].tolist()

    @property
    def recv_counts(self) -> list:
        return self.counts[:, self.rank].tolist()

    @cached_property
    def rank_prefix_matrix(self) -> torch.Tensor:
        return self.counts.to(torch.int32).cumsum(0, dtype=torch.int32).to(self.is_token_in_rank.device)

    @cached_property
    def channel_prefix_matrix(self) -> torch.Tensor:
        return channel_prefix(self.is_token_in_rank, self.handle_channels)

    @cached_property
    def recv_channel_prefix_matrix(self) -> torch.Tensor:
        return recv_channel_prefix(self.recv_src_idx, self.recv_counts, self.src_tokens,
                                   self.handle_channels)

    @cached_property
    def send_head(self) -> torch.Tensor:
        return position_in_group(self.is_token_in_rank)

    def _as_tuple(self) -> tuple:
        deepep = getattr(self.route, "deepep_tuple", None)
        if deepep is not None:
            return deepep(self)
        return (self.rank_prefix_matrix, self.channel_prefix_matrix, self.recv_channel_prefix_matrix,
                self.recv_src_idx, self.is_token_in_rank, self.send_head)

    def __getitem__(self, i):
        return self._as_tuple()[i]

    def __len__(self) -> int:
        return len(self._as_tuple())

    def __iter__(self):
        return iter(self._as_tuple())


@dataclass(frozen=True)
class LowLatencyHandle:
    """What LL combine needs; also answers DeepEP's 5-tuple indexing and unpacking.

    Tuple view: ``(recv_src_info, recv_layout_range, num_max_dispatch_tokens_per_rank, hidden,
    num_experts)``.

    Attributes:
        recv_src_info: ``[L, W*Q] int32``, token index within its source rank for each valid slot
            (``-1`` in slots past ``recv_count``).
        recv_layout_range: ``[L, W] int64``, per (local expert, source rank):
            low 32 bits = number of slots, high 32 bits = first slot.
        send_index: ``[W*Q] int64``, token sent in each send row (T = padding), see
            :func:`flexep.algorithms.low_latency.send_index`.
        recv_slot: ``[W*Q, K] int64``, flat slot ``l * W*Q + slot`` of each received (row, k), or
            ``L * W*Q`` when that expert is not local.
        topk_idx: ``[T, K] int64``, the dispatched routing (combine must use the same).

    Tensors are filled in place by the receive half, so a handle returned together with a
    receive hook is complete once the hook has run.
    """

    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    send_index: torch.Tensor = field(repr=False)
    recv_slot: torch.Tensor = field(repr=False)
    topk_idx: torch.Tensor = field(repr=False)
    num_ranks: int = 1
    owner: int = 0
    pending: Optional[object] = field(default=None, repr=False, compare=False)

    @property
    def received(self) -> bool:
        """False until the dispatch's receive hook has run (combine needs the filled handle)."""
        return self.pending is None or self.pending.done

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.size(0)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    def _as_tuple(self) -> tuple:
        return (self.recv_src_info, self.recv_layout_range, self.num_max_dispatch_tokens_per_rank,
                self.hidden, self.num_experts)

    def __getitem__(self, i):
        return self._as_tuple()[i]

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        return iter(self._as_tuple())


@dataclass(frozen=True)
class LLDispatchRequest:
    """One low-latency dispatch.

    Attributes:
        x: ``[T, H]`` bf16/fp16/fp32, ``T <= capacity``.
        topk_idx: ``[T, K] int64`` global expert ids, ``-1`` unused.
        capacity: Q, tokens per rank (equal on every rank).
        num_experts: E.
        use_fp8, round_scale, use_ue8m0: the wire format (see :mod:`flexep.quant`).
        cumulative_local_expert_recv_stats: ``[L]`` int, incremented by the receive counts.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    capacity: int
    num_experts: int
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LLCombineRequest:
    """One low-latency combine: ``x [L, W*Q, H]`` expert outputs in the dispatch's slots,
    ``topk_weights [T, K] float32``, ``out [T, H]`` written in place; ``use_logfmt`` sends the
    partial sums LogFMT-encoded (:mod:`flexep.algorithms.logfmt`, BF16 ``x`` only)."""

    x: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle
    out: torch.Tensor
    use_logfmt: bool = False


class NormalAlgorithm(Protocol):
    """A normal-mode (high-throughput) algorithm. The core calls, per dispatch:

    1. :meth:`extra` (local): per-rank values to publish in the control round (width
       :attr:`extra_width`), e.g. per-node token counts;
    2. :meth:`stage` (local): build the first hop's send rows, given this rank's counts; the
       core runs it while the round is in flight when the counts are known on the host already
       (CPU tensors), after it otherwise;
    3. :meth:`dispatch`: move the rows, given every rank's counts (the header).
    """

    name: str
    extra_width: int

    def extra(self, req: DispatchRequest) -> Optional[torch.Tensor]:
        """``[extra_width]`` int values on ``req.device`` to publish, or None."""

    def stage(self, req: DispatchRequest, sends: Sends) -> object:
        """Local preparation of the first hop (gather rows, pack metadata)."""

    def dispatch(self, req: DispatchRequest, staged: object, header: Header,
                 expert_counts: Optional[Sequence[int]]) -> Dispatched:
        """Move the staged rows; ``expert_counts``: this rank's per-local-expert receive counts."""

    def cached_dispatch(self, req: CachedDispatchRequest) -> Dispatched:
        """Replay ``req.handle``'s routing for new rows (no count exchange)."""

    def combine(self, req: CombineRequest) -> Combined:
        """Return rows along ``req.handle``'s routing and sum them per source token."""


class LowLatencyAlgorithm(Protocol):
    """A fixed-capacity (decode) algorithm: static shapes, no host read. Each call returns a
    pending object whose ``finish()`` waits for the exchange and fills the outputs in place."""

    name: str

    def dispatch(self, req: LLDispatchRequest) -> tuple[object, LowLatencyHandle]:
        """Launch the dispatch; returns ``(pending, handle)``."""

    def combine(self, req: LLCombineRequest) -> object:
        """Launch the combine; returns the pending half that fills ``req.out``."""


# ---- sync-free normal mode (DeepEP V2 ``do_cpu_sync=False``) --------------------------------
@dataclass(frozen=True)
class SyncFreeDispatchRequest:
    """A dispatch with static shapes and no host read: outputs have ``W * Q`` rows.

    Attributes:
        x: ``[T, H]`` float, or FP8 (``uint8``/e4m3) with ``scales`` (``T <= Q``).
        topk_idx: ``[T, K] int64`` global expert ids (``-1`` unused).
        num_experts: E.
        capacity: Q, tokens per rank (equal on every rank).
        scales: ``[T, S]`` 4-byte scale packs (float32 or int32), or None.
        topk_weights: ``[T, K] float32``, or None.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_experts: int
    capacity: int
    scales: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SyncFreeHandle:
    """Routing of a sync-free dispatch; every count lives on the device.

    Received rows are grouped by source rank in rank order, source token order inside (rows
    ``[0, recv_counts.sum())`` valid, the rest padding). Each source s sends a block of
    ``blocks[s]`` rows to every rank (its tokens in order, unrouted ones as padding).

    Attributes:
        topk_idx: ``[T, K] int64``, this rank's routing.
        recv_pos: ``[sum(blocks)] int64``, output row of each staged received row (``W * Q``
            where that row was not routed here).
        recv_src_rank, recv_src_idx: ``[W * Q] int32``, source rank and token of each output
            row (``-1`` in padding).
        recv_counts: ``[W] int64``, tokens received from each source.
        expert_counts: ``[L] int64``, (token, slot) pairs received per local expert.
        blocks: rows per source block (host). capacity: Q. rank, num_experts, owner.
    """

    topk_idx: torch.Tensor = field(repr=False)
    recv_pos: torch.Tensor = field(repr=False)
    recv_src_rank: torch.Tensor = field(repr=False)
    recv_src_idx: torch.Tensor = field(repr=False)
    recv_counts: torch.Tensor
    expert_counts: torch.Tensor
    blocks: tuple
    capacity: int
    rank: int
    num_experts: int
    owner: int = 0

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.size(0)

    @property
    def num_rows(self) -> int:
        """Rows of every dispatch output: ``W * Q``."""
        return self.recv_src_idx.size(0)


@dataclass(frozen=True)
class SyncFreeCachedRequest:
    """Replay ``handle``'s routing for new rows ``x: [T, H]`` (and ``scales``, ``topk_weights``)."""

    x: torch.Tensor
    handle: SyncFreeHandle
    scales: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SyncFreeCombineRequest:
    """Return ``x: [W * Q, H']`` rows (``topk_weights [W * Q, K]``) to their sources and reduce
    them per :class:`SlotOrder` (plus ``bias``: tensors ``[T, H']``)."""

    x: torch.Tensor
    handle: SyncFreeHandle
    slot_order: SlotOrder
    topk_weights: Optional[torch.Tensor] = None
    bias: tuple = ()


class SyncFreeAlgorithm(Protocol):
    """Normal mode with static shapes (DeepEP V2 ``do_cpu_sync=False``): no host read, so the
    call can be captured in a CUDA graph. ``blocks`` (host) are the rows each source sends."""

    name: str

    def dispatch(self, req: SyncFreeDispatchRequest, blocks: Sequence[int]) -> Dispatched:
        """Outputs of ``W * Q`` rows; ``Dispatched.handle`` is a :class:`SyncFreeHandle`."""

    def cached_dispatch(self, req: SyncFreeCachedRequest) -> Dispatched:
        """Replay the handle's routing for new rows."""

    def combine(self, req: SyncFreeCombineRequest) -> Combined:
        """Return rows along the handle's routing and reduce them per the slot order."""
