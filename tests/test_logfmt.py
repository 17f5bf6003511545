"""LogFMT (``low_latency_combine(..., use_logfmt=True)``): the format against DeepEP's kernel
(worked examples evaluated from ``internode_ll.cu``'s formulas), its rules, and the combine.

The worked examples are the spec's (``logfmt_encode`` in DeepEP at 567632d, evaluated in
float32): the codes, the five little-endian words of the first 20-byte group, the metadata
bytes and the decoded values. DeepEP's own low-latency test with ``--use-logfmt`` runs on two
Gloo ranks (:func:`test_deepep_compat.low_latency_main`), and the bytes on the wire drop to
``H/32 + 1.25 H`` per row.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_deepep_compat import init_dist, low_latency_main

import flexep
from flexep.algorithms import logfmt
from flexep.launch import run_local

EXAMPLE = [0.5, -0.25, 0.10009766, 2.0 ** -10, 0.30078125, -0.30078125, 0.010009766, 0.0625, -0.0019989014,
           0.20019531, 0.49023438, 0.0019989014, -0.125, 2.0 ** -10, 0.33007812, -0.010009766]
CODES_A = [511, 454, 380, 1, 469, 469, 191, 341, 60, 436, 509, 60, 398, 1, 477, 191]
DECODED_A = [0.50000012, -0.24898280, 0.10070697, 0.0009765625, 0.29912573, -0.29912573, 0.0099778278,
             0.062500007, -0.0020096735, 0.19977820, 0.48791653, 0.0020096735, -0.12551074, 0.0009765625,
             0.32987705, -0.0099778278]
WORDS_A = [0x0DF38DFF, 0xAFFABD50, 0xF7683CAA, 0x4038E1E7, 0x91225FF7]
WORDS_B = [0x876BDFFF, 0xE97E600B, 0xFFD400E7, 0x6D3DFC07, 0x9122D2FD]


def _row(first: list, rest_lo: float, rest_hi: float, hidden: int = 2048) -> torch.Tensor:
    """One BF16 row: ``first`` opens division 0, the rest uniform in ``[rest_lo, rest_hi]``."""
    g = torch.Generator().manual_seed(7)
    row = torch.rand(hidden, generator=g) * (rest_hi - rest_lo) + rest_lo
    row[:len(first)] = torch.tensor(first)
    return row.to(torch.bfloat16).view(1, -1)


def _group_words(enc: torch.Tensor, hidden: int, group: int = 0) -> list:
    start = hidden // 32 + 20 * group
    return [w & 0xFFFFFFFF for w in enc[0, start:start + 20].view(torch.int32).tolist()]


def test_row_bytes_match_deepep_all_cast_sizes():
    # DeepEP's message when every stage is cast; the benchmark's H*10/8 + H/128*4.
    sizes = {2048: 2624, 2560: 3280, 3072: 3936, 4096: 5248, 5120: 6560, 6144: 7872, 7168: 9184, 8192: 10496}
    for hidden, nbytes in sizes.items():
        assert logfmt.row_bytes(hidden) == nbytes == hidden * 10 // 8 + hidden // 128 * 4
    with pytest.raises(ValueError, match="multiple of 128"):
        logfmt.row_bytes(100)


def test_worked_example_a():
    x = _row(EXAMPLE, 0.001, 0.4)
    assert x[0, 16:128].float().min() > 2.0 ** -10 and x[0, 16:128].float().max() < 0.5
    enc = logfmt.encode(x)
    assert enc.shape == (1, logfmt.row_bytes(2048)) and enc.dtype == torch.uint8
    assert enc[0, :4].tolist() == [0x00, 0x3F, 0x80, 0x3A]  # amax 0.5, amin 2^-10 as bf16 LE
    words = _group_words(enc, 2048)
    assert words == WORDS_A, [hex(w) for w in words]
    codes = [((sum(w << (32 * i) for i, w in enumerate(words))) >> (9 * j)) & 0x1FF for j in range(16)]
    assert codes == CODES_A
    assert words[4] >> 16 == 0x9122  # sign bits of values 1, 5, 8, 12, 15
    dec = logfmt.decode(enc, 2048)
    torch.testing.assert_close(dec[0, :16], torch.tensor(DECODED_A), rtol=2e-7, atol=0)
    assert torch.equal(logfmt.castable(x[0, :128].abs().amax().view(1), x[0, :128].abs().amin().view(1)),
                       torch.tensor([True]))


def test_worked_example_b_zero_clips_the_range():
    first = list(EXAMPLE)
    first[4], first[8] = 0.0, -0.0
    x = _row(first, -0.3, 0.3)
    enc = logfmt.encode(x)
    assert enc[0, :4].tolist() == [0x00, 0x3F, 0x00, 0x00]  # amin 0: Lmin = Lmax - 32
    words = _group_words(enc, 2048)
    # The spec's word 3 gives value 13 (2^-10, as value 3) code 361 where value 3 has 368: one
    # value, two codes, so that code is a slip of the spec; every other bit matches.
    code = [((sum(w << (32 * i) for i, w in enumerate(words))) >> (9 * j)) & 0x1FF for j in range(16)]
    assert code[3] == code[13] == 368 and code[1] == 495 and code[10] == 511 and code[4] == code[8] == 0
    assert [words[i] for i in (0, 1, 2, 4)] == [WORDS_B[i] for i in (0, 1, 2, 4)]
    assert words[3] & ~(0x1FF << 21) == WORDS_B[3] & ~(0x1FF << 21)
    dec = logfmt.decode(enc, 2048)[0, :16]
    assert dec[4].item() == 0.0 and dec[8].item() == 0.0
    assert torch.signbit(dec[8]) and not torch.signbit(dec[4])  # -0.0 keeps its sign
    # (the spec prints 0.00099532 to five digits)
    torch.testing.assert_close(dec[[10, 1, 3]], torch.tensor([0.50000066, -0.24932167, 0.00099532]),
                               rtol=5e-6, atol=0)


def test_round_trip_error_on_castable_rows():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 7168, generator=g) * 0.1).to(torch.bfloat16)
    amax = x.float().abs().view(64, -1, 128).amax(-1)
    amin = x.float().abs().view(64, -1, 128).amin(-1)
    assert logfmt.castable(amax.bfloat16(), amin.bfloat16()).all()
    dec = logfmt.decode(logfmt.encode(x), 7168)
    rel = ((dec - x.float()).abs() / x.float().abs().clamp_min(1e-30))
    nonzero = x != 0
    # Half a step of the log grid: 2^(step/2) - 1 with step = (Lmax - Lmin) / 510 <= 32 / 510.
    assert rel[nonzero].max() < 2 ** (32 / 510 / 2) - 1
    assert rel[nonzero].pow(2).mean().sqrt() < 0.006  # DeepEP's spec: RMS 0.37 %


def test_divisions_deepep_sends_raw():
    """DeepEP's fallback rule (castable iff every |x| < 1 and not all equal), and what the
    fixed-size rows carry instead: zero and constant divisions exactly, |x| >= 1 on the log grid,
    a non-finite value as a NaN division."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(6, 128, generator=g) * 0.4 + 0.01
    base[0] = 0.0  # all zero
    base[1] = -0.0078125  # constant magnitude (signs may differ)
    base[1, ::3] = 0.0078125
    base[2, 5] = 1.5  # one value >= 1
    base[3, 7] = float("inf")
    base[4, 9] = float("nan")
    x = base.to(torch.bfloat16).view(1, -1)  # 6 divisions of one row (hidden 768)
    mags = x.float().abs().view(6, 128)
    amax, amin = torch.nan_to_num(mags, nan=0.0).amax(1), mags.amin(1)
    assert logfmt.castable(amax.bfloat16(), amin.bfloat16()).tolist() == [False] * 5 + [True]
    dec = logfmt.decode(logfmt.encode(x), 768).view(6, 128)
    assert torch.equal(dec[0], x.float().view(6, 128)[0]) and torch.signbit(dec[0]).sum() == 0
    assert torch.equal(dec[1], x.float().view(6, 128)[1])  # exact, signs included
    big = x.float().view(6, 128)[2]
    assert ((dec[2] - big).abs() <= (2 ** (32 / 510 / 2) - 1) * big.abs()).all()
    assert torch.isnan(dec[3]).all() and torch.isnan(dec[4]).all()
    assert not torch.isnan(dec[5]).any()


