"""A killed trainer must not leave reward-pool workers behind (they would idle forever)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

SCRIPT = textwrap.dedent("""
    import os, sys
    from rlad_megatron.rewards import _executor
    pool = _executor(2)
    pids = [f.result() for f in [pool.submit(os.getpid) for _ in range(8)]]
    print(" ".join(str(p) for p in sorted(set(pids))), flush=True)
    import time; time.sleep(600)
""")


def test_pool_workers_exit_when_parent_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(p) for p in proc.stdout.readline().split()]
        assert worker_pids and os.getpid() not in worker_pids
        assert all(psutil.pid_exists(p) for p in worker_pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    alive = worker_pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"pool workers {alive} outlived their killed parent"
