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
    assert [(s.fleet, s.gpus, s.port) for s in t.servers] == [("teacher", (0, 1, 2, 3), 31000),
                                                              ("rollout", (4, 5), 30000)]
    assert t.routers == {"teacher": (0, 31800), "rollout": (0, 30800)}


def test_four_nodes_one_role_each():
    t = topo("launch.nodes=4")
    assert [t.roles(i)[0].split()[0] for i in range(4)] == ["teacher", "rollout", "trainer", "trainer"]
    assert t.trainer_nodes == (2, 3) and t.trainer_gpus == tuple(range(8))
    assert [(s.nodes, s.gpus, s.port) for s in t.fleet("teacher")] == [((0,), (0, 1, 2, 3), 31000),
                                                                       ((0,), (4, 5, 6, 7), 31001)]
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


@pytest.mark.parametrize("overrides, message", [
    (["launch.nodes=1", "launch.teacher_tp=16"], "too few GPUs for the teacher"),
    (["launch.nodes=4", "launch.teacher_tp=16", "launch.teacher_nodes=1"], "too few GPUs for the teacher"),
    (["launch.nodes=1", "launch.teacher_tp=6"], "cannot hold the servers"),
    (["launch.nodes=2"], "cannot be split"),
    (["launch.nodes=4", "launch.teacher_tp=3"], "must divide launch.gpus_per_node"),
    (["launch.nodes=4", "parallel.tensor_model_parallel_size=8", "launch.gpus_per_node=4",
      "launch.teacher_tp=4", "launch.rollout_tp=1", "launch.trainer_nodes=1"], "not a multiple of TP\\*PP\\*CP"),
])
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
    assert argv[:6] == ["torchrun", "--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=h2",
                        "--master-port=29500"]
    assert argv[6:12] == ["-m", "rlad_megatron.cli", "train", "--config", "r.yaml", "train.lr=1e-6"]
    assert "teacher.urls=[http://h0:31800]" in argv and "rollout.urls=[http://h1:30000,http://h1:30001," \
        "http://h1:30002,http://h1:30003]" in argv
    teacher = node_commands(cfg, t, 0, hosts, "r.yaml", [])
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in teacher["servers"]] == ["0,1,2,3", "4,5,6,7"]
    _, server = teacher["servers"][1]
    assert server[server.index("--model-path") + 1] == "/models/Qwen3-32B" and "--port" in server
    assert server[server.index("--tp-size") + 1] == "4" and "--mem-fraction-static" not in server
    _, rollout = node_commands(cfg, t, 1, hosts, "r.yaml", [])["servers"][0]
    assert rollout[rollout.index("--model-path") + 1] == "/models/Qwen3-8B"
    assert rollout[-2:] == ["--mem-fraction-static", "0.8"]  # rollout.server_args passed through
    _, router = teacher["routers"][0]
    assert router[router.index("--worker-urls") + 1:] == ["http://h0:31000", "http://h0:31001"]
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
