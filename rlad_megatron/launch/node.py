"""The node agent: `srun --ntasks-per-node=1 python -m rlad_megatron.launch.node RECIPE [overrides]`.

Every node of the job runs this one program. It recomputes the topology from the recipe (a pure function, so
all nodes agree without talking), looks up its own node index (SLURM_NODEID) and starts what that node runs:
SGLang servers, a fleet's router, and on trainer nodes `torchrun` once every server answers its health
check. Trainer node 0 writes a done-file into the run folder when training ends; server-only nodes wait for
it (or for SIGTERM) and then stop their servers. SIGTERM/SIGINT/SIGUSR1 are forwarded (as SIGTERM) to the children, so a
preempted job stops cleanly; the requeued job resumes from the checkpoint in the run folder.

Command construction is pure (`server_command`, `router_command`, `trainer_command`) and unit-tested; the
process supervision below them is thin. Left out: restarting a crashed server (the job fails fast instead,
with srun --kill-on-bad-exit).

API key: when a fleet's key is set (`<fleet>.api_key`, or the environment variable named by
`<fleet>.api_key_env`, which the sbatch job exports to every node), its servers get `--api-key` (SGLang has no
environment variable for it, so the key is on the server's command line; logs and --dry-run show
`<redacted>`), the health probes send `Authorization: Bearer <key>`, and no router is started for that
fleet: sglang-router 0.3.2's `--api-key` only authenticates the router to its workers, its own port would
stay open, so the trainer balances over the servers itself.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rlad_megatron.config import RunConfig, load_config
from rlad_megatron.launch.env import slurm_node
from rlad_megatron.launch.topology import (
    DIST_INIT_PORT_OFFSET,
    Server,
    Topology,
    fingerprint,
    plan_topology,
    trainer_overrides,
)

Command = tuple[dict[str, str], list[str]]  # (extra environment, argv)
POLL_S = 10.0  # how often server-only nodes look for the done-file
REDACTED = "<redacted>"
FLEETS = ("rollout", "teacher")


def log(phase: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"[{stamp}] [{phase}] {message}", flush=True)


def _server_flags(server_args: Mapping[str, object]) -> list[str]:
    """SGLang server_args dict -> CLI flags ({mem_fraction_static: 0.8, enable_x: True} -> --mem-fraction-static 0.8
    --enable-x). Launch-owned flags are rejected so the topology stays the single source of TP and ports."""
    owned = {"tp", "tp_size", "port", "host", "model_path", "nnodes", "node_rank", "dist_init_addr", "api_key"}
    flags: list[str] = []
    for key, value in server_args.items():
        if key in owned:
            raise ValueError(f"server_args.{key} is set by the launcher (use launch.*_tp / launch.*_port, and "
                             "<fleet>.api_key_env for the key); remove it")
        if value is False or value is None:
            continue
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags.append(str(value))
    return flags


def fleet_keys(cfg: RunConfig, env: Mapping[str, str]) -> dict[str, str]:
    """{'rollout': key, 'teacher': key}: the config's key, else the one in `env[<fleet>.api_key_env]`, else ''."""
    return {f: getattr(cfg, f).api_key or env.get(getattr(cfg, f).api_key_env, "") for f in FLEETS}


