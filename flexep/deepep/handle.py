"""``EPHandle``: DeepEP V2's dispatch handle, with flexep's routing state inside.

Fields are plain, writable attributes in DeepEP's constructor order (DeepEP's own test assigns
``handle.recv_src_metadata``). What they hold here (R = W*T rows without CPU sync, the exact
count with it; shape legend of :mod:`flexep.algorithms.contract`, T = ``num_max_tokens_per_rank``):

* ``recv_src_metadata: [rows, K + 2] int32``: column 0 ``src_rank * T + src_token`` (the
  source's global token id); column 1 ``src_rank * K + k`` with k the token's last local slot;
  columns ``2..`` the expanded row of each slot (``-1`` where not local, and in non-expanded
  mode). Rows past the valid count (no CPU sync) hold ``-1``.
* ``psum_num_recv_tokens_per_scaleup_rank: [S_u] int32``: inclusive prefix sums of the tokens
  received per source scale-up index (per source rank on one node); the last entry is the
  valid row count, on the device.
* ``psum_num_recv_tokens_per_expert: [L] int32``: non-expanded, inclusive prefix sums of the
  aligned per-expert counts; expanded, the end row of each expert's valid rows.
* ``num_unaligned_recv_tokens_per_expert: [L] int32``: (token, slot) pairs per local expert.
* ``num_recv_tokens_per_expert_list``: aligned counts as Python ints (``[]`` without CPU sync).
* ``dst_buffer_slot_idx: [N, K] int32``: where each sent (token, slot) was staged at its
  destination (``-1`` for unused slots); private routing state, equal for a dispatch and its
  cached replay. ``token_metadata_at_forward`` and ``channel_linked_list`` are None.

``topk_idx`` is the dispatching rank's routing. In V2.5 (``EPBuffer``) it is the caller's tensor
and reading it checks that it was not modified in place since the dispatch (as DeepEP does);
in V2.0 it is a copy unless ``do_handle_copy=False``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["EPHandle"]


class EPHandle:
    """DeepEP V2's ``EPHandle`` (see the module docstring for every field)."""

    def __init__(self, do_expand: bool, num_experts: int, expert_alignment: int, num_max_tokens_per_rank: int,
                 num_sms: int, topk_idx: torch.Tensor, num_recv_tokens: int, num_expanded_tokens: int,
                 num_recv_tokens_per_expert_list: list, psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
                 psum_num_recv_tokens_per_expert: torch.Tensor,
                 num_unaligned_recv_tokens_per_expert: torch.Tensor, recv_src_metadata: torch.Tensor,
                 dst_buffer_slot_idx: torch.Tensor, token_metadata_at_forward: Optional[torch.Tensor] = None,
                 channel_linked_list: Optional[torch.Tensor] = None) -> None:
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self._topk_idx = topk_idx
        self._topk_version: Optional[int] = None
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.cached_recv_src_metadata_before_sort: Optional[torch.Tensor] = None
        # flexep's state: the core handle, the expansion plan, the received local ids, the owner.
        self.core = None
        self.plan = None
        self.recv_topk_idx: Optional[torch.Tensor] = None
        self.owner: Optional[object] = None
        self.sync_free = False

    def track_version(self) -> None:
        """V2.5: from now on, reading ``topk_idx`` checks it was not modified in place."""
        t = self._topk_idx
        self._topk_version = None if t.is_inference() else t._version

    @property
    def topk_idx(self) -> torch.Tensor:
        """``[N, K]`` routing of the dispatch that made this handle."""
        t = self._topk_idx
        if self._topk_version is not None and t._version != self._topk_version:
            raise RuntimeError("topk_idx was modified in place after the dispatch that made this handle; "
                               "combine and cached dispatch need the routing as dispatched (pass a copy to "
                               "dispatch if you reuse the tensor)")
        return t

    @topk_idx.setter
    def topk_idx(self, value: torch.Tensor) -> None:
        self._topk_idx, self._topk_version = value, None

    @property
    def num_tokens(self) -> int:
        return self._topk_idx.size(0)

    def __repr__(self) -> str:
        return (f"EPHandle(do_expand={self.do_expand}, num_experts={self.num_experts}, "
                f"expert_alignment={self.expert_alignment}, num_max_tokens_per_rank="
                f"{self.num_max_tokens_per_rank}, num_recv_tokens={self.num_recv_tokens}, "
                f"num_expanded_tokens={self.num_expanded_tokens}, sync_free={self.sync_free})")
