"""Which node runs what: a pure function from a `RunConfig` to a `Topology`.

Roles: the trainer (torchrun, Megatron ranks), the rollout fleet (student SGLang servers plus one router) and
the teacher fleet (teacher SGLang servers plus one router). Rules:

* One node: all roles share its GPUs (teacher first, then one rollout server, the trainer gets the rest).
* Several nodes: every node has one role. Role node counts of 0 in `launch` are automatic: the teacher gets
  the nodes one server needs (ceil(teacher_tp / gpus_per_node)), the rest is split between rollout
  (floor half) and trainer (ceil half).
* A server whose TP is at most gpus_per_node lives on one node (gpus_per_node / tp servers per node); a
  larger TP spans tp / gpus_per_node whole nodes (SGLang's --nnodes / --node-rank / --dist-init-addr).
* A fleet is launched only when its engine kind is 'auto' or 'sglang' (and, for the teacher, when the
  algorithm uses one); kind 'http' means servers run elsewhere, 'embedded' means inside the trainer.

* Ports: servers count up from launch.<fleet>_port on each node; a multi-node server's torch rendezvous
  uses its port + DIST_INIT_PORT_OFFSET; each router's Prometheus exporter uses its port +
  ROUTER_METRICS_PORT_OFFSET (sglang-router's default, 29000 for every router, makes the second router on a
  host fail).
* launch.server_impl=rlad (`rlad serve`, the CPU stand-in) serves tp 1 only.

Hosts are known only inside the job, so the topology speaks in node indices; `urls(hosts)` resolves them.
Left out: co-locating trainer and servers on the same GPUs (slime's colocate mode) and heterogeneous nodes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlad_megatron.config import RunConfig

DIST_INIT_PORT_OFFSET = 50  # multi-node SGLang server: torch rendezvous port = server port + this
ROUTER_METRICS_PORT_OFFSET = 100  # a router's Prometheus port = its own port + this


def metrics_port(router_port: int) -> int:
    """The Prometheus port of the router on `router_port` (distinct per router, so two can share a host)."""
    return router_port + ROUTER_METRICS_PORT_OFFSET


@dataclass(frozen=True)
class Server:
    """One SGLang server. `nodes[0]` serves HTTP on `port`; `gpus` are the CUDA indices used on each node."""

    fleet: str
    nodes: tuple[int, ...]
    gpus: tuple[int, ...]
    port: int
    tp: int


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    trainer_nodes: tuple[int, ...]
    trainer_gpus: tuple[int, ...]
    servers: tuple[Server, ...] = ()
    routers: dict[str, tuple[int, int]] = field(default_factory=dict)
    """fleet -> (node index, port) of its router."""

    def fleet(self, name: str) -> list[Server]:
        return [s for s in self.servers if s.fleet == name]

    def roles(self, node: int) -> list[str]:
        """Human-readable roles of one node, e.g. ['teacher x1 tp 8 port 31000 gpus 0-7', 'router(teacher):31800']."""
        out = []
        if node in self.trainer_nodes:
            out.append(f"trainer rank-node {self.trainer_nodes.index(node)} gpus {_span(self.trainer_gpus)}")
        for fleet in ("teacher", "rollout"):
            here = [s for s in self.fleet(fleet) if node in s.nodes]
            if not here:
                continue
            ports = sorted(s.port for s in here)
            part = f" node-rank {here[0].nodes.index(node)}/{len(here[0].nodes)}" if len(here[0].nodes) > 1 else ""
            gpus = sorted(g for s in here for g in s.gpus)
            out.append(f"{fleet} x{len(here)} tp {here[0].tp} port {_span(ports)} gpus {_span(gpus)}{part}")
        out += [f"router({f}):{p}" for f, (n, p) in sorted(self.routers.items()) if n == node]
        return out

    def urls(self, hosts: Sequence[str]) -> dict[str, str]:
        """fleet -> router URL, given the job's host names in node order."""
        if len(hosts) != self.nodes:
            raise ValueError(f"the job has {len(hosts)} nodes but the topology needs {self.nodes} (launch.nodes)")
        return {f: f"http://{hosts[n]}:{p}" for f, (n, p) in self.routers.items()}

    def server_urls(self, fleet: str, hosts: Sequence[str]) -> list[str]:
        return [f"http://{hosts[s.nodes[0]]}:{s.port}" for s in self.fleet(fleet)]

    def describe(self, hosts: Sequence[str] = ()) -> str:
        """One line per node: index, host (if known) and roles. This is what DRY_RUN prints."""
        hosts = list(hosts) or [f"node{i}" for i in range(self.nodes)]
        lines = [f"topology: {self.nodes} node(s) x {self.gpus_per_node} GPU(s)"]
        for i in range(self.nodes):
            lines.append(f"  node {i} ({hosts[i]}): " + ("; ".join(self.roles(i)) or "idle"))
        for fleet, url in sorted(self.urls(hosts).items()):
            lines.append(f"  {fleet}: router {url}, {len(self.fleet(fleet))} server(s)")
        return "\n".join(lines)