def redact(argv: Sequence[str], keys: Mapping[str, str]) -> list[str]:
    """argv with every key (alone or inside an argument such as `teacher.api_key=K`) replaced by <redacted>."""
    secrets = [k for k in keys.values() if k]
    out = []
    for arg in argv:
        for secret in secrets:
            arg = arg.replace(secret, REDACTED)
        out.append(arg)
    return out


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def server_command(server: Server, node: int, hosts: Sequence[str], model: str,
                   server_args: Mapping[str, object], python: str = "python", api_key: str = "") -> Command:
    """The SGLang server process of `server` on `node` (one process per node of a multi-node server)."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", model, "--tp-size", str(server.tp),
            "--host", "0.0.0.0", "--port", str(server.port)]
    if len(server.nodes) > 1:
        argv += ["--nnodes", str(len(server.nodes)), "--node-rank", str(server.nodes.index(node)),
                 "--dist-init-addr", f"{hosts[server.nodes[0]]}:{server.port + DIST_INIT_PORT_OFFSET}"]
    if api_key:
        argv += ["--api-key", api_key]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, server.gpus))}
    return env, argv + _server_flags(server_args)


def router_command(topo: Topology, fleet: str, hosts: Sequence[str], timeout_s: int,
                   python: str = "python") -> Command:
    """The sglang_router process in front of one fleet."""
    _, port = topo.routers[fleet]
    argv = [python, "-m", "sglang_router.launch_router", "--host", "0.0.0.0", "--port", str(port),
            "--policy", "cache_aware", "--worker-startup-timeout-secs", str(timeout_s),
            "--worker-urls", *topo.server_urls(fleet, hosts)]
    return {}, argv


def trainer_command(topo: Topology, node: int, hosts: Sequence[str], recipe: str, overrides: Sequence[str],
                    master_port: int, direct: Sequence[str] = ()) -> Command:
    """torchrun on one trainer node; the trainer reaches the fleets through `trainer_overrides` (the fleets in
    `direct` through their servers; the trainer reads their keys from its own config / environment)."""
    nproc = len(topo.trainer_gpus)
    argv = ["torchrun", f"--nproc-per-node={nproc}"]
    if len(topo.trainer_nodes) == 1:
        argv += ["--standalone"]
    else:
        argv += [f"--nnodes={len(topo.trainer_nodes)}", f"--node-rank={topo.trainer_nodes.index(node)}",
                 f"--master-addr={hosts[topo.trainer_nodes[0]]}", f"--master-port={master_port}"]
    # `rlad train` resumes from the latest checkpoint in run_dir by default, which is what a requeued job needs.
    argv += ["-m", "rlad_megatron.cli", "train", "--config", recipe, *overrides, *trainer_overrides(topo, hosts, direct)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, topo.trainer_gpus))}, argv


def node_commands(cfg: RunConfig, topo: Topology, node: int, hosts: Sequence[str], recipe: str,
                  overrides: Sequence[str], python: str = "python",
                  keys: Mapping[str, str] | None = None) -> dict[str, list[Command]]:
    """Everything `node` runs: {'servers': [...], 'routers': [...], 'trainer': [...]} (trainer has 0 or 1).
    `keys` ({fleet: api key}, from `fleet_keys`): keyed fleets get `--api-key` and no router."""
    keys = keys or {}
    models = {"rollout": cfg.model.student, "teacher": cfg.model.teacher}
    args = {"rollout": cfg.rollout.server_args, "teacher": cfg.teacher.server_args}
    servers = [server_command(s, node, hosts, models[s.fleet], args[s.fleet], python, keys.get(s.fleet, ""))
               for s in topo.servers if node in s.nodes]
    routers = [router_command(topo, f, hosts, cfg.launch.health_timeout_s, python)
               for f, (n, _) in sorted(topo.routers.items()) if n == node and not keys.get(f)]
    direct = sorted(f for f in topo.routers if keys.get(f))
    trainer = ([trainer_command(topo, node, hosts, recipe, overrides, cfg.launch.master_port, direct)]
               if node in topo.trainer_nodes else [])
    return {"servers": servers, "routers": routers, "trainer": trainer}


def health_urls(topo: Topology, hosts: Sequence[str],
                keys: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """What must answer 200 before training, {url: request headers}: every server's /health_generate and the
    /health of every router that is started (none for a keyed fleet, see `node_commands`)."""
    keys = keys or {}
    urls = {f"{u}/health_generate": auth_headers(keys.get(f, "")) for f in topo.routers
            for u in topo.server_urls(f, hosts)}
    return urls | {f"{u}/health": {} for f, u in topo.urls(hosts).items() if not keys.get(f)}


def wait_healthy(urls: Sequence[str] | Mapping[str, Mapping[str, str]], timeout_s: float, poll_s: float = 5.0,
                 alive: Callable[[], bool] = lambda: True) -> None:
    """Poll until every URL answers 200; fail early when `alive()` says a local server process died.
    `urls` may map each URL to the headers its probe sends (the fleet's bearer key)."""
    headers = urls if isinstance(urls, Mapping) else {}
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        if not alive():
            raise RuntimeError("a server process on this node exited before every endpoint was healthy; "
                               "see its log above")
        pending = [u for u in pending if not _ok(u, headers.get(u))]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} endpoint(s) not healthy after {timeout_s:.0f} s, e.g. {pending[0]}; "
                               "see the server logs, or raise launch.health_timeout_s")
        if pending:
            time.sleep(poll_s)


def _ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {})), timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


