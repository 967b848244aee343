"""Start real ranks for a test: new processes joined by a Gloo process group, bounded by a
timeout (:func:`run_ranks`).

It lives with the tests, out of the seng_dist wheel. Tests import it as ``launch`` (pyproject's
pytest ``pythonpath`` holds ``tests/``); a script outside ``tests/`` puts ``tests/`` on
``sys.path`` first.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple
) -> None:
    """One rank: join the Gloo group, run ``fn``, and save its result (or traceback) in
    ``outdir``."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # The result is on disk: leave without the interpreter's teardown, where C++ extensions
    # loaded by the engines have been seen to abort ("terminate called without an active
    # exception", once in CI, after a DeepSpeed test's work was done and saved).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes joined by Gloo.

    ``fn`` must be importable (a module-level function). Returns each rank's result. A rank
    that fails raises ``RuntimeError`` with its traceback; if the ranks are not all done
    within ``timeout`` seconds, all are killed and ``TimeoutError`` is raised, so a bug that
    deadlocks a collective fails a test instead of hanging it.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_rank_main, args=(r, world_size, port, outdir, fn, args), daemon=True
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = []
        for r in range(world_size):
            path = os.path.join(outdir, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"rank {r}:\n{f.read()}")
        if errors:
            raise RuntimeError("\n".join(errors))
        if alive:
            raise TimeoutError(
                f"ranks {alive} of {world_size} still running after {timeout:.0f} s; killed"
            )
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks exited abnormally (rank, exit code): {bad}")
        return [
            torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