def test_zeros_do_not_widen_the_grid_of_raw_divisions():
    """A division DeepEP sends raw keeps its precision when it holds zeros: its grid starts at the
    smallest non-zero magnitude (a castable one keeps DeepEP's ``Lmax - 32``), zeros stay zero, and
    constant non-zero magnitudes with zeros come back exactly."""
    g = torch.Generator().manual_seed(2)
    base = torch.rand(3, 128, generator=g) * 1.45 + 0.05  # |x| in [0.05, 1.5]: not castable
    base[0, ::5] = 0.0
    base[1] = 1.25
    base[1, ::4] = 0.0
    base[1, 1::4] = -1.25  # constant non-zero magnitude >= 1, with zeros: not castable
    base[2] = base[2] * 0.5  # every |x| < 1, with a zero: castable, DeepEP's clip
    base[2, 3] = 0.0
    x = base.to(torch.bfloat16).view(1, -1)
    enc = logfmt.encode(x)
    dec = logfmt.decode(enc, 384).view(3, 128)
    ref = x.float().view(3, 128)
    assert torch.equal(dec[ref == 0], ref[ref == 0])
    nonzero = ref[0] != 0
    tight = torch.log2(ref[0, nonzero].abs().max() / ref[0, nonzero].abs().min()) / 510
    assert ((dec[0] - ref[0]).abs() <= (2 ** (tight / 2) - 1) * ref[0].abs() * 1.0001).all()
    assert torch.equal(dec[1], ref[1])
    meta = enc[0, :12].view(torch.bfloat16).view(3, 2)  # (amax, amin) per division
    assert meta[0, 1] == x.view(3, 128)[0][nonzero].abs().min() and meta[2, 1] == 0
    rel = ((dec[2] - ref[2]).abs() / ref[2].abs())[ref[2] != 0]
    assert rel.max() > 2 ** (tight / 2) - 1  # castable: the wide grid, as DeepEP codes it


