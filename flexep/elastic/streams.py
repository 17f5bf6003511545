"""Generated tokens per request in the job store, so that a served stream survives its ranks.

Token ``n`` of request ``i`` lives under ``<prefix>/<i>/<n>``. The first write of a token wins
(``compare_set`` on an absent key) and every writer continues from the stored value: a rank
that was excluded but finishes a step late (a frozen rank that wakes inside a half-done step)
can neither overwrite nor fork a request's stream, and a rank that takes a request over after a
membership change resumes from what is stored.
"""

from __future__ import annotations

import torch

__all__ = ["TokenStreams"]


class TokenStreams:
    """``requests`` streams of ``steps`` float32 tokens of ``hidden`` values in ``store``
    (any ``torch.distributed.Store``; :func:`flexep.elastic.job_store` outlives every worker)."""

    def __init__(self, store, requests: int, steps: int, hidden: int, prefix: str = "serve") -> None:
        for name, value in (("requests", requests), ("steps", steps), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.store, self.requests, self.steps, self.hidden = store, requests, steps, hidden
        self.prefix = prefix

    def _key(self, i: int, n: int) -> str:
        return f"{self.prefix}/{i}/{n}"

    def post(self, i: int, n: int, token: torch.Tensor) -> torch.Tensor:
        """Offer ``token: [hidden] float32`` as token ``n`` of request ``i``; returns the token
        the stream holds (this one, or the one another rank stored first)."""
        if token.dtype != torch.float32 or token.numel() != self.hidden:
            raise ValueError(f"token must be [{self.hidden}] float32, got {list(token.shape)} {token.dtype}")
        data = bytes(token.detach().cpu().contiguous().view(torch.uint8).tolist())
        stored = self.store.compare_set(self._key(i, n), "", data)
        return torch.frombuffer(bytearray(stored), dtype=torch.float32).clone()

    def count(self, i: int) -> int:
        """Tokens of request ``i`` stored so far."""
        n = 0
        while self.store.check([self._key(i, n)]):
            n += 1
        return n

    def token(self, i: int, n: int) -> torch.Tensor:
        """Token ``n`` of request ``i``: ``[hidden] float32`` (waits for it like ``store.get``)."""
        return torch.frombuffer(bytearray(self.store.get(self._key(i, n))), dtype=torch.float32).clone()

    def done(self) -> bool:
        """Every request has all its tokens."""
        return all(self.count(i) >= self.steps for i in range(self.requests))

    def tokens(self) -> torch.Tensor:
        """``[requests, steps, hidden] float32``, every stored token (NaN where missing)."""
        out = torch.full((self.requests, self.steps, self.hidden), float("nan"))
        for i in range(self.requests):
            for n in range(min(self.count(i), self.steps)):
                out[i, n] = self.token(i, n)
        return out
