"""Which node runs what: a pure function from a `RunConfig` to a `Topology`.

Roles: the trainer (torchrun, Megatron ranks), the rollout fleet (student SGLang servers plus one router) and
the teacher fleet (teacher SGLang servers plus one router), or with several teachers (`teachers:`) one fleet
per teacher, named by its config section `teachers.<name>`. Rules:

* One node: all roles share its GPUs (the teachers first, one server each, then one rollout server, the
  trainer gets the rest).
* Several nodes: every node has one role. Role node counts of 0 in `launch` are automatic: each teacher gets
  the nodes one of its servers needs (ceil(tp / gpus_per_node); `teachers.<name>.launch_nodes` /
  `launch.teacher_nodes` when set), the rest is split between rollout (floor half) and trainer (ceil half).
  Teacher fleets come first, in config order, then rollout, then trainer.
* A server whose TP is at most gpus_per_node lives on one node (gpus_per_node / tp servers per node); a
  larger TP spans tp / gpus_per_node whole nodes (SGLang's --nnodes / --node-rank / --dist-init-addr).
* A fleet is launched only when its engine kind is 'auto' or 'sglang' (and, for the teacher, when the
  algorithm uses one); kind 'http' means servers run elsewhere, 'embedded' means inside the trainer.

* Ports: servers count up from launch.<fleet>_port on each node; the i-th of several teachers (from 0) starts
  at launch.teacher_port + i x gpus_per_node and its router listens on launch.teacher_router_port + i; a
  multi-node server's torch rendezvous
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

from rlad_megatron.config import EngineConfig, RunConfig, Teacher, teacher_by_section, teachers_of

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
        for fleet in dict.fromkeys(s.fleet for s in self.servers):  # teachers first, as placed
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


def fleets_to_launch(cfg: RunConfig) -> tuple[bool, list[Teacher]]:
    """(launch a rollout fleet, the teachers whose fleets to launch) for this config."""
    rollout = cfg.rollout.kind in ("auto", "sglang")
    wanted = _needs_teacher_engine(cfg)
    return rollout, [t for t in teachers_of(cfg) if wanted and t.engine.kind in ("auto", "sglang")]


def fleet_engine(cfg: RunConfig, fleet: str) -> tuple[EngineConfig, str]:
    """(engine settings, model folder) of the fleet named `fleet`: 'rollout', 'teacher' or 'teachers.<name>'."""
    if fleet == "rollout":
        return cfg.rollout, cfg.model.student
    teacher = teacher_by_section(cfg, fleet)
    return teacher.engine, teacher.model


def fleet_names(cfg: RunConfig) -> list[str]:
    """Every fleet a config can name: 'rollout' and each teacher's section."""
    return ["rollout", *(t.section for t in teachers_of(cfg))]


@dataclass(frozen=True)
class FleetPlace:
    """Where one fleet's ports start, and the config keys that set its TP / node count (for messages)."""

    name: str
    tp: int
    port: int
    router_port: int
    tp_key: str
    nodes_key: str


def _places(cfg: RunConfig, want_rollout: bool, teachers: Sequence[Teacher]) -> list[FleetPlace]:
    """The fleets to launch, teachers first (config order), then rollout."""
    la = cfg.launch
    out = []
    for i, t in enumerate(teachers):
        single = t.section == "teacher"
        out.append(
            FleetPlace(
                t.section,
                t.tp,
                la.teacher_port + i * la.gpus_per_node,
                la.teacher_router_port + i,
                "launch.teacher_tp" if single else f"{t.section}.launch_tp (default launch.teacher_tp)",
                "launch.teacher_nodes" if single else f"{t.section}.launch_nodes",
            )
        )
    if want_rollout:
        out.append(
            FleetPlace(
                "rollout",
                la.rollout_tp,
                la.rollout_port,
                la.rollout_router_port,
                "launch.rollout_tp",
                "launch.rollout_nodes",
            )
        )
    return out


def _needs_teacher_engine(cfg: RunConfig) -> bool:
    """Asks the objective and the sample source, as the training loop does (sft from teacher traces too)."""
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.components import wants_teacher_engine
    from rlad_megatron.train import sample_source

    return wants_teacher_engine(build_objective(cfg.algorithm), sample_source(cfg))