def test_encode_checks_its_input():
    with pytest.raises(TypeError, match="bfloat16"):
        logfmt.encode(torch.zeros(1, 128))


# ---- the combine ------------------------------------------------------------------------------
def _deepep_logfmt(local_rank: int, num_local_ranks: int) -> dict:
    rank, num_ranks, group = init_dist(local_rank, num_local_ranks)
    num_tokens, hidden, num_topk, num_experts = 16, 2048, 8, 32
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, num_ranks, num_experts)
    buffer = flexep.Buffer(group, num_rdma_bytes=hint, low_latency_mode=True,
                           num_qps_per_rank=num_experts // num_ranks, explicitly_destroy=True)
    cases, ref_hash = low_latency_main(num_tokens, hidden, num_experts, num_topk, rank, num_ranks, group,
                                       buffer, use_logfmt=True, seed=1)
    again = low_latency_main(num_tokens, hidden, num_experts, num_topk, rank, num_ranks, group, buffer,
                             use_logfmt=True, seed=1)[1]
    # Bytes on the wire: combine rows LogFMT-encoded vs BF16, same routing.
    x = torch.randn(num_tokens, hidden, dtype=torch.float32).to(torch.bfloat16) * 0.1
    topk = torch.stack([torch.randperm(num_experts)[:num_topk] for _ in range(num_tokens)])
    w = torch.rand(num_tokens, num_topk, dtype=torch.float32)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, topk, num_tokens, num_experts, use_fp8=False)
    sent = {}
    for use_logfmt in (False, True):
        buffer.low_latency_combine(recv, topk, w, handle, use_logfmt=use_logfmt)
        stats = buffer.last_traffic
        sent[use_logfmt] = (stats.payload["intra"] + stats.payload["inter"], stats.minimum["intra"])
    buffer.destroy()
    dist.barrier()
    return dict(cases=cases, same_hash=again == ref_hash, sent=sent)


@pytest.mark.timeout(300)
def test_deepep_low_latency_test_with_use_logfmt():
    results = run_local(_deepep_logfmt, 2, timeout=280)
    num_tokens, hidden, num_topk = 16, 2048, 8
    weights_frame = num_tokens * (4 * num_topk + 32)  # per peer: K float32 + the call header per row
    for res in results:
        # 6 inputs (structured, 4 random for LogFMT, perf) x 2 hooks x 4 FP8 modes, zero_copy off
        assert res["cases"] == 6 * 2 * 4 and res["same_hash"]
        bf16, logfmt_bytes = res["sent"][False], res["sent"][True]
        assert bf16[0] == weights_frame + num_tokens * 2 * hidden  # Q rows per peer, 2H bytes each
        assert logfmt_bytes[0] == weights_frame + num_tokens * logfmt.row_bytes(hidden)
        assert logfmt_bytes[1] * 2 * hidden == bf16[1] * logfmt.row_bytes(hidden)  # the minimum follows
