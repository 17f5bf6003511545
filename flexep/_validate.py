"""Input checks shared by the public calls. Each raises ``TypeError`` (wrong kind or dtype) or
``ValueError`` (wrong shape or value) naming the argument, what it got and what is expected.

Value checks (``topk_idx`` range, duplicate experts) read tensor contents, which costs a device
sync on accelerators; ``Buffer(validate=False)`` skips them for CUDA-graph capture.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._dtypes import FLOAT8_DTYPES

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

    ``x: [T, H]`` float, or e4m3 ``[T, H]`` with ``scales [T, H/128] float32`` (any strides) or
    packed UE8M0 ``[T, H/512] int32``.
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
        check_tensor(f"{name}[1] (scales)", scales, dim=2, dtypes=(torch.float32, torch.int32),
                     rows=data.size(0), contiguous=False, device=data.device)
        want = hidden // 128 if scales.dtype == torch.float32 else hidden // 512
        if scales.size(1) != want:
            raise ValueError(f"{name}[1] (scales) must be [{data.size(0)}, {want}] for hidden {hidden} "
                             f"and dtype {str(scales.dtype).replace('torch.', '')}, "
                             f"got {tuple(scales.shape)}")
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
    """``[T, K]`` int64 (int32 accepted), entries ``-1`` or in ``[0, num_experts)``, no repeats."""
    check_tensor(name, topk_idx, dim=2, dtypes=INDEX_DTYPES, rows=num_tokens, device=device)
    if values and topk_idx.numel():
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
    return topk_idx.to(torch.int64)


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
