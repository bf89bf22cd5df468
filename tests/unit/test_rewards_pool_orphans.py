"""A killed trainer must not leave reward workers behind: neither the process pool of reward functions
(which would idle forever) nor math-verify workers, even one busy on a pathological answer."""

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


VERIFY_SCRIPT = textwrap.dedent("""
    import threading, time
    from rlad_megatron.rewards.verify_pool import VerifyPool
    pool = VerifyPool(2, timeout_s=600)
    pool.verify_many([("1", "1"), ("2", "2")])  # both workers started and ready
    print(" ".join(str(w.proc.pid) for w in pool.workers), flush=True)
    # Minutes of sympy in one worker: it reads no more input, so stdin EOF alone would not end it.
    threading.Thread(target=pool.verify_many, args=([("5", "\\\\boxed{(10^{10^{10}})!}")],), daemon=True).start()
    time.sleep(1.0)
    print("busy", flush=True)
    time.sleep(600)
""")


def _outlived(worker_pids: list[int], deadline_s: float) -> list[int]:
    deadline = time.monotonic() + deadline_s
    alive = worker_pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    return alive


def _busy_worker(pids: list[int], within_s: float = 30.0) -> bool:
    """One worker accumulates CPU time (>= 0.5 s) while the other idles: the pathological job is running."""
    start = {p: sum(psutil.Process(p).cpu_times()[:2]) for p in pids}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if any(sum(psutil.Process(p).cpu_times()[:2]) - start[p] >= 0.5 for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_math_verify_workers_exit_when_parent_is_killed_even_when_busy():
    proc = subprocess.Popen([sys.executable, "-c", VERIFY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(worker_pids) == 2 and all(psutil.pid_exists(p) for p in worker_pids)
        assert proc.stdout.readline().strip() == "busy"
        assert _busy_worker(worker_pids), "no worker was busy on the pathological answer"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    alive = _outlived(worker_pids, 15)
    assert not alive, f"math-verify workers {alive} outlived their killed parent"


def test_pool_workers_exit_when_parent_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(p) for p in proc.stdout.readline().split()]
        assert worker_pids and os.getpid() not in worker_pids
        assert all(psutil.pid_exists(p) for p in worker_pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    alive = _outlived(worker_pids, 15)
    assert not alive, f"pool workers {alive} outlived their killed parent"
