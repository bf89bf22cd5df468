"""End a helper process when the process that started it dies.

A reward worker must not outlive a killed trainer (SIGKILL, OOM, preemption): a spawned pool worker
holds both ends of its call queue and never sees EOF, and a math-verify worker busy on a pathological
answer reads no more input for minutes.

- `exit_with_parent(pid)`: a daemon thread polls the parent pid and exits when it changes (the orphan
  was re-parented). Enough for a worker that runs Python code; a thread cannot run while another holds
  the GIL inside one long C call (sympy's big-integer arithmetic does).
- `die_with_parent(pid)`: on Linux the kernel SIGKILLs the process when the thread that started it ends
  (`PR_SET_PDEATHSIG`), whatever it is doing. Start such workers from a thread that lives as long as
  the process. Elsewhere it falls back to `exit_with_parent`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the kernel was told
            os._exit(1)
    else:
        exit_with_parent(parent_pid)
