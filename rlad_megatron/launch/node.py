"""The node agent: `srun --ntasks-per-node=1 python -m rlad_megatron.launch.node RECIPE [overrides]`.

Every node of the job runs this one program. It recomputes the topology from the recipe (a pure function, so
all nodes agree without talking), looks up its own node index (SLURM_NODEID) and starts what that node runs:
servers, a fleet's router, and on trainer nodes `torchrun` once every server answers its health check.
Trainer node 0 writes a done-file into the run folder when training ends; server-only nodes wait for it (or
for SIGTERM) and then stop their servers. Meanwhile every node restarts its own crashed servers and routers
(`launch.restart_servers` times each, launch/supervise.py). SIGTERM/SIGINT/SIGUSR1 are forwarded (as
SIGTERM) to the children, so a preempted job stops cleanly; the requeued job resumes from the checkpoint in
the run folder.

Servers are SGLang (`<sglang python> -m sglang.launch_server`, launch.server_impl=sglang) or the CPU stand-in
`rlad serve` (server_impl=rlad) with the same flags, plus `--weights-root <run_dir>` for disk weight sync.
Servers and routers bind $RLAD_BIND_HOST (default 0.0.0.0: trainers on other nodes must reach them; a
rehearsal on one machine gives each emulated node its own loopback address).

Command construction is pure (`server_command`, `router_command`, `trainer_command`) and unit-tested; the
process supervision around them is thin.

API key: when a fleet's key is set (`<fleet>.api_key`, or the environment variable named by
`<fleet>.api_key_env`, which the sbatch job exports to every node), its servers get `--api-key` (SGLang has no
environment variable for it, so the key is on the server's command line; logs and --dry-run show
`<redacted>`; `rlad serve` reads it from RLAD_API_KEY instead), the health probes send
`Authorization: Bearer <key>`, and no router is started for that fleet: sglang-router 0.3.2's `--api-key`
only authenticates the router to its workers, its own port would stay open, so the trainer balances over the
servers itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rlad_megatron.config import RunConfig, load_config
from rlad_megatron.engines.fleet import router_cmd
from rlad_megatron.launch.env import slurm_node
from rlad_megatron.launch.supervise import Command, Supervisor, exit_status, log, redact
from rlad_megatron.launch.topology import (
    DIST_INIT_PORT_OFFSET,
    Server,
    Topology,
    fingerprint,
    fleet_engine,
    fleet_names,
    metrics_port,
    plan_topology,
    trainer_overrides,
)

POLL_S = 2.0  # how often a node checks its children and (server-only nodes) the done-file
DEFAULT_BIND_HOST = "0.0.0.0"


def _server_flags(server_args: Mapping[str, object]) -> list[str]:
    """SGLang server_args dict -> CLI flags ({mem_fraction_static: 0.8, enable_x: True} -> --mem-fraction-static 0.8
    --enable-x). Launch-owned flags are rejected so the topology stays the single source of TP and ports."""
    owned = {
        "tp",
        "tp_size",
        "tensor_parallel_size",
        "port",
        "host",
        "model_path",
        "nnodes",
        "node_rank",
        "dist_init_addr",
        "api_key",
    }
    flags: list[str] = []
    for key, value in server_args.items():
        if key in owned:
            raise ValueError(
                f"server_args.{key} is set by the launcher (use launch.*_tp / launch.*_port, and "
                "<fleet>.api_key_env for the key); remove it"
            )
        if value is False or value is None:
            continue
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags.append(str(value))
    return flags


def fleet_keys(cfg: RunConfig, env: Mapping[str, str]) -> dict[str, str]:
    """{'rollout': key, 'teacher': key} (several teachers: 'teachers.<name>' each): the config's key, else the
    one in `env[<fleet>.api_key_env]`, else ''."""
    engines = {f: fleet_engine(cfg, f)[0] for f in fleet_names(cfg)}
    return {f: e.api_key or env.get(e.api_key_env, "") for f, e in engines.items()}


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


SERVER_MODULES = {"sglang": ["sglang.launch_server"], "rlad": ["rlad_megatron.cli", "serve"]}


def server_command(
    server: Server,
    node: int,
    hosts: Sequence[str],
    model: str,
    server_args: Mapping[str, object],
    python: str = "python",
    api_key: str = "",
    bind_host: str = DEFAULT_BIND_HOST,
    impl: str = "sglang",
    weights_root: str = "",
) -> Command:
    """The server process of `server` on `node` (one process per node of a multi-node server): SGLang, or
    `rlad serve` with the same flags (impl='rlad'; it also gets `--weights-root` and its key by environment)."""
    argv = [
        python,
        "-m",
        *SERVER_MODULES[impl],
        "--model-path",
        model,
        "--tp-size",
        str(server.tp),
        "--host",
        bind_host,
        "--port",
        str(server.port),
    ]
    if len(server.nodes) > 1:
        argv += [
            "--nnodes",
            str(len(server.nodes)),
            "--node-rank",
            str(server.nodes.index(node)),
            "--dist-init-addr",
            f"{hosts[server.nodes[0]]}:{server.port + DIST_INIT_PORT_OFFSET}",
        ]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, server.gpus))}
    if impl == "rlad":
        # argv is visible to every user of the node (ps); the environment is not. Always set, so a key the
        # agent inherited for another fleet never reaches this one.
        env["RLAD_API_KEY"] = api_key
        argv += ["--weights-root", weights_root] if weights_root else []
    elif api_key:
        argv += ["--api-key", api_key]
    return env, argv + _server_flags(server_args)


def router_command(
    topo: Topology,
    fleet: str,
    hosts: Sequence[str],
    timeout_s: int,
    python: str = "python",
    bind_host: str = DEFAULT_BIND_HOST,
) -> Command:
    """The sglang_router process in front of one fleet, its Prometheus exporter on its own port + 100."""
    _, port = topo.routers[fleet]
    argv = router_cmd(
        python,
        topo.server_urls(fleet, hosts),
        bind_host,
        port,
        metrics_port(port),
        "cache_aware",
        extra=["--worker-startup-timeout-secs", str(timeout_s)],
    )
    return {}, argv


def trainer_command(
    topo: Topology,
    node: int,
    hosts: Sequence[str],
    recipe: str,
    overrides: Sequence[str],
    master_port: int,
    direct: Sequence[str] = (),
) -> Command:
    """torchrun on one trainer node; the trainer reaches the fleets through `trainer_overrides` (the fleets in
    `direct` through their servers; the trainer reads their keys from its own config / environment)."""
    nproc = len(topo.trainer_gpus)
    argv = ["torchrun", f"--nproc-per-node={nproc}"]
    if len(topo.trainer_nodes) == 1:
        argv += ["--standalone"]
    else:
        argv += [
            f"--nnodes={len(topo.trainer_nodes)}",
            f"--node-rank={topo.trainer_nodes.index(node)}",
            f"--master-addr={hosts[topo.trainer_nodes[0]]}",
            f"--master-port={master_port}",
        ]
    # `rlad train` resumes from the latest checkpoint in run_dir by default, which is what a requeued job needs.
    argv += [
        "-m",
        "rlad_megatron.cli",
        "train",
        "--config",
        recipe,
        *overrides,
        *trainer_overrides(topo, hosts, direct),
    ]
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, topo.trainer_gpus))}, argv


def node_commands(
    cfg: RunConfig,
    topo: Topology,
    node: int,
    hosts: Sequence[str],
    recipe: str,
    overrides: Sequence[str],
    python: str = "",
    keys: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, list[Command]]:
    """Everything `node` runs: {'servers': [...], 'routers': [...], 'trainer': [...]} (trainer has 0 or 1).
    `python`: SGLang's interpreter (default: `sglang_python`); `env`: the agent's environment
    (RLAD_SGLANG_PYTHON, RLAD_BIND_HOST); `keys` ({fleet: api key}, from `fleet_keys`): keyed fleets get
    their key and no router."""
    keys, env = keys or {}, env or {}
    la, host, sglang = cfg.launch, bind_host(env), python or sglang_python(cfg, env)
    models = {f: fleet_engine(cfg, f)[1] for f in fleet_names(cfg)}
    args = {f: fleet_engine(cfg, f)[0].server_args for f in fleet_names(cfg)}
    server_python = sys.executable if la.server_impl == "rlad" else sglang  # rlad serve: this agent's environment
    weights_root = str(Path(cfg.run_dir).resolve())  # disk weight sync writes under it (rlad serve's allow-list)
    servers = [
        server_command(
            s,
            node,
            hosts,
            models[s.fleet],
            args[s.fleet],
            server_python,
            keys.get(s.fleet, ""),
            host,
            la.server_impl,
            weights_root,
        )
        for s in topo.servers
        if node in s.nodes
    ]
    routers = [
        router_command(topo, f, hosts, la.health_timeout_s, sglang, host)
        for f, (n, _) in sorted(topo.routers.items())
        if n == node and not keys.get(f)
    ]
    direct = sorted(f for f in topo.routers if keys.get(f))
    trainer = (
        [trainer_command(topo, node, hosts, recipe, overrides, cfg.launch.master_port, direct)]
        if node in topo.trainer_nodes
        else []
    )
    return {"servers": servers, "routers": routers, "trainer": trainer}


def health_urls(
    topo: Topology, hosts: Sequence[str], keys: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """What must answer 200 before training, {url: request headers}: the /health_generate of every server and
    of every router that is started (none for a keyed fleet, see `node_commands`). A router's /health says 200
    before it has registered any worker; its /health_generate only once it can route a request."""
    keys = keys or {}
    urls = {
        f"{u}/health_generate": auth_headers(keys.get(f, "")) for f in topo.routers for u in topo.server_urls(f, hosts)
    }
    return urls | {f"{u}/health_generate": {} for f, u in topo.urls(hosts).items() if not keys.get(f)}


def wait_healthy(
    urls: Sequence[str] | Mapping[str, Mapping[str, str]],
    timeout_s: float,
    poll_s: float = 5.0,
    alive: Callable[[], bool] = lambda: True,
    probe_timeout_s: float = 30.0,
) -> None:
    """Poll until every URL answers 200; fail early when `alive()` says a local server process died for good.
    `urls` may map each URL to the headers its probe sends (the fleet's bearer key); one probe may take
    `probe_timeout_s` (SGLang's /health_generate runs a generation)."""
    headers = urls if isinstance(urls, Mapping) else {}
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        if not alive():
            raise RuntimeError(
                "a server process on this node exited before every endpoint was healthy; see its log above"
            )
        pending = [u for u in pending if not _ok(u, headers.get(u), probe_timeout_s)]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(pending)} endpoint(s) not healthy after {timeout_s:.0f} s, e.g. {pending[0]}; "
                "see the server logs, or raise launch.health_timeout_s"
            )
        if pending:
            time.sleep(poll_s)