def fingerprint(topo: Topology) -> str:
    """Short hash of the placement; the rendered job carries it so nodes can detect an edited recipe."""
    return hashlib.sha256(topo.describe().encode()).hexdigest()[:16]


def _span(gpus: Sequence[int]) -> str:
    return f"{gpus[0]}-{gpus[-1]}" if len(gpus) > 1 else str(gpus[0])


def fleets_to_launch(cfg: RunConfig) -> tuple[bool, bool]:
    """(launch a rollout fleet, launch a teacher fleet) for this config."""
    rollout = cfg.rollout.kind in ("auto", "sglang")
    teacher = cfg.teacher.kind in ("auto", "sglang") and _needs_teacher_engine(cfg)
    return rollout, teacher


def _needs_teacher_engine(cfg: RunConfig) -> bool:
    """Asks the objective and the sample source, as the training loop does (sft from teacher traces too)."""
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.components import wants_teacher_engine
    from rlad_megatron.train import sample_source

    return wants_teacher_engine(build_objective(cfg.algorithm), sample_source(cfg))


def _fleet_servers(fleet: str, first_node: int, num_nodes: int, tp: int, gpn: int, port: int) -> list[Server]:
    if tp <= gpn:
        if gpn % tp:
            raise ValueError(
                f"launch.{fleet}_tp={tp} must divide launch.gpus_per_node={gpn} when the fleet has "
                "whole nodes (or be a multiple of it)"
            )
        per_node = gpn // tp
        return [
            Server(fleet, (n,), tuple(range(k * tp, (k + 1) * tp)), port + k, tp)
            for n in range(first_node, first_node + num_nodes)
            for k in range(per_node)
        ]
    if tp % gpn:
        raise ValueError(f"launch.{fleet}_tp={tp} is larger than launch.gpus_per_node={gpn} and must be a multiple")
    span = tp // gpn
    if num_nodes % span:
        raise ValueError(
            f"launch.{fleet}_nodes={num_nodes} must be a multiple of {span}: one {fleet} server with "
            f"tp={tp} spans {span} nodes of {gpn} GPUs"
        )
    return [
        Server(fleet, tuple(range(n, n + span)), tuple(range(gpn)), port, tp)
        for n in range(first_node, first_node + num_nodes, span)
    ]


def _single_node(cfg: RunConfig, want_rollout: bool, want_teacher: bool) -> Topology:
    la, gpn = cfg.launch, cfg.launch.gpus_per_node
    servers, next_gpu = [], 0
    for fleet, wanted, tp, port in (
        ("teacher", want_teacher, la.teacher_tp, la.teacher_port),
        ("rollout", want_rollout, la.rollout_tp, la.rollout_port),
    ):
        if wanted:
            servers.append(Server(fleet, (0,), tuple(range(next_gpu, next_gpu + tp)), port, tp))
            next_gpu += tp
    if next_gpu >= gpn:
        used = " + ".join(f"{s.fleet}_tp={s.tp}" for s in servers)
        raise ValueError(
            f"one node of {gpn} GPUs cannot hold the servers ({used}) and the trainer: lower "
            "launch.teacher_tp / launch.rollout_tp or use launch.nodes >= 3"
        )
    routers = {
        s.fleet: (0, la.teacher_router_port if s.fleet == "teacher" else la.rollout_router_port) for s in servers
    }
    return Topology(1, gpn, (0,), tuple(range(next_gpu, gpn)), tuple(servers), routers)


