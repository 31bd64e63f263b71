"""Reader worker processes die with their rank (issue 17): a rank killed with SIGKILL leaves nothing behind.

Why: a rank that dies without running its shutdown (kill -9, the OOM killer) used to leave its DataLoader
workers, the multiprocessing forkserver and the resource tracker alive, reparented to init (~1.1 GB for
2 workers), for as long as nobody killed them. Measured on Linux / CPython 3.11, forkserver start method:
the forkserver does not exit when its rank dies, because every worker it forks inherits the write end of
the forkserver's "alive" pipe (so that a worker could start processes itself); the workers' own watchdog
(torch's ManagerWatchdog) watches their parent, which is that forkserver; and the resource tracker exits
only once every process holding its pipe (rank, forkserver, workers) is gone. So nothing ends by itself.

The fix, one link per parent -> child edge, each asked of the kernel (prctl(PR_SET_PDEATHSIG, SIGKILL)):
- a DataLoader worker (`worker_init_fn`) dies when its parent dies: the rank (fork / spawn) or the
  forkserver (forkserver);
- the forkserver (`die_with_parent` run by satrank.pipeline.lifeline_forkserver, which `worker_context`
  adds to the forkserver's preload list) dies when its rank dies;
- the resource tracker then reads EOF on its pipe and exits by itself (it needs no link).
PR_SET_PDEATHSIG fires when the parent exits after the call; a parent that died before it is caught by a
check right after the call: a worker whose rank (pid passed in) is already gone kills itself. A forkserver
whose rank died before its preload ran needs no check: it has forked nothing, so its alive pipe reads EOF
and it exits. The kernel's "parent" is the thread that created the child: the reader creates its
DataLoader iterator (and so the workers, and the forkserver on first use) in the calling thread, which in
the jobs is the main thread. Elsewhere than Linux there is no PR_SET_PDEATHSIG: the calls do nothing.
"""
from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
from typing import Callable, Optional, Sequence

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FORKSERVER_PRELOAD = "satrank.pipeline.lifeline_forkserver"


def _prctl_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) for this process; False where unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    return True


def alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:  # no such process, or no /proc: ask the kernel whether the pid exists
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def die_with_parent(watch: Optional[int] = None) -> None:
    """SIGKILL this process when its parent exits; then, if process `watch` is already gone, die now (the
    parent may have exited before the request, which the kernel would then never signal)."""
    if _prctl_pdeathsig(signal.SIGKILL) and watch is not None and not alive(watch):
        os.kill(os.getpid(), signal.SIGKILL)


def _worker_init(rank_pid: int, chained: Optional[Callable[[int], None]], worker_id: int) -> None:
    die_with_parent(watch=rank_pid)
    if chained is not None:
        chained(worker_id)


def worker_init_fn(chained: Optional[Callable[[int], None]] = None) -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` (picklable, any start method) making each worker die with its parent,
    and at once when this process (its rank) is already gone; then `chained(worker_id)` if given."""
    return functools.partial(_worker_init, os.getpid(), chained)


def worker_context(method: str = "forkserver", preload: Sequence[str] = ()):
    """The multiprocessing context for DataLoader workers; for forkserver, its server preloads `preload`
    and satrank.pipeline.lifeline_forkserver, so the server dies with this process too."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([*preload, FORKSERVER_PRELOAD])
    return ctx
