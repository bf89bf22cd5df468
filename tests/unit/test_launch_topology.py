"""Node roles for 1, 4 and 16 nodes, bad layouts, and the commands each node runs."""

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.launch.node import health_urls, node_commands, server_command
from rlad_megatron.launch.topology import plan_topology, trainer_overrides

RECIPE = "tests/data/launch_qwen3_8b_32b.yaml"  # teacher_tp 4, rollout_tp 2, TP=2 student


def topo(*overrides):
    return plan_topology(load_config(RECIPE, list(overrides)))


def test_one_node_shares_gpus():
    t = topo("launch.nodes=1")
    assert t.trainer_nodes == (0,) and t.trainer_gpus == (6, 7)
    assert [(s.fleet, s.gpus, s.port) for s in t.servers] == [
        ("teacher", (0, 1, 2, 3), 31000),
        ("rollout", (4, 5), 30000),
    ]
    assert t.routers == {"teacher": (0, 31800), "rollout": (0, 30800)}


def test_four_nodes_one_role_each():
    t = topo("launch.nodes=4")
    assert [t.roles(i)[0].split()[0] for i in range(4)] == ["teacher", "rollout", "trainer", "trainer"]
    assert t.trainer_nodes == (2, 3) and t.trainer_gpus == tuple(range(8))
    assert [(s.nodes, s.gpus, s.port) for s in t.fleet("teacher")] == [
        ((0,), (0, 1, 2, 3), 31000),
        ((0,), (4, 5, 6, 7), 31001),
    ]
    assert [s.port for s in t.fleet("rollout")] == [30000, 30001, 30002, 30003]
    assert t.urls(["a", "b", "c", "d"]) == {"teacher": "http://a:31800", "rollout": "http://b:30800"}


def test_sixteen_nodes_with_a_tp16_teacher():
    t = topo("launch.nodes=16", "launch.teacher_tp=16", "launch.teacher_nodes=4", "launch.trainer_nodes=8")
    teachers = t.fleet("teacher")
    assert [s.nodes for s in teachers] == [(0, 1), (2, 3)]
    assert [len(t.fleet("rollout")), t.trainer_nodes] == [4 * 4, tuple(range(8, 16))]
    assert t.roles(1) == ["teacher x1 tp 16 port 31000 gpus 0-7 node-rank 1/2"]


def test_grpo_launches_no_teacher_and_http_fleets_are_not_launched():
    t = topo("launch.nodes=4", "algorithm.name=grpo")
    assert not t.fleet("teacher") and [len(t.fleet("rollout")), t.trainer_nodes] == [8, (2, 3)]
    t = topo("launch.nodes=1", "rollout.kind=http", "rollout.urls=[http://x:1]", "teacher.kind=embedded")
    assert t.servers == () and t.trainer_gpus == tuple(range(8))


def test_sft_gets_a_teacher_fleet_only_when_it_learns_from_teacher_generations():
    assert topo("launch.nodes=4", "algorithm.name=sft", "train.offline_source=teacher").fleet("teacher")
    assert not topo("launch.nodes=4", "algorithm.name=sft", "train.offline_source=dataset").fleet("teacher")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launch.nodes=1", "launch.teacher_tp=16"], "too few GPUs for the teacher"),
        (["launch.nodes=4", "launch.teacher_tp=16", "launch.teacher_nodes=1"], "too few GPUs for the teacher"),
        (["launch.nodes=1", "launch.teacher_tp=6"], "cannot hold the servers"),
        (["launch.nodes=2"], "cannot be split"),
        (["launch.nodes=4", "launch.teacher_tp=3"], "must divide launch.gpus_per_node"),
        (
            [
                "launch.nodes=4",
                "parallel.tensor_model_parallel_size=8",
                "launch.gpus_per_node=4",
                "launch.teacher_tp=4",
                "launch.rollout_tp=1",
                "launch.trainer_nodes=1",
            ],
            "not a multiple of TP\\*PP\\*CP",
        ),
    ],
)
def test_bad_layouts_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        topo(*overrides)


