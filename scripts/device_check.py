"""A one-run check of flexep on a real accelerator (one GPU or NPU is enough).

Run ``bash scripts/device_check.sh`` on a machine with an accelerator. Without one it says so
and exits 0 (the same checks run on the CPU with ``--device cpu``, which the test suite does so
that the script never rots). In under five minutes it:

1. joins a world-1 process group with the device's backend (NCCL, HCCL, XCCL);
2. runs normal dispatch, cached dispatch, combine, low-latency dispatch and combine (BF16 and
   FP8) and a ``MoELayer`` forward (normal and low-latency) on device tensors, and compares
   every result with :mod:`flexep.reference` on the host;
3. captures low-latency dispatch + combine in a CUDA graph (CUDA only), replays it on new
   inputs and compares the replay with the eager result;
4. times the local passes (row gather, combine's reduction, FP8 cast) in GB/s next to the
   device's own copy bandwidth.

It prints a table and writes ``device_check.json`` (``--json PATH``). Exit status 1 if any
comparison fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import flexep
from flexep.algorithms.reduce import sum_blocks
from flexep.device import backend_for, default_device
from flexep.launch import free_port
from flexep.quant import per_token_cast_back, per_token_cast_to_fp8
from flexep.reference import ref_combine, ref_dispatch, ref_ll_combine, ref_ll_dispatch

T, H, E, K = 256, 1024, 32, 4  # the correctness shapes: small enough for seconds, large enough
LL_Q = 64


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def check_normal(dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).bfloat16()
    topk = torch.rand(T, E, generator=gen).topk(K, 1).indices
    w = torch.rand(T, K, generator=gen)
    buf = flexep.Buffer(dist.group.WORLD, timeout=60)
    lay = buf.get_dispatch_layout(topk.to(dev), E)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x.to(dev), num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
        topk_idx=topk.to(dev), topk_weights=w.to(dev))
    ref = ref_dispatch([x], [topk], E, [w])[0]
    cached, *_ = buf.dispatch(x.to(dev), handle=handle)
    y = recv_x.float() * 2.0
    combined, combined_w, _ = buf.combine(y.bfloat16(), handle, topk_weights=recv_w)
    want, want_w = ref_combine([y.bfloat16().cpu()], [ref], [T], [ref.recv_topk_weights])[0]
    fp8 = per_token_cast_to_fp8(x.float())
    recv_fp8, *_ = buf.dispatch((fp8[0].to(dev), fp8[1].to(dev)), num_tokens_per_rank=lay[0],
                                is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
    return {
        "device outputs": all(t.device == dev for t in (recv_x, recv_idx, recv_w, combined, cached)),
        "dispatch rows": torch.equal(recv_x.cpu(), ref.recv_x),
        "dispatch top-k": torch.equal(recv_idx.cpu(), ref.recv_topk_idx)
        and torch.equal(recv_w.cpu(), ref.recv_topk_weights),
        "per-expert counts": counts == ref.num_recv_tokens_per_expert,
        "cached dispatch": torch.equal(cached.cpu(), ref.recv_x),
        "combine": _close(combined, want, 1e-2) and _close(combined_w, want_w, 1e-6),
        "FP8 dispatch": torch.equal(recv_fp8[0].cpu().view(torch.uint8), fp8[0].view(torch.uint8))
        and torch.equal(recv_fp8[1].cpu(), fp8[1]),
    }


def _ll_buffer(**kw) -> flexep.Buffer:
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(LL_Q, H, 1, E)
    return flexep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, timeout=60, **kw)


def _ll_round(buf, x, topk, w, use_fp8: bool):
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk, LL_Q, E, use_fp8=use_fp8)
    y = per_token_cast_back(*recv_x) if use_fp8 else recv_x
    out, _, _ = buf.low_latency_combine(y, topk, w, handle)
    return recv_x, count, out


def check_low_latency(dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(LL_Q, H, generator=gen).bfloat16()
    topk = torch.rand(LL_Q, E, generator=gen).topk(K, 1).indices
    w = torch.rand(LL_Q, K, generator=gen)
    buf = _ll_buffer()
    ref = ref_ll_dispatch([x], [topk], E)[0]
    out = {}
    for use_fp8 in (False, True):
        recv_x, count, combined = _ll_round(buf, x.to(dev), topk.to(dev), w.to(dev), use_fp8)
        rows = per_token_cast_back(*recv_x) if use_fp8 else recv_x
        source = per_token_cast_back(*per_token_cast_to_fp8(x.float())) if use_fp8 else x
        ok = count.tolist() == ref["count"]
        for e, n in enumerate(ref["count"]):
            got = sorted(rows[e, :n].float().cpu().tolist())
            want = sorted(source[[t for _, t in ref["tokens"][e]]].float().tolist())
            ok = ok and got == want
        want_c = ref_ll_combine(lambda e, s, t, rows=source: rows[t].float(), [topk], [w], H)[0]
        out[f"LL dispatch {'FP8' if use_fp8 else 'BF16'}"] = ok
        out[f"LL combine after {'FP8' if use_fp8 else 'BF16'}"] = _close(combined, want_c, 1e-2)
    return out


def check_moe(dev: torch.device) -> dict:
    from flexep.moe import MoEConfig, MoELayer

    cfg = MoEConfig(hidden=256, intermediate=128, num_experts=16, topk=4, n_group=4, topk_group=2)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    hint = flexep.Buffer.get_low_latency_rdma_size_hint(32, 256, 1, 16)
    buf = flexep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True, timeout=60)
    layer = MoELayer(cfg, buf, seed=3, num_max_dispatch_tokens_per_rank=32).to(dev)
    with torch.no_grad():
        normal = layer(x.to(dev), low_latency=False)
        decode = layer(x.to(dev), low_latency=True)
    # The host reference runs on a Gloo group (an NCCL/HCCL group cannot move host tensors).
    host = MoELayer(cfg, flexep.Buffer(dist.new_group([0], backend="gloo"), timeout=60), seed=3)
    with torch.no_grad():
        want = host(x) if dev.type != "cpu" else normal.cpu()
    return {"MoE normal": _close(normal, want, 1e-4), "MoE low-latency": _close(decode, normal, 1e-4)}


def check_cuda_graph(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {}
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(LL_Q, H, generator=gen).bfloat16().to(dev)
    topk = torch.rand(LL_Q, E, generator=gen).topk(K, 1).indices.to(dev)
    w = torch.rand(LL_Q, K, generator=gen).to(dev)
    buf = _ll_buffer(check_consistency=False, validate=False)
    _ll_round(buf, x, topk, w, True)  # warm-up: allocations happen outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        _, _, out = _ll_round(buf, x, topk, w, True)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn(LL_Q, H, generator=gen).bfloat16().to(dev))
    graph.replay()
    torch.cuda.synchronize()
    _, _, eager = _ll_round(buf, x, topk, w, True)
    return {"LL in a CUDA graph (replay == eager)": torch.equal(out, eager)}


def _gbps(nbytes: int, fn, dev: torch.device, reps: int = 20) -> float:
    fn()
    sync = getattr(torch, dev.type).synchronize if dev.type != "cpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return nbytes * reps / (time.perf_counter() - start) / 1e9


def bandwidths(dev: torch.device, rows: int) -> dict:
    hidden = 7168
    x = torch.randn(rows, hidden, device=dev).bfloat16()
    index = torch.randint(0, rows, (rows,), device=dev)
    out = torch.empty_like(x)
    copy_dst = torch.empty_like(x)
    counts = [rows // 4] * 4
    order = torch.cat([torch.randperm(rows, device=dev)[: rows // 4].sort().values for _ in range(4)])
    nbytes = x.numel() * x.element_size()
    return {
        "device copy (read + write)": _gbps(2 * nbytes, lambda: copy_dst.copy_(x), dev),
        "row gather (dispatch staging)": _gbps(2 * nbytes, lambda: torch.index_select(x, 0, index, out=out),
                                               dev),
        "combine reduction (4 blocks)": _gbps(2 * nbytes, lambda: sum_blocks(x, order, counts, rows), dev),
        "FP8 cast (bf16 -> e4m3 + scales)": _gbps(nbytes + nbytes // 2, lambda: per_token_cast_to_fp8(x),
                                                  dev),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu to dry-run on the host (default: the accelerator)")
    p.add_argument("--json", default="device_check.json", metavar="PATH")
    p.add_argument("--rows", type=int, default=16384, help="rows of hidden 7168 for the bandwidth table")
    a = p.parse_args(argv)
    dev = torch.device(a.device) if a.device else default_device()
    if dev.type == "cpu" and a.device is None:
        print("device_check: no accelerator here (torch sees no CUDA, NPU or XPU device); nothing to check")
        return 0
    if dev.type != "cpu":
        getattr(torch, dev.type).set_device(dev)
    dist.init_process_group(backend_for(dev.type), init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    start = time.monotonic()
    results, failures = {}, []
    for check in (check_normal, check_low_latency, check_moe, check_cuda_graph):
        try:
            results.update(check(dev))
        except Exception:  # noqa: BLE001 - a crash is a failed check, reported with its traceback
            failures.append(f"{check.__name__} raised:\n{traceback.format_exc()}")
    bw = bandwidths(dev, a.rows)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    print(f"flexep device check on {name} (torch {torch.__version__}, backend {backend_for(dev.type)}), "
          f"{time.monotonic() - start:.0f} s")
    for what, ok in results.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    print("  local passes, GB/s:")
    for what, gbps in bw.items():
        print(f"       {what:<36}{gbps:10.1f}")
    for f in failures:
        print(f)
    with open(a.json, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, checks=results, gbps=bw, failures=failures,
                       seconds=time.monotonic() - start, pid=os.getpid()), f, indent=2)
    dist.destroy_process_group()
    return 0 if all(results.values()) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