def _fleet_servers(place: FleetPlace, first_node: int, num_nodes: int, gpn: int) -> list[Server]:
    fleet, tp, port = place.name, place.tp, place.port
    if tp <= gpn:
        if gpn % tp:
            raise ValueError(
                f"{place.tp_key}={tp} must divide launch.gpus_per_node={gpn} when the fleet has "
                "whole nodes (or be a multiple of it)"
            )
        per_node = gpn // tp
        return [
            Server(fleet, (n,), tuple(range(k * tp, (k + 1) * tp)), port + k, tp)
            for n in range(first_node, first_node + num_nodes)
            for k in range(per_node)
        ]
    if tp % gpn:
        raise ValueError(f"{place.tp_key}={tp} is larger than launch.gpus_per_node={gpn} and must be a multiple")
    span = tp // gpn
    if num_nodes % span:
        raise ValueError(
            f"{place.nodes_key}={num_nodes} must be a multiple of {span}: one {fleet} server with "
            f"tp={tp} spans {span} nodes of {gpn} GPUs"
        )
    return [
        Server(fleet, tuple(range(n, n + span)), tuple(range(gpn)), port, tp)
        for n in range(first_node, first_node + num_nodes, span)
    ]


def _single_node(cfg: RunConfig, places: Sequence[FleetPlace]) -> Topology:
    gpn = cfg.launch.gpus_per_node
    servers, next_gpu = [], 0
    for place in places:
        servers.append(Server(place.name, (0,), tuple(range(next_gpu, next_gpu + place.tp)), place.port, place.tp))
        next_gpu += place.tp
    if next_gpu >= gpn:
        used = " + ".join(f"{_tp_name(s.fleet)}={s.tp}" for s in servers)
        raise ValueError(
            f"one node of {gpn} GPUs cannot hold the servers ({used}) and the trainer: lower "
            f"{_tp_keys(cfg, places)} or use launch.nodes >= 3"
        )
    routers = {p.name: (0, p.router_port) for p in places}
    return Topology(1, gpn, (0,), tuple(range(next_gpu, gpn)), tuple(servers), routers)


def _tp_keys(cfg: RunConfig, places: Sequence[FleetPlace]) -> str:
    if not cfg.teachers:
        return "launch.teacher_tp / launch.rollout_tp"
    return " / ".join(p.tp_key.split(" ")[0] for p in places)


def _tp_name(fleet: str) -> str:
    """How the one-node message names a fleet's TP: teacher_tp, rollout_tp, teachers.<name> tp."""
    return f"{fleet} tp" if "." in fleet else f"{fleet}_tp"