def test_node_commands_for_a_trainer_and_a_teacher_node():
    cfg = load_config(RECIPE, ["launch.nodes=4"])
    t = plan_topology(cfg)
    hosts = ["h0", "h1", "h2", "h3"]
    cmds = node_commands(cfg, t, 3, hosts, "r.yaml", ["train.lr=1e-6"])
    assert cmds["servers"] == [] and cmds["routers"] == []
    env, argv = cmds["trainer"][0]
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert argv[:6] == [
        "torchrun",
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=h2",
        "--master-port=29500",
    ]
    assert argv[6:12] == ["-m", "rlad_megatron.cli", "train", "--config", "r.yaml", "train.lr=1e-6"]
    assert (
        "teacher.urls=[http://h0:31800]" in argv
        and "rollout.urls=[http://h1:30000,http://h1:30001,http://h1:30002,http://h1:30003]" in argv
    )
    teacher = node_commands(cfg, t, 0, hosts, "r.yaml", [])
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in teacher["servers"]] == ["0,1,2,3", "4,5,6,7"]
    _, server = teacher["servers"][1]
    assert server[server.index("--model-path") + 1] == "/models/Qwen3-32B" and "--port" in server
    assert server[server.index("--tp-size") + 1] == "4" and "--mem-fraction-static" not in server
    _, rollout = node_commands(cfg, t, 1, hosts, "r.yaml", [])["servers"][0]
    assert rollout[rollout.index("--model-path") + 1] == "/models/Qwen3-8B"
    assert rollout[-2:] == ["--mem-fraction-static", "0.8"]  # rollout.server_args passed through
    _, router = teacher["routers"][0]
    assert router[router.index("--worker-urls") + 1 :] == ["http://h0:31000", "http://h0:31001"]
    assert len(health_urls(t, hosts)) == 2 + 4 + 2


def test_multi_node_server_and_owned_flags():
    cfg = load_config(RECIPE, ["launch.nodes=4", "launch.teacher_tp=16", "launch.teacher_nodes=2"])
    t = plan_topology(cfg)
    server = t.fleet("teacher")[0]
    _, argv = server_command(server, 1, ["h0", "h1", "h2", "h3"], "/m", {"enable_torch_compile": True})
    assert argv[argv.index("--node-rank") + 1] == "1" and argv[argv.index("--dist-init-addr") + 1] == "h0:31050"
    assert argv[-1] == "--enable-torch-compile"
    with pytest.raises(ValueError, match="set by the launcher"):
        server_command(server, 0, ["h0", "h1", "h2", "h3"], "/m", {"tp_size": 8})


def test_trainer_overrides_parse_as_config():
    cfg = load_config(RECIPE, ["launch.nodes=4"])
    over = trainer_overrides(plan_topology(cfg), ["h0", "h1", "h2", "h3"])
    again = load_config(RECIPE, ["launch.nodes=4", *over])
    assert again.teacher.kind == "http" and again.teacher.urls == ["http://h0:31800"]
    assert again.rollout.urls[0] == "http://h1:30000" and len(again.rollout.urls) == 4


# ---------------------------------------------------------------- GPU sets, bind address, server_impl
EXAMPLES = {"kk": "examples/qwen3_kk/recipe.yaml", "math": "examples/qwen3_math/recipe.yaml"}
LAYOUTS = [  # (recipe, overrides): 1, 2 and 8 nodes, shared and dedicated, nodes of 4 and 8 GPUs
    ("kk", []),
    ("kk", ["launch.rollout_tp=2", "launch.teacher_tp=4"]),
    ("kk", ["launch.gpus_per_node=4", "launch.rollout_tp=1", "launch.teacher_tp=1"]),
    (
        "math",
        [
            "launch.nodes=1",
            "launch.trainer_nodes=0",
            "launch.rollout_nodes=0",
            "launch.teacher_nodes=0",
            "launch.teacher_tp=2",
            "parallel.context_parallel_size=1",
        ],
    ),
    ("kk", ["launch.nodes=2", "algorithm.name=grpo"]),
    ("kk", ["launch.nodes=2", "teacher.kind=http", "teacher.urls=[http://t:1]", "launch.rollout_tp=4"]),
    (
        "math",
        [
            "launch.nodes=2",
            "launch.trainer_nodes=0",
            "launch.rollout_nodes=0",
            "launch.teacher_nodes=0",
            "algorithm.name=grpo",
        ],
    ),
    ("kk", ["launch.nodes=8"]),
    ("math", []),
    ("math", ["launch.teacher_tp=16"]),
    ("math", ["launch.gpus_per_node=4", "launch.rollout_tp=4", "launch.teacher_tp=8"]),
]


def visible_gpus(command) -> set[int]:
    env, _ = command
    return {int(g) for g in env["CUDA_VISIBLE_DEVICES"].split(",")}


