"""flexep.elastic.TokenStreams: the first write of a token wins, readers see what is stored."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from flexep.elastic import TokenStreams

pytestmark = pytest.mark.unit


def _streams(requests=2, steps=3, hidden=4):
    return TokenStreams(dist.HashStore(), requests, steps, hidden, prefix="t")


def test_first_write_wins_and_later_writers_continue_from_it():
    s = _streams()
    first, late = torch.arange(4.0), torch.full((4,), 9.0)
    assert torch.equal(s.post(0, 0, first), first)
    assert torch.equal(s.post(0, 0, late), first)  # the late writer gets the stored token
    assert torch.equal(s.token(0, 0), first)
    assert (s.count(0), s.count(1)) == (1, 0)


def test_done_and_tokens_follow_the_store():
    s = _streams(requests=2, steps=2, hidden=3)
    assert not s.done()
    for i in range(2):
        for n in range(2):
            s.post(i, n, torch.full((3,), float(10 * i + n)))
    assert s.done()
    want = torch.tensor([[[0.0] * 3, [1.0] * 3], [[10.0] * 3, [11.0] * 3]])
    assert torch.equal(s.tokens(), want)


def test_missing_tokens_read_as_nan_and_a_second_view_sees_the_same_streams():
    store = dist.HashStore()
    store.set_timeout(timedelta(milliseconds=200))
    a = TokenStreams(store, 1, 2, 2)
    a.post(0, 0, torch.ones(2))
    b = TokenStreams(store, 1, 2, 2)
    assert b.count(0) == 1 and torch.isnan(b.tokens()[0, 1]).all()
    with pytest.raises(RuntimeError):  # token 1 is never written: the store's get times out
        b.token(0, 1)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="steps"):
        TokenStreams(dist.HashStore(), 1, 0, 4)
    with pytest.raises(ValueError, match=r"token must be \[4\] float32"):
        _streams().post(0, 0, torch.zeros(4, dtype=torch.float64))