class Supervisor:
    """Children of this node; SIGTERM, SIGINT and SIGUSR1 stop all of them with SIGTERM."""

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self.keys = dict(keys or {})  # redacted from the logged command lines
        self.procs: list[subprocess.Popen] = []
        self.stopping = False
        # SIGUSR1 is Slurm's early warning (--signal=USR1@120 without B:, as nemo-run sends it).
        self._previous = {sig: signal.signal(sig, self._on_signal)
                          for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def close(self, grace_s: float = 60.0) -> None:
        """Stop the children and give the signals back to their previous handlers."""
        self.stop(grace_s)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def start(self, command: Command) -> subprocess.Popen:
        env, argv = command
        log("start", " ".join(redact(argv, self.keys)))
        proc = subprocess.Popen(argv, env={**os.environ, **env})
        self.procs.append(proc)
        return proc

    def _on_signal(self, signum, _frame) -> None:
        log("stop", f"signal {signum}: forwarding SIGTERM to {len(self.procs)} process(es)")
        self.stopping = True
        self.stop()

    def stop(self, grace_s: float = 60.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def any_failed(self) -> subprocess.Popen | None:
        return next((p for p in self.procs if p.poll() not in (None, 0)), None)


def sglang_python(env: Mapping[str, str]) -> str:
    """Interpreter of the SGLang environment (the Dockerfile keeps SGLang in its own venv)."""
    return env.get("RLAD_SGLANG_PYTHON", "python")


def done_file(cfg: RunConfig, env: Mapping[str, str]) -> Path:
    """Per job attempt (a requeued job keeps its id but bumps SLURM_RESTART_COUNT)."""
    job = env.get("SLURM_JOB_ID", "local")
    return Path(cfg.run_dir) / "launch" / f"done.{job}.{env.get('SLURM_RESTART_COUNT', '0')}"


def run_node(cfg: RunConfig, recipe: str, overrides: Sequence[str], node: int, hosts: Sequence[str],
             env: Mapping[str, str]) -> int:
    topo = plan_topology(cfg)
    expected = env.get("RLAD_TOPOLOGY_FINGERPRINT", "")
    if expected and expected != fingerprint(topo):
        raise ValueError(f"the recipe {recipe} no longer gives the placement this job was rendered with "
                         f"({fingerprint(topo)} != {expected}); re-run `rlad render` and resubmit")
    if len(hosts) != topo.nodes:
        raise ValueError(f"the job has {len(hosts)} nodes but launch.nodes={topo.nodes}; fix #SBATCH --nodes")
    keys = fleet_keys(cfg, env)
    cmds = node_commands(cfg, topo, node, hosts, recipe, overrides, sglang_python(env), keys)
    sup = Supervisor(keys)
    for command in cmds["servers"] + cmds["routers"]:
        sup.start(command)
    done = done_file(cfg, env)
    try:
        if cmds["trainer"]:
            urls = health_urls(topo, hosts, keys)
            log("health", f"waiting for {len(urls)} endpoint(s)")
            timeout = float(env.get("RLAD_HEALTH_TIMEOUT_S", cfg.launch.health_timeout_s))
            wait_healthy(urls, timeout, alive=lambda: sup.any_failed() is None)
            log("train", "all servers healthy; starting the trainer")
            code = sup.start(cmds["trainer"][0]).wait()
            if node == topo.trainer_nodes[0] and not sup.stopping:
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(str(code))
            return code
        while not done.exists() and not sup.stopping:
            failed = sup.any_failed()
            if failed is not None:
                log("error", f"{' '.join(map(str, failed.args))} exited with {failed.returncode}")
                return failed.returncode
            time.sleep(POLL_S)
        return 0
    finally:
        log("stop", "stopping this node's processes")
        sup.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlad_megatron.launch.node", description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--dry-run", action="store_true", help="print this node's commands and exit")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    node, hosts = slurm_node()
    if args.dry_run:
        keys = fleet_keys(cfg, os.environ)
        cmds = node_commands(cfg, plan_topology(cfg), node, hosts, args.recipe, args.overrides,
                             sglang_python(os.environ), keys)
        for kind, items in cmds.items():
            for extra_env, cmd in items:
                print(kind, " ".join(f"{k}={v}" for k, v in extra_env.items()), " ".join(redact(cmd, keys)))
        return 0
    return run_node(cfg, args.recipe, args.overrides, node, hosts, os.environ)


if __name__ == "__main__":
    sys.exit(main())