@pytest.mark.parametrize("recipe, overrides", LAYOUTS, ids=[f"{r}:{' '.join(o) or 'as is'}" for r, o in LAYOUTS])
def test_every_nodes_trainer_and_servers_have_disjoint_gpus(recipe, overrides):
    cfg = load_config(EXAMPLES[recipe], overrides)
    t = plan_topology(cfg)
    hosts = [f"h{i}" for i in range(t.nodes)]
    for node in range(t.nodes):
        cmds = node_commands(cfg, t, node, hosts, "r.yaml", [])
        sets = [visible_gpus(c) for c in cmds["servers"] + cmds["trainer"]]
        assert sets, f"node {node} runs nothing"
        for i, gpus in enumerate(sets):
            assert gpus <= set(range(cfg.launch.gpus_per_node)), f"node {node}: GPUs {gpus} beyond the node"
            for other in sets[i + 1 :]:
                assert not gpus & other, f"node {node}: GPUs {sorted(gpus & other)} given twice: {sets}"


def test_servers_and_routers_bind_rlad_bind_host_with_a_prometheus_port_each():
    cfg = load_config(RECIPE, ["launch.nodes=1"])
    t = plan_topology(cfg)
    for env, host in (({}, "0.0.0.0"), ({"RLAD_BIND_HOST": "127.0.0.3"}, "127.0.0.3")):
        cmds = node_commands(cfg, t, 0, ["127.0.0.3"], "r.yaml", [], env=env)
        assert [argv[argv.index("--host") + 1] for _, argv in cmds["servers"] + cmds["routers"]] == [host] * 4
        metrics = []
        for (_, argv), (_, port) in zip(cmds["routers"], (t.routers[f] for f in sorted(t.routers))):
            assert argv[argv.index("--prometheus-host") + 1] == host
            metrics.append(int(argv[argv.index("--prometheus-port") + 1]))
            assert metrics[-1] == port + 100
        assert len(set(metrics)) == 2


def test_a_routers_prometheus_port_must_be_free():
    with pytest.raises(ValueError, match="rollout router's Prometheus port"):
        topo("launch.nodes=1", "launch.rollout_router_port=29900")  # + 100 = the first rollout server's port


def test_rlad_serve_gets_sglangs_flags_its_weights_root_and_its_key_by_environment(tmp_path):
    import sys

    cfg = load_config(
        RECIPE,
        [
            "launch.nodes=1",
            "launch.server_impl=rlad",
            "launch.teacher_tp=1",
            "launch.rollout_tp=1",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    t = plan_topology(cfg)
    cmds = node_commands(cfg, t, 0, ["h0"], "r.yaml", [], keys={"teacher": "K3Y"}, env={})
    (teacher_env, teacher), (rollout_env, rollout) = cmds["servers"]
    assert teacher[:4] == [sys.executable, "-m", "rlad_megatron.cli", "serve"]
    assert teacher[teacher.index("--model-path") + 1] == "/models/Qwen3-32B" and "--tp-size" in teacher
    assert teacher[teacher.index("--weights-root") + 1] == str((tmp_path / "run").resolve())
    assert "K3Y" not in teacher and "--api-key" not in teacher and teacher_env["RLAD_API_KEY"] == "K3Y"
    assert rollout_env["RLAD_API_KEY"] == "" and rollout[-2:] == ["--mem-fraction-static", "0.8"]
    assert [argv[0] for _, argv in cmds["routers"]] == [sys.executable]  # rollout only: the teacher is keyed
    sglang = node_commands(
        load_config(RECIPE, ["launch.nodes=1"]),
        topo("launch.nodes=1"),
        0,
        ["h0"],
        "r.yaml",
        [],
        keys={"teacher": "K3Y"},
        env={"RLAD_SGLANG_PYTHON": "/opt/sglang/bin/python"},
    )
    (_, teacher), _ = sglang["servers"]
    assert teacher[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"] and "--weights-root" not in teacher
    assert teacher[teacher.index("--api-key") + 1] == "K3Y"


def test_launch_sglang_python_wins_over_the_environment():
    cfg = load_config(RECIPE, ["launch.nodes=1", "launch.sglang_python=/venvs/sglang/bin/python"])
    cmds = node_commands(cfg, plan_topology(cfg), 0, ["h0"], "r.yaml", [], env={"RLAD_SGLANG_PYTHON": "/other"})
    assert {argv[0] for _, argv in cmds["servers"] + cmds["routers"]} == {"/venvs/sglang/bin/python"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launch.nodes=1", "launch.server_impl=rlad"], "launch.server_impl=rlad runs each server as one CPU process"),
        (["launch.server_impl=vllm"], "launch.server_impl='vllm' is not allowed"),
        (["launch.restart_servers=-1"], "launch.restart_servers=-1 is invalid"),
    ],
)
def test_server_impl_and_restarts_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        topo(*overrides)
