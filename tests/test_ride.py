"""Small payloads that ride in the control round (``ControlPlane.round(ride=...)``).

Checked on 4 Gloo ranks: once the ranks have agreed a ride size, a small dispatch and a small
combine each make one exchange and give the same bytes as the same calls made with their own
payload exchange; a rank whose rows do not fit sends everyone back to the exchange; a mismatch
or a bad input while riding still raises on every rank and leaves the Buffer usable.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexep
from flexep.comm.control import RIDE_MAX
from flexep.errors import RankMismatchError, RemoteInputError
from flexep.launch import run_local

pytestmark = pytest.mark.ranks

EXPERTS, TOPK, HIDDEN = 32, 4, 64


def _inputs(rank: int, step: int, tokens: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    topk = torch.rand(tokens, EXPERTS, generator=gen).topk(TOPK, 1).indices
    return x, topk, torch.rand(tokens, TOPK, generator=gen)


class _Counted:
    """Counts ``all_to_all_single`` calls (every exchange and round on Gloo is one)."""

    def __init__(self) -> None:
        self.calls, self._orig = 0, dist.all_to_all_single

    def __enter__(self):
        def counted(*args, **kw):
            self.calls += 1
            return self._orig(*args, **kw)
        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._orig


def _round_trip(buf, x, topk, w):
    lay = buf.get_dispatch_layout(topk, EXPERTS)
    with _Counted() as d:
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
            topk_idx=topk, topk_weights=w)
    dispatched = buf.last_traffic
    y = recv_x.float().mul(1.5).to(torch.bfloat16)  # a stand-in expert
    with _Counted() as c:
        out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w)
    return dict(recv=(recv_x, recv_idx, recv_w, counts), out=(out, out_w), exchanges=(d.calls, c.calls),
                ratio=(dispatched.ratio(), buf.last_traffic.ratio()))


def _steps(rank: int, world: int) -> dict:
    # Step 2: rank 2 has far more tokens, so its largest block outgrows the agreed ride size.
    tokens = {0: 12, 1: 9, 2: 12, 3: 10}
    big = {2: (RIDE_MAX // (2 * HIDDEN)) * 4}
    riding = flexep.Buffer(dist.group.WORLD, timeout=60)
    plain = flexep.Buffer(dist.group.WORLD, timeout=60, verify=True)  # verified: nothing rides
    out = {}
    for step in range(4):
        n = big.get(rank, tokens[rank]) if step == 2 else tokens[rank]
        args = _inputs(rank, step if step == 2 else 0, n)
        out[step] = dict(riding=_round_trip(riding, *args), plain=_round_trip(plain, *args))
    return out


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_small_calls_ride_and_give_the_same_bytes():
    got = run_local(_steps, 4, timeout=180)
    for rank, steps in enumerate(got):
        for step, run in steps.items():
            r, p = run["riding"], run["plain"]
            assert _same(r["recv"], p["recv"]) and _same(r["out"], p["out"]), (rank, step)
            assert r["ratio"] == (1.0, 1.0), (rank, step, r["ratio"])  # rode bytes count as payload
        # First call: counts, per-expert counts and payload; nothing has a ride size yet.
        assert steps[0]["riding"]["exchanges"][0] >= 2, steps[0]["riding"]["exchanges"]
        # Once agreed, a small dispatch and a small combine are one exchange each.
        assert steps[1]["riding"]["exchanges"] == (1, 1), steps[1]["riding"]["exchanges"]
        assert steps[3]["riding"]["exchanges"] == (1, 1), steps[3]["riding"]["exchanges"]
        # Rank 2's rows did not fit: every rank moved its rows in payload exchanges.
        assert min(steps[2]["riding"]["exchanges"]) >= 2, steps[2]["riding"]["exchanges"]


def _faults(rank: int, world: int) -> dict:
    buf = flexep.Buffer(dist.group.WORLD, timeout=30)
    args = _inputs(rank, 0, 8)
    first = _round_trip(buf, *args)
    second = _round_trip(buf, *args)  # rides
    lay = buf.get_dispatch_layout(args[1], EXPERTS)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        args[0], num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
        topk_idx=args[1], topk_weights=args[2])
    report = {}
    # Rank 1 skips a dispatch: it combines while the others dispatch; both sides' rows ride.
    try:
        if rank == 1:
            buf.combine(recv_x, handle, topk_weights=recv_w)
        else:
            buf.dispatch(args[0], num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                         num_tokens_per_expert=lay[2], topk_idx=args[1], topk_weights=args[2])
        report["skip"] = "no error"
    except RankMismatchError as e:
        report["skip"] = ("RankMismatchError", list(e.ranks))
    # Rank 3 passes rows of the wrong width to combine: it raises, the others are told.
    try:
        x = recv_x[:, : HIDDEN // 2].contiguous() if rank == 3 else recv_x
        buf.combine(x[:-1] if rank == 3 else x, handle, topk_weights=recv_w)
        report["bad"] = "no error"
    except RemoteInputError as e:
        report["bad"] = ("RemoteInputError", list(e.ranks))
    except ValueError:
        report["bad"] = ("ValueError",)
    report["after"] = _same(_round_trip(buf, *args)["out"], second["out"])
    report["rode"] = second["exchanges"]
    report["first_equal"] = _same(first["out"], second["out"])
    return report


def test_mismatch_and_bad_input_while_riding_raise_everywhere():
    got = run_local(_faults, 4, timeout=180)
    for rank, rep in enumerate(got):
        assert rep["rode"] == (1, 1) and rep["first_equal"], rep
        assert rep["skip"] == ("RankMismatchError", [1]), (rank, rep)
        assert rep["bad"] == (("ValueError",) if rank == 3 else ("RemoteInputError", [3])), (rank, rep)
        assert rep["after"], rep  # the Buffer is usable and gives the same results
