"""Fetch and reduce of expert rows (flexep.moe.weights) against a single-process oracle.

World 2 and 4 (two virtual nodes of two at world 4, so both link classes carry bytes). Every
rank owns rank-stamped rows under global ids; random requests repeat ids, name the rank itself
as owner, and leave some ranks with nothing to ask. The oracle below is written with plain
loops from all ranks' inputs; the bytes each rank sends must equal the minimum counted here from
the requests alone.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.distributed as dist

from flexep.core import Communicator, Options
from flexep.errors import RemoteInputError
from flexep.launch import run_local
from flexep.moe.weights import FetchPlan, fetch_rows, plan_fetch, plan_reduce, reduce_rows

ROWS_PER_RANK = 5


def _owned(rank: int) -> list[int]:
    """Global ids of rank's rows: ``100 * rank + j``, the last id repeated (its first row wins)."""
    ids = [100 * rank + j for j in range(ROWS_PER_RANK - 1)]
    return ids + [ids[-1]]


def _rows(rank: int) -> list[torch.Tensor]:
    """Two tensors per rank: float32 [n, 6] and bfloat16 [n, 2, 3], stamped with (rank, row)."""
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(ROWS_PER_RANK, 6, generator=gen)
    a[:, 0], a[:, 1] = rank, torch.arange(ROWS_PER_RANK).float()
    b = torch.randn(ROWS_PER_RANK, 2, 3, generator=gen).bfloat16()
    return [a, b]


def _requests(rank: int, world: int, seed: int) -> tuple[list[int], list[int]]:
    """Random (ids, owners); rank 1 asks for nothing in every other seed."""
    rng = random.Random(seed * 100 + rank)
    if rank == 1 and seed % 2:
        return [], []
    want, owners = [], []
    for _ in range(rng.randint(1, 9)):
        owner = rng.randrange(world)
        want.append(rng.choice(_owned(owner)))
        owners.append(owner)
    return want, owners


def _contributions(rank: int, world: int, seed: int) -> tuple[list[int], list[int], list[torch.Tensor]]:
    ids, owners = _requests(rank, world, seed + 7)
    gen = torch.Generator().manual_seed(1000 + rank)
    rows = [torch.randn(len(ids), 6, generator=gen), torch.randn(len(ids), 2, 3, generator=gen).bfloat16()]
    return ids, owners, rows


def _comm(world: int) -> Communicator:
    return Communicator(dist.group.WORLD, Options(ranks_per_node=2 if world == 4 else world))


def _exchange(rank: int, world: int, seeds) -> dict:
    comm = _comm(world)
    out = {}
    for seed in seeds:
        want, owners = _requests(rank, world, seed)
        plan = plan_fetch(comm, _owned(rank), want, owners)
        fetched = fetch_rows(comm, _rows(rank), plan)
        fetch_traffic = comm.last_traffic
        single = fetch_rows(comm, _rows(rank)[0], plan)  # one tensor in, one tensor out
        ids, c_owners, contrib = _contributions(rank, world, seed)
        rplan = plan_reduce(comm, _owned(rank), ids, c_owners)
        reduced = reduce_rows(comm, _rows(rank), contrib, rplan)
        out[seed] = dict(fetched=fetched, single=single, fetch_payload=dict(fetch_traffic.payload),
                         fetch_minimum=dict(fetch_traffic.minimum), reduced=reduced,
                         reduce_payload=dict(comm.last_traffic.payload))
    return out


def _fetch_oracle(rank: int, world: int, seed: int) -> list[torch.Tensor]:
    want, owners = _requests(rank, world, seed)
    out = [[], []]
    for i, o in zip(want, owners):
        row = _owned(o).index(i)
        for k in range(2):
            out[k].append(_rows(o)[k][row])
    return [torch.stack(rows) if rows else _rows(rank)[k][:0] for k, rows in enumerate(out)]


def _reduce_oracle(rank: int, world: int, seed: int) -> list[torch.Tensor]:
    """Own row, then contributions by source rank and position, summed in float32, rounded once."""
    mine = _owned(rank)
    result = []
    for k, t in enumerate(_rows(rank)):
        acc = t.float().clone()
        for source in range(world):
            ids, owners, rows = _contributions(source, world, seed)
            for pos, (i, o) in enumerate(zip(ids, owners)):
                if o == rank:
                    acc[mine.index(i)] += rows[k][pos].float()
        result.append(acc.to(t.dtype))
    return result