def _node_counts(cfg: RunConfig, want_rollout: bool, want_teacher: bool) -> tuple[int, int, int]:
    """(trainer, rollout, teacher) node counts; explicit counts are kept, zeros are filled in."""
    la = cfg.launch
    teacher_min = math.ceil(la.teacher_tp / la.gpus_per_node) if want_teacher else 0
    teacher = la.teacher_nodes or teacher_min
    if want_teacher and teacher * la.gpus_per_node < la.teacher_tp:
        raise ValueError(
            f"too few GPUs for the teacher: launch.teacher_nodes={teacher} x {la.gpus_per_node} GPUs "
            f"< launch.teacher_tp={la.teacher_tp}; raise teacher_nodes to {teacher_min} or lower teacher_tp"
        )
    rest = la.nodes - (teacher if want_teacher else 0)
    rollout = (la.rollout_nodes or (rest - la.trainer_nodes if la.trainer_nodes else rest // 2)) if want_rollout else 0
    trainer = la.trainer_nodes or rest - rollout
    if (
        trainer < 1
        or (want_rollout and rollout < 1)
        or trainer + rollout + (teacher if want_teacher else 0) != la.nodes
    ):
        raise ValueError(
            f"launch.nodes={la.nodes} cannot be split into trainer={trainer}, rollout={rollout}, "
            f"teacher={teacher if want_teacher else 0} whole nodes; use launch.nodes=1 (shared node) "
            "or enough nodes for every role, and make the explicit counts add up"
        )
    return trainer, rollout, teacher if want_teacher else 0


def plan_topology(cfg: RunConfig) -> Topology:
    """Assign node roles, GPUs and ports for `cfg.launch` (see the module docstring for the rules)."""
    want_rollout, want_teacher = fleets_to_launch(cfg)
    la = cfg.launch
    if want_teacher and la.nodes == 1 and la.teacher_tp > la.gpus_per_node:
        raise ValueError(
            f"too few GPUs for the teacher: launch.teacher_tp={la.teacher_tp} > "
            f"{la.gpus_per_node} GPUs on the only node; use more nodes or a smaller teacher_tp"
        )
    topo = (
        _single_node(cfg, want_rollout, want_teacher)
        if la.nodes == 1
        else _multi_node(cfg, *_node_counts(cfg, want_rollout, want_teacher))
    )
    _check_server_impl(la.server_impl, topo)
    _check_metrics_ports(topo, la.master_port)
    world = len(topo.trainer_nodes) * len(topo.trainer_gpus)
    par = cfg.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"the trainer has {world} GPUs, not a multiple of TP*PP*CP={model_parallel} (parallel.*); "
            "change launch.trainer_nodes or the parallel sizes"
        )
    return topo


def _check_server_impl(impl: str, topo: Topology) -> None:
    big = [s for s in topo.servers if s.tp > 1]
    if impl == "rlad" and big:
        raise ValueError(
            f"launch.server_impl=rlad runs each server as one CPU process (tp 1), but "
            f"launch.{big[0].fleet}_tp={big[0].tp}; set launch.rollout_tp=1 and launch.teacher_tp=1, "
            "or use launch.server_impl=sglang"
        )


def _check_metrics_ports(topo: Topology, master_port: int) -> None:
    """A router's Prometheus port must not be a port something else on the job listens on."""
    taken = {master_port} | {p for s in topo.servers for p in (s.port, s.port + DIST_INIT_PORT_OFFSET)}
    taken |= {p for _, p in topo.routers.values()}
    for fleet, (_, port) in sorted(topo.routers.items()):
        if metrics_port(port) in taken or metrics_port(port) > 65535:
            raise ValueError(
                f"the {fleet} router's Prometheus port launch.{fleet}_router_port + "
                f"{ROUTER_METRICS_PORT_OFFSET} = {metrics_port(port)} is taken or out of range; "
                f"move launch.{fleet}_router_port"
            )


def _multi_node(cfg: RunConfig, trainer: int, rollout: int, teacher: int) -> Topology:
    la, gpn = cfg.launch, cfg.launch.gpus_per_node
    servers: list[Server] = []
    routers: dict[str, tuple[int, int]] = {}
    first = 0
    for fleet, count, tp, port, router_port in (
        ("teacher", teacher, la.teacher_tp, la.teacher_port, la.teacher_router_port),
        ("rollout", rollout, la.rollout_tp, la.rollout_port, la.rollout_router_port),
    ):
        if count:
            servers += _fleet_servers(fleet, first, count, tp, gpn, port)
            routers[fleet] = (first, router_port)
            first += count
    return Topology(la.nodes, gpn, tuple(range(first, first + trainer)), tuple(range(gpn)), tuple(servers), routers)


def trainer_overrides(topo: Topology, hosts: Sequence[str], direct: Sequence[str] = ()) -> list[str]:
    """Overrides that point the trainer at the launched fleets.

    The rollout fleet is given its servers, not its router: weight sync must reach every server and
    sglang-router 0.3.2 forwards /flush_cache to all workers but not the update_weights_* calls. The frozen
    teacher is given its router (cache-aware routing reuses prompt prefixes across a group), unless it is in
    `direct` (a fleet with an API key runs no router; the trainer balances over its servers)."""
    out: list[str] = []
    for fleet in sorted(topo.routers):
        urls = topo.server_urls(fleet, hosts) if fleet == "rollout" or fleet in direct else [topo.urls(hosts)[fleet]]
        out += [f"{fleet}.kind=http", f"{fleet}.urls=[{','.join(urls)}]"]
    return out
