"""The communicator seam: fused packing, the engines' primitives on real Gloo ranks, counting."""

from __future__ import annotations

import pytest
import torch
from launch import run_ranks

from seng_dist.comm import Communicator, CountingCommunicator, LocalCommunicator, make_communicator
from seng_dist.comm.base import _from_bytes, _pack, _to_bytes, _unpack
from seng_dist.comm.torch_dist import TorchCommunicator


def test_pack_and_unpack_round_trip_shapes_and_dtypes():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 2)]
    buf = _pack(tensors, torch.float32)
    assert buf.shape == (12 + 5 + 4,)
    targets = [torch.empty_like(t) for t in tensors]
    _unpack(buf, targets)
    assert all(torch.equal(a, b) for a, b in zip(tensors, targets, strict=True))
    half = _pack(tensors, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    _unpack(half, targets)  # back into float32 tensors, rounded through bf16
    assert all(
        torch.allclose(a, b, rtol=1e-2, atol=1e-2) for a, b in zip(tensors, targets, strict=True)
    )


def test_object_bytes_round_trip_from_a_gathered_row_without_numpy(monkeypatch):
    # `import seng_dist` needs only torch: decoding must not go through Tensor.numpy().
    def no_numpy(self):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    obj = {"t": torch.arange(6.0).view(2, 3), "s": ["x", 1]}
    data = _to_bytes(obj)
    # allgather_object decodes a row of the gathered table: a view at an offset, with padding.
    rows = torch.full((2, data.numel() + 5), 7, dtype=torch.uint8)
    rows[1, : data.numel()] = data
    back = _from_bytes(rows[1, : data.numel()])
    assert torch.equal(back["t"], obj["t"]) and back["s"] == ["x", 1]


def test_make_communicator_choices():
    assert isinstance(make_communicator(None), LocalCommunicator)  # no process group here
    assert isinstance(make_communicator("local"), LocalCommunicator)
    mine = LocalCommunicator()
    assert make_communicator(mine) is mine
    with pytest.raises(ValueError, match="comm must be None, one of 'local', 'torch', 'horovod'"):
        make_communicator("nccl")
    with pytest.raises(ValueError, match="init_process_group"):
        make_communicator("torch")
    with pytest.raises(TypeError, match="wraps a Communicator"):
        CountingCommunicator("torch")


def test_one_process_collectives_are_the_identity():
    comm = CountingCommunicator(LocalCommunicator())
    t = torch.arange(4.0)
    comm.allreduce_mean_([t], name="x")
    comm.broadcast_([t], name="y")
    assert torch.equal(t, torch.arange(4.0))
    assert torch.equal(comm.allgather(t, name="z"), t.unsqueeze(0))
    comm.check_consistent({"a": "1"})
    assert comm.collectives == 0  # nothing to send on one process


def _collectives(rank: int, world: int) -> dict:
    comm = CountingCommunicator(TorchCommunicator())
    assert isinstance(comm, Communicator) and (comm.rank, comm.world_size) == (rank, world)
    a = torch.full((2, 3), float(rank))
    b = torch.full((4,), float(10 * rank), dtype=torch.float64)
    c = torch.full((5,), float(rank + 1))
    comm.allreduce_mean_([a, b, c], name="mixed")
    mixed = (a.clone(), b.clone(), c.clone(), list(comm.calls))
    comm.reset()
    d = torch.full((3,), float(rank + 1))
    e = torch.full((2,), float(-rank), dtype=torch.float64)
    comm.allreduce_mean_([d, e], name="cast", comm_dtype=torch.bfloat16)
    cast = (d.clone(), e.clone(), list(comm.calls))
    comm.reset()
    # Two rounds, the first in two buckets: started together, finished in order.
    g, h, k = (torch.full((n,), float(rank)) for n in (2, 3, 4))
    first = comm.allreduce_mean_async_([g], name="r1/b0")
    second = comm.allreduce_mean_async_([h], name="r1/b1")
    g_before = g.clone()
    first.wait()
    second.wait()
    comm.allreduce_mean_([k], name="r2")
    buckets = (
        g_before,
        g.clone(),
        h.clone(),
        k.clone(),
        comm.collectives,
        comm.rounds,
        [c.round for c in comm.calls],
    )
    comm.reset()
    f = torch.full((3,), float(rank))
    comm.broadcast_([f], name="bcast", src=world - 1)
    gathered = comm.allgather(torch.tensor([rank, 7 * rank]), name="gather")
    try:
        comm.check_consistent({"same": "x", "rank-dependent": f"r{rank}"}, what="Test")
        mismatch = ""
    except ValueError as err:
        mismatch = str(err)
    return {
        "mixed": mixed,
        "cast": cast,
        "buckets": buckets,
        "bcast": f,
        "gathered": gathered,
        "mismatch": mismatch,
    }


def test_fused_collectives_on_three_gloo_ranks():
    world = 3
    for rank, res in enumerate(run_ranks(_collectives, world, timeout=120)):
        a, b, c, calls = res["mixed"]
        assert torch.equal(a, torch.full((2, 3), 1.0))  # mean of 0, 1, 2
        assert torch.equal(b, torch.full((4,), 10.0, dtype=torch.float64))
        assert torch.equal(c, torch.full((5,), 2.0))
        # one buffer per dtype: float32 (a and c, 11 values) and float64 (b, 4 values)
        assert sorted(call.bytes for call in calls) == [4 * 8, 11 * 4]
        d, e, calls = res["cast"]
        assert torch.equal(d, torch.full((3,), 2.0)) and e.dtype == torch.float64
        assert torch.equal(e, torch.full((2,), -1.0, dtype=torch.float64))
        assert [call.bytes for call in calls] == [5 * 2]  # one bf16 buffer for both dtypes
        g_before, g, h, k, collectives, rounds, names = res["buckets"]
        assert torch.equal(g_before, torch.full((2,), float(rank)))  # in flight: not yet mean
        assert all(torch.equal(t, torch.ones_like(t)) for t in (g, h, k))
        assert (collectives, rounds, names) == (3, 2, ["r1", "r1", "r2"])
        assert torch.equal(res["bcast"], torch.full((3,), 2.0))
        assert res["gathered"].tolist() == [[0, 0], [1, 7], [2, 14]]
        assert "rank-dependent: rank 0: r0, rank 1: r1, rank 2: r2" in res["mismatch"]
        assert "same" not in res["mismatch"].split("\n", 1)[1]


class _AllreduceOnly(TorchCommunicator):
    """An engine without a reduce-scatter of its own: the seam's default runs an allreduce."""

    reduce_scatter_sum_flat_async_ = Communicator.reduce_scatter_sum_flat_async_


def _segments(rank: int, world: int) -> dict:
    out = {}
    for name, engine in (("native", TorchCommunicator()), ("default", _AllreduceOnly())):
        comm = CountingCommunicator(engine)
        # Rank r's contribution to what rank s receives: s's shapes, filled with 10·r + s; rank 0
        # receives two dtypes, rank 2 nothing (segments of uneven length are padded).
        segments = [
            [torch.full((1,), 10.0 * rank), torch.full((2,), 10.0 * rank, dtype=torch.float64)],
            [torch.full((3,), 10.0 * rank + 1)],
            [],
        ]
        comm.reduce_scatter_mean_async_(segments, name="rs").wait()
        scattered = [[t.clone() for t in seg] for seg in segments]
        kinds = [(c.kind, c.bytes) for c in comm.calls]
        comm.reset()
        rows = [[torch.full((2,), -1.0)], [torch.full((1,), -1.0)], [torch.full((3,), -1.0)]]
        rows[rank][0].fill_(float(rank))
        comm.allgather_segments_(rows, name="ag")
        out[name] = (scattered, kinds, [r[0].tolist() for r in rows], [c.kind for c in comm.calls])
    return out


def test_segment_collectives_on_three_gloo_ranks_natively_and_through_the_default():
    for rank, res in enumerate(run_ranks(_segments, 3, timeout=120)):
        for name in ("native", "default"):
            scattered, kinds, rows, gathered = res[name]
            mine = scattered[rank]
            if rank == 0:  # the mean over r of 10·r
                assert torch.equal(mine[0], torch.full((1,), 10.0))
                assert torch.equal(mine[1], torch.full((2,), 10.0, dtype=torch.float64))
            if rank == 1:
                assert torch.equal(mine[0], torch.full((3,), 11.0))
            # the other segments are as this rank sent them
            for s, seg in enumerate(scattered):
                if s != rank and seg:
                    assert torch.equal(seg[0], torch.full_like(seg[0], 10.0 * rank + s))
            kind = "reduce_scatter"
            # float32: 3 chunks of 3 (the longest segment); float64: 3 chunks of 2
            assert sorted(kinds) == [(kind, 3 * 3 * 4), (kind, 3 * 2 * 8)], (name, kinds)
            assert rows == [[0.0, 0.0], [1.0], [2.0, 2.0, 2.0]]
            assert gathered == ["allgather"]