def _bytes_minimum(rank: int, world: int, seed: int, kind: str) -> dict:
    """Row bytes each peer must get from ``rank``: distinct ids it asked (fetch) or each row
    ``rank`` contributes to it (reduce), per link class (world 4: nodes {0, 1} and {2, 3})."""
    row_bytes = 6 * 4 + 6 * 2
    out = {"intra": 0, "inter": 0}
    for peer in range(world):
        if peer == rank:
            continue
        if kind == "fetch":
            want, owners = _requests(peer, world, seed)
            n = len({i for i, o in zip(want, owners) if o == rank})
        else:
            _, owners, _ = _contributions(rank, world, seed)
            n = sum(o == peer for o in owners)
        out["intra" if peer // 2 == rank // 2 else "inter"] += n * row_bytes
    return out


def _error_case(comm: Communicator, rank: int, world: int, case: str) -> str:
    try:
        if case == "owner_lacks_id":  # rank 0 asks rank 1 for an id rank 1 does not own
            plan_fetch(comm, _owned(rank), [999] if rank == 0 else [], [1] if rank == 0 else [])
        elif case == "bad_owner":
            plan_fetch(comm, _owned(rank), [100] if rank == 1 else [], [world] if rank == 1 else [])
        elif case == "wrong_rows":
            plan = plan_fetch(comm, _owned(rank), [], [])
            fetch_rows(comm, _rows(rank)[0][:2] if rank == 0 else _rows(rank)[0], plan)
        elif case == "reduce_dtype":
            plan = plan_reduce(comm, _owned(rank), [], [])
            reduce_rows(comm, _rows(rank)[0], torch.zeros(0, 6, dtype=torch.float64), plan)
        elif case == "other_communicator":
            plan = plan_fetch(comm, _owned(rank), [], [])
            fetch_rows(_comm(world), _rows(rank)[0], plan)
        elif case == "not_a_plan":
            fetch_rows(comm, _rows(rank)[0], FetchPlan(0, 0, (), (), (), (), ()))
        else:
            raise AssertionError(case)
    except RemoteInputError as exc:
        return f"remote: {exc}"
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


ERROR_CASES = [
    ("owner_lacks_id", 1, r"ValueError: plan_fetch: rank 1 was named as the owner of ids it does not hold "
                          r"\(rank 0 asked for \[999\]\)"),
    ("bad_owner", 1, r"ValueError: owners must be ranks in \[0, 2\), got \[2\]"),
    ("wrong_rows", 0, r"ValueError: rows must have 5 rows \(the plan's\), got shape \(2, 6\)"),
    ("reduce_dtype", 0, r"ValueError: contrib\[0\] must match rows\[0\] in dtype"),
    ("other_communicator", 0, r"ValueError: plan was made by another communicator"),
    ("not_a_plan", 0, r"ValueError: plan was made by another communicator"),
]
SEEDS = (0, 1, 2)


def _worker(rank: int, world: int) -> dict:
    out = _exchange(rank, world, SEEDS)
    if world == 2:  # errors are collective: the communicator stays usable after each
        comm = _comm(world)
        out["errors"] = {case: _error_case(comm, rank, world, case) for case, _, _ in ERROR_CASES}
        want, owners = _requests(rank, world, 0)
        out["after_errors"] = fetch_rows(comm, _rows(rank), plan_fetch(comm, _owned(rank), want, owners))
    return out


@pytest.fixture(scope="module")
def runs():
    return {world: run_local(_worker, world, timeout=120) for world in (2, 4)}


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 4])
def test_fetch_and_reduce_match_the_oracle_with_minimum_bytes(runs, world):
    results, seeds = runs[world], SEEDS
    for rank, res in enumerate(results):
        for seed in seeds:
            got, expected = res[seed], _fetch_oracle(rank, world, seed)
            for k in range(2):
                assert got["fetched"][k].dtype == expected[k].dtype
                assert torch.equal(got["fetched"][k], expected[k]), f"rank {rank} seed {seed} fetch {k}"
            assert torch.equal(got["single"], expected[0])
            for k, want in enumerate(_reduce_oracle(rank, world, seed)):
                assert torch.equal(got["reduced"][k], want), f"rank {rank} seed {seed} reduce {k}"
            for kind in ("fetch", "reduce"):
                minimum = _bytes_minimum(rank, world, seed, kind)
                payload = got[f"{kind}_payload"]
                assert {c: payload[c] for c in ("intra", "inter")} == minimum, (rank, seed, kind)
                assert payload["local"] == 0
            assert {c: got["fetch_minimum"][c] for c in ("intra", "inter")} == _bytes_minimum(
                rank, world, seed, "fetch")
    assert any(results[r][s]["fetch_payload"]["inter"] for r in range(world) for s in seeds) == (world == 4)




@pytest.mark.ranks
@pytest.mark.parametrize("case,rank,message", ERROR_CASES)
def test_errors_raise_on_every_rank_naming_the_argument(runs, case, rank, message):
    world, results = 2, runs[2]
    assert re.search(message, results[rank]["errors"][case]), results[rank]["errors"][case]
    for other in range(world):
        text = results[other]["errors"][case]
        if other != rank and case not in ("reduce_dtype", "other_communicator", "not_a_plan"):
            assert text.startswith("remote:"), (other, text)
    for r in range(world):
        assert all(torch.equal(a, b) for a, b in zip(results[r]["after_errors"], _fetch_oracle(r, world, 0)))
