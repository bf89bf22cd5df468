"""Where this process sits in the job: rank, world size, local rank, master address, node list.

Two sources, in order: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then
Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_NODEID). A plain process with
neither is rank 0 of 1 on localhost. Slurm's compressed host lists ("gpu-[01-03,07]") are expanded here in
pure Python so the node agent needs no `scontrol` (which is often missing inside containers).

Left out: MPI (OMPI_COMM_WORLD_*) and PMIx variables; torchrun and srun cover the supported launches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. `source` is 'torchrun', 'slurm' or 'default'."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    def as_torchrun_env(self) -> dict:
        """The variables torch.distributed's env:// init reads (set them before init_process_group)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None


def discover(env: Mapping[str, str] | None = None, default_port: int = 29500) -> DistEnv:
    """Rank / world / local rank / master of this process from torchrun or Slurm variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", default_port)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return DistEnv(
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS"),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1"),
            int(env.get("MASTER_PORT", default_port)),
            "slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", default_port)), "default")


def ensure_torchrun_env(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from Slurm when torchrun did not set them (ranks started by
    `srun --ntasks-per-node=G` directly), so env:// initialisation works either way. Outside Slurm and torchrun
    nothing is set, leaving single-process defaults (e.g. a free loopback port) to the caller."""
    if env is None:
        env = os.environ
    found = discover(env)
    if found.source == "slurm":
        for key, value in found.as_torchrun_env().items():
            env.setdefault(key, value)
    return found


def _split_top(text: str) -> list[str]:
    """Split on commas that are outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_ranges(spec: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad Slurm host range {item!r}")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm compressed host list -> host names, in order: 'gpu-[01-02,05],cpu1' -> [gpu-01, gpu-02, gpu-05, cpu1].

    Handles several bracket groups per name ('r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    for part in _split_top(nodelist.strip()):
        names = [""]
        for literal, bracket in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if not literal and not bracket:
                continue
            names = [n + literal for n in names]
            if bracket:
                names = [n + suffix for n in names for suffix in _expand_ranges(bracket)]
        hosts.extend(names)
    return hosts


def slurm_node(env: Mapping[str, str] | None = None) -> tuple[int, list[str]]:
    """(index of this node in the job, all host names) from SLURM_NODEID and SLURM_JOB_NODELIST."""
    env = os.environ if env is None else env
    if "SLURM_JOB_NODELIST" not in env and "SLURM_NODELIST" not in env:
        raise ValueError("not inside a Slurm job: SLURM_JOB_NODELIST is unset (run the node agent through srun)")
    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    return int(env.get("SLURM_NODEID", 0)), hosts
