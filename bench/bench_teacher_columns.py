"""A GKD step's per-token columns on the trainer ranks: Python lists pickled to every rank vs flat tensors per data-parallel rank.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_teacher_columns [--samples 16] [--tokens 8192] [--k 8] [--json out.json]

A step's samples with 4K-8K-token responses and the teacher's top-8 per token. Two ways to get them from rank 0
to another trainer rank:
- lists (the baseline): every per-token column (prompt and response ids, rollout and teacher log-probs, top-k
  ids and log-probs) as Python lists in each Sample, the whole list of Samples pickled
  (`broadcast_object_list`) to every rank;
- tensors (what the loop does): the Samples pickled with each column replaced by its shape
  (`components.without_columns`), then every column of only the samples the receiving rank's data-parallel rank
  trains on (GKD, one minibatch), as one flat tensor per column in its dtype (`components.pack_columns` /
  `unpack_columns`; the loop sends them with `dist.send`).
Measured per receiving rank, for several data-parallel sizes: the bytes it receives (the pickle, plus the
tensors' bytes) and its peak RSS growth while it receives and rebuilds the samples, in a fresh process per
measurement (Linux VmHWM after, reset through /proc/self/clear_refs, minus VmRSS before). The receiving rank's
micro-batch tensors (`pack_samples`: tokens, targets, teacher and rollout log-probs, top-k) are checked
bit-equal between the two ways.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET = 10.0

RECEIVER = r"""
import pickle, sys
import numpy as np
from rlad_megatron.components import unpack_columns
from rlad_megatron.types import Sample
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
mode, folder = sys.argv[2], sys.argv[3]
payload = open(f"{folder}/objects.pkl", "rb").read()  # what broadcast_object_list hands over
samples = pickle.loads(payload)
mine = pickle.loads(open(f"{folder}/mine.pkl", "rb").read())
if mode == "tensors":
    names = pickle.loads(open(f"{folder}/names.pkl", "rb").read())
    unpack_columns(samples, {name: mine for name in names}, {name: np.load(f"{folder}/{name}.npy") for name in names})
del payload
peak = status("VmHWM")
from rlad_megatron.backends.megatron.batching import pack_samples
if mine:
    mine_samples = [samples[i] for i in mine]
    per_token = {key: [getattr(s, key) for s in mine_samples] for key in ("teacher_logprobs", "rollout_logprobs")}
    batch = pack_samples(mine_samples, per_token, topk=True)
    np.savez(f"{folder}/check_{mode}.npz", **{key: t.numpy() for key, t in batch.tensors.items()})
else:
    np.savez(f"{folder}/check_{mode}.npz")
print(peak - before)
"""


def make_samples(num: int, tokens: int, k: int, seed: int = 0):
    """Samples as rank 0 holds them: ids and log-probs as Python lists (the log-probs float32 values, as engines
    compute them), the teacher's top-k as int32 / float32 arrays."""
    from rlad_megatron.types import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num):
        n = int(tokens * rng.uniform(0.5, 1.0))  # responses of different lengths, like a real batch
        samples.append(
            Sample(
                prompt_ids=rng.integers(0, 150_000, 256).tolist(),
                group_index=i // 4,
                response_ids=rng.integers(0, 150_000, n).tolist(),
                rollout_logprobs=(-rng.random(n, dtype=np.float32)).tolist(),
                teacher_logprobs=(-rng.random(n, dtype=np.float32)).tolist(),
                teacher_topk_ids=rng.integers(0, 150_000, (n, k)).astype(np.int32),
                teacher_topk_logprobs=-rng.random((n, k), dtype=np.float32) * 10,
            )
        )
    return samples


def as_lists(samples):
    import dataclasses

    return [
        dataclasses.replace(
            s, teacher_topk_ids=s.teacher_topk_ids.tolist(), teacher_topk_logprobs=s.teacher_topk_logprobs.tolist()
        )
        for s in samples
    ]


def shard(samples, dp: int, rank: int) -> list[int]:
    from rlad_megatron.backends.megatron.batching import split_for_data_parallel

    return split_for_data_parallel(samples, dp)[rank]


def receive(folder: Path, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RECEIVER, str(REPO), mode, str(folder)], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def measure(samples, dp: int, root: Path) -> dict[str, float]:
    from rlad_megatron.components import pack_columns, without_columns
    from rlad_megatron.types import TOKEN_COLUMNS

    mine = shard(samples, dp, dp - 1)  # the last data-parallel rank: a receiver, never rank 0
    lists = root / f"lists_dp{dp}"
    tensors = root / f"tensors_dp{dp}"
    for folder in (lists, tensors):
        folder.mkdir()
        (folder / "mine.pkl").write_bytes(pickle.dumps(mine))
    list_bytes = pickle.dumps(as_lists(samples))
    (lists / "objects.pkl").write_bytes(list_bytes)
    light = pickle.dumps(without_columns(samples))
    (tensors / "objects.pkl").write_bytes(light)
    flats = pack_columns(samples, {name: mine for name in TOKEN_COLUMNS})
    (tensors / "names.pkl").write_bytes(pickle.dumps(list(flats)))
    for name, flat in flats.items():
        np.save(tensors / f"{name}.npy", flat)
    rss_lists, rss_tensors = receive(lists, "lists"), receive(tensors, "tensors")
    with np.load(lists / "check_lists.npz") as want, np.load(tensors / "check_tensors.npz") as got:
        identical = sorted(want.files) == sorted(got.files) and all(
            want[key].dtype == got[key].dtype and np.array_equal(want[key], got[key]) for key in want.files
        )
    tensor_bytes = len(light) + sum(flat.nbytes for flat in flats.values())
    return {
        "dp": dp,
        "bytes_lists": len(list_bytes),
        "bytes_tensors": tensor_bytes,
        "bytes_ratio": len(list_bytes) / tensor_bytes,
        "rss_lists": rss_lists,
        "rss_tensors": rss_tensors,
        "rss_ratio": rss_lists / max(rss_tensors, 1),
        "identical": bool(identical),
    }


def table(rows: list[dict], args) -> list[str]:
    mb = 1 / 2**20
    out = [
        f"{args.samples} samples, responses of {args.tokens // 2}-{args.tokens} tokens, top-{args.k}; per receiving rank:",
        "",
        "| data-parallel size | bytes: lists (MB) | tensors (MB) | lists / tensors | peak RSS growth: lists (MB) "
        "| tensors (MB) | lists / tensors | identical |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['dp']} | {r['bytes_lists'] * mb:.1f} | {r['bytes_tensors'] * mb:.1f} | {r['bytes_ratio']:.1f}x | "
            f"{r['rss_lists'] * mb:.1f} | {r['rss_tensors'] * mb:.1f} | {r['rss_ratio']:.1f}x | {r['identical']} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    samples = make_samples(args.samples, args.tokens, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(samples, dp, Path(tmp)) for dp in args.dp]
    print("\n".join(table(rows, args)))
    for r in rows:
        print(
            f"data-parallel {r['dp']}: bytes ratio lists / tensors {r['bytes_ratio']:.1f}x, "
            f"peak RSS ratio {r['rss_ratio']:.1f}x (target >= {TARGET:.0f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "target": TARGET, "table": table(rows, args)}, indent=1))
    if not all(r["identical"] for r in rows):
        sys.exit("the two paths gave different micro-batch tensors")


if __name__ == "__main__":
    main()