def _node_counts(cfg: RunConfig, want_rollout: bool, teachers: Sequence[Teacher]) -> tuple[int, int, list[int]]:
    """(trainer, rollout, [nodes of each teacher fleet]); explicit counts are kept, zeros are filled in."""
    la = cfg.launch
    counts = []
    for t, place in zip(teachers, _places(cfg, False, teachers)):
        need = math.ceil(t.tp / la.gpus_per_node)
        count = t.nodes or need
        if count * la.gpus_per_node < t.tp:
            who = "the teacher" if t.section == "teacher" else f"teacher {t.name!r}"
            raise ValueError(
                f"too few GPUs for {who}: {place.nodes_key}={count} x {la.gpus_per_node} GPUs "
                f"< {place.tp_key.split(' ')[0]}={t.tp}; raise {place.nodes_key} to {need} or lower its tp"
            )
        counts.append(count)
    rest = la.nodes - sum(counts)
    rollout = (la.rollout_nodes or (rest - la.trainer_nodes if la.trainer_nodes else rest // 2)) if want_rollout else 0
    trainer = la.trainer_nodes or rest - rollout
    if trainer < 1 or (want_rollout and rollout < 1) or trainer + rollout + sum(counts) != la.nodes:
        teacher_text = (
            f"teacher={sum(counts)}"
            if not cfg.teachers
            else ", ".join(f"{t.section}={n}" for t, n in zip(teachers, counts)) or "teacher=0"
        )
        raise ValueError(
            f"launch.nodes={la.nodes} cannot be split into trainer={trainer}, rollout={rollout}, "
            f"{teacher_text} whole nodes; use launch.nodes=1 (shared node) "
            "or enough nodes for every role, and make the explicit counts add up"
        )
    return trainer, rollout, counts


def plan_topology(cfg: RunConfig) -> Topology:
    """Assign node roles, GPUs and ports for `cfg.launch` (see the module docstring for the rules)."""
    want_rollout, teachers = fleets_to_launch(cfg)
    la = cfg.launch
    places = _places(cfg, want_rollout, teachers)
    for t, place in zip(teachers, places):
        if la.nodes == 1 and t.tp > la.gpus_per_node:
            who, key = ("the teacher", "teacher_tp") if t.section == "teacher" else (f"teacher {t.name!r}", "tp")
            raise ValueError(
                f"too few GPUs for {who}: {place.tp_key.split(' ')[0]}={t.tp} > "
                f"{la.gpus_per_node} GPUs on the only node; use more nodes or a smaller {key}"
            )
    if la.nodes == 1:
        topo = _single_node(cfg, places)
    else:
        trainer, rollout, teacher_nodes = _node_counts(cfg, want_rollout, teachers)
        topo = _multi_node(cfg, places, trainer, [*teacher_nodes, *([rollout] if want_rollout else [])])
    _check_server_impl(la.server_impl, topo, places)
    _check_metrics_ports(topo, la.master_port, places)
    _check_port_clashes(topo, la.master_port)
    world = len(topo.trainer_nodes) * len(topo.trainer_gpus)
    par = cfg.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"the trainer has {world} GPUs, not a multiple of TP*PP*CP={model_parallel} (parallel.*); "
            "change launch.trainer_nodes or the parallel sizes"
        )
    return topo


def _check_server_impl(impl: str, topo: Topology, places: Sequence[FleetPlace]) -> None:
    big = [s for s in topo.servers if s.tp > 1]
    if impl == "rlad" and big:
        key = {p.name: p.tp_key.split(" ")[0] for p in places}[big[0].fleet]
        raise ValueError(
            f"launch.server_impl=rlad runs each server as one CPU process (tp 1), but "
            f"{key}={big[0].tp}; set launch.rollout_tp=1 and launch.teacher_tp=1 (and every "
            "teachers.<name>.launch_tp to 0 or 1), or use launch.server_impl=sglang"
        )


def _router_port_key(fleet: str, places: Sequence[FleetPlace]) -> str:
    """The setting that moves a fleet's router port (several teachers: launch.teacher_router_port + i)."""
    if fleet in ("rollout", "teacher"):
        return f"launch.{fleet}_router_port"
    index = [p.name for p in places if p.name != "rollout"].index(fleet)
    return f"launch.teacher_router_port (+ {index} for {fleet})"


def _check_metrics_ports(topo: Topology, master_port: int, places: Sequence[FleetPlace]) -> None:
    """A router's Prometheus port must not be a port something else on the job listens on."""
    taken = {master_port} | {p for s in topo.servers for p in (s.port, s.port + DIST_INIT_PORT_OFFSET)}
    taken |= {p for _, p in topo.routers.values()}
    for fleet, (_, port) in sorted(topo.routers.items()):
        if metrics_port(port) in taken or metrics_port(port) > 65535:
            key = _router_port_key(fleet, places)
            raise ValueError(
                f"the {fleet} router's Prometheus port {key} + "
                f"{ROUTER_METRICS_PORT_OFFSET} = {metrics_port(port)} is taken or out of range; "
                f"move {key.split(' ')[0]}"
            )


def _check_port_clashes(topo: Topology, master_port: int) -> None:
    """No two listeners on one node share a port (several teachers' port ranges may run into each other or
    into another fleet's)."""
    listeners: dict[tuple[int, int], str] = {}

    def claim(node: int, port: int, what: str) -> None:
        other = listeners.setdefault((node, port), what)
        if other != what:
            raise ValueError(
                f"port {port} on node {node} is used by both {other} and {what}; move launch.teacher_port / "
                "launch.rollout_port / the router ports further apart (several teachers take "
                "launch.teacher_port + i x gpus_per_node)"
            )

    for node in topo.trainer_nodes[:1]:
        claim(node, master_port, "the trainer rendezvous")
    for s in topo.servers:
        claim(s.nodes[0], s.port, f"{s.fleet} server")
        if len(s.nodes) > 1:
            claim(s.nodes[0], s.port + DIST_INIT_PORT_OFFSET, f"{s.fleet} server rendezvous")
    for fleet, (node, port) in topo.routers.items():
        claim(node, port, f"{fleet} router")
        claim(node, metrics_port(port), f"{fleet} router metrics")


def _multi_node(cfg: RunConfig, places: Sequence[FleetPlace], trainer: int, counts: Sequence[int]) -> Topology:
    """`counts`: nodes of each fleet in `places` (teachers, then rollout); the trainer gets the last nodes."""
    la, gpn = cfg.launch, cfg.launch.gpus_per_node
    servers: list[Server] = []
    routers: dict[str, tuple[int, int]] = {}
    first = 0
    for place, count in zip(places, counts):
        if count:
            servers += _fleet_servers(place, first, count, gpn)
            routers[place.name] = (first, place.router_port)
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
