"""Worker process of `VerifyPool`: reads `{"gold", "pred"}` JSON lines, writes `{"equal", "error"}` lines.

math-verify's own signal-based timeouts are disabled (they only work in a main thread); the
parent enforces the timeout by killing this process. Prints `ready` once math-verify is imported
so the parent's clock starts on the first real job, not on the import.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from rlad_megatron.rewards.parent_watch import die_with_parent


def _check(gold: str, pred: str, parse, verify) -> dict:
    try:
        equal = bool(verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None))
        return {"equal": equal, "error": ""}
    except Exception as err:  # noqa: BLE001 -- a malformed answer is a wrong answer, not a crash of the pool
        return {"equal": False, "error": f"{type(err).__name__}: {err}"[:300]}


def main() -> None:
    # EOF on stdin ends an idle worker when the trainer dies; this ends a busy one too.
    die_with_parent(int(os.environ.get("RLAD_VERIFY_PARENT_PID", os.getppid())))
    logging.disable(logging.CRITICAL)
    from math_verify import parse, verify

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        out.write(json.dumps(_check(job["gold"], job["pred"], parse, verify)).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