def _ok(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> bool:
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def sglang_python(cfg: RunConfig, env: Mapping[str, str]) -> str:
    """Interpreter of the SGLang environment (in the image: the base Python, not the trainer's venv):
    launch.sglang_python, else RLAD_SGLANG_PYTHON, else `python` (server_impl=rlad: this agent's interpreter,
    whose environment has sglang-router)."""
    fallback = sys.executable if cfg.launch.server_impl == "rlad" else "python"
    return cfg.launch.sglang_python or env.get("RLAD_SGLANG_PYTHON", "") or fallback


def bind_host(env: Mapping[str, str]) -> str:
    """Address servers and routers listen on: RLAD_BIND_HOST, default 0.0.0.0 (reachable from other nodes)."""
    return env.get("RLAD_BIND_HOST", "") or DEFAULT_BIND_HOST


def probe_timeout(cfg: RunConfig) -> float:
    """Seconds one health probe may take: the fleets' own setting (<fleet>.health_timeout_s)."""
    return max(fleet_engine(cfg, f)[0].health_timeout_s for f in fleet_names(cfg))


def _label(kind: str, command: Command) -> str:
    argv = command[1]
    return f"{kind} on port {argv[argv.index('--port') + 1]}" if "--port" in argv else kind


def supervise_until(sup: Supervisor, finished: Callable[[], bool]) -> int | None:
    """Keep this node's servers and routers up until `finished()` or a signal; a child out of restarts ends
    the wait with its exit status (never 0: a server must not exit while the job runs)."""
    while not finished() and not sup.stopping:
        failed = sup.supervise()
        if failed is not None:
            return exit_status(failed.proc.returncode) or 1
        time.sleep(POLL_S)
    return None


def done_file(cfg: RunConfig, env: Mapping[str, str]) -> Path:
    """Per job attempt (a requeued job keeps its id but bumps SLURM_RESTART_COUNT)."""
    job = env.get("SLURM_JOB_ID", "local")
    return Path(cfg.run_dir) / "launch" / f"done.{job}.{env.get('SLURM_RESTART_COUNT', '0')}"


def run_node(
    cfg: RunConfig, recipe: str, overrides: Sequence[str], node: int, hosts: Sequence[str], env: Mapping[str, str]
) -> int:
    topo = plan_topology(cfg)
    expected = env.get("RLAD_TOPOLOGY_FINGERPRINT", "")
    if expected and expected != fingerprint(topo):
        raise ValueError(
            f"the recipe {recipe} no longer gives the placement this job was rendered with "
            f"({fingerprint(topo)} != {expected}); re-run `rlad render` and resubmit"
        )
    if len(hosts) != topo.nodes:
        raise ValueError(f"the job has {len(hosts)} nodes but launch.nodes={topo.nodes}; fix #SBATCH --nodes")
    keys = fleet_keys(cfg, env)
    cmds = node_commands(cfg, topo, node, hosts, recipe, overrides, keys=keys, env=env)
    sup = Supervisor(keys, cfg.launch.restart_servers)
    try:
        for kind in ("servers", "routers"):
            for command in cmds[kind]:
                sup.start(command, _label(kind[:-1], command), restartable=True)
        if cmds["trainer"]:
            return _run_trainer(cfg, topo, node, hosts, env, keys, cmds["trainer"][0], sup)
        done = done_file(cfg, env)
        return supervise_until(sup, done.exists) or 0
    finally:
        log("stop", "stopping this node's processes")
        sup.close()


def _run_trainer(
    cfg: RunConfig,
    topo: Topology,
    node: int,
    hosts: Sequence[str],
    env: Mapping[str, str],
    keys: Mapping[str, str],
    command: Command,
    sup: Supervisor,
) -> int:
    """Wait for every endpoint, run torchrun while keeping this node's servers up, write the done-file."""
    urls = health_urls(topo, hosts, keys)
    log("health", f"waiting for {len(urls)} endpoint(s)")
    timeout = float(env.get("RLAD_HEALTH_TIMEOUT_S", cfg.launch.health_timeout_s))
    wait_healthy(urls, timeout, alive=lambda: sup.supervise() is None, probe_timeout_s=probe_timeout(cfg))
    log("train", "all servers healthy; starting the trainer")
    trainer = sup.start(command, "trainer")
    failed = supervise_until(sup, lambda: trainer.poll() is not None)
    if failed is not None:
        return failed
    code = exit_status(trainer.returncode) if trainer.poll() is not None else 143  # 143: stopped by a signal
    if node == topo.trainer_nodes[0] and not sup.stopping:
        done = done_file(cfg, env)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(str(code))
    return code


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
        cmds = node_commands(
            cfg, plan_topology(cfg), node, hosts, args.recipe, args.overrides, keys=keys, env=os.environ
        )
        for kind, items in cmds.items():
            for extra_env, cmd in items:
                shown_env = redact([f"{k}={v}" for k, v in extra_env.items()], keys)
                print(kind, " ".join(shown_env), " ".join(redact(cmd, keys)))
        return 0
    return run_node(cfg, args.recipe, args.overrides, node, hosts, os.environ)


if __name__ == "__main__":
    sys.exit(main())
