"""Several teachers on a cluster: `rlad plan` sizes each teacher fleet, the topology places each one, the node
agent starts each one with its own model, and the trainer is pointed at each one."""

import json

import pytest

from rlad_megatron.cli import main as rlad
from rlad_megatron.config import load_config
from rlad_megatron.launch.capacity import load_arch, score_seconds
from rlad_megatron.launch.hardware import gpu as gpu_spec
from rlad_megatron.launch.node import fleet_keys, health_urls, node_commands
from rlad_megatron.launch.plan import format_plan, make_plan
from rlad_megatron.launch.topology import plan_topology, trainer_overrides

RECIPE = "tests/data/launch_two_teachers.yaml"  # math: Qwen3-32B tp 4, code: Qwen3-14B tp 2, rollout tp 2
HOSTS = ["h0", "h1", "h2", "h3"]


def topo(*overrides):
    return plan_topology(load_config(RECIPE, list(overrides)))


def test_one_node_holds_each_teacher_then_rollout_then_the_trainer():
    t = topo("launch.nodes=1", "teachers.math.launch_tp=2", "teachers.code.launch_tp=1", "launch.rollout_tp=1")
    assert [(s.fleet, s.gpus, s.port) for s in t.servers] == [
        ("teachers.math", (0, 1), 31000),
        ("teachers.code", (2,), 31008),  # teacher_port + 1 x gpus_per_node
        ("rollout", (3,), 30000),
    ]
    assert t.trainer_gpus == (4, 5, 6, 7)
    assert t.routers == {"teachers.math": (0, 31800), "teachers.code": (0, 31801), "rollout": (0, 30800)}
    assert t.roles(0)[1:3] == ["teachers.math x1 tp 2 port 31000 gpus 0-1", "teachers.code x1 tp 1 port 31008 gpus 2"]


def test_four_nodes_give_each_teacher_its_own_node():
    t = topo()
    assert [t.roles(i)[0].split()[0] for i in range(4)] == ["teachers.math", "teachers.code", "rollout", "trainer"]
    assert [(s.nodes, s.gpus, s.port) for s in t.fleet("teachers.math")] == [
        ((0,), (0, 1, 2, 3), 31000),
        ((0,), (4, 5, 6, 7), 31001),
    ]
    assert [(s.nodes, s.port) for s in t.fleet("teachers.code")] == [((1,), 31008 + k) for k in range(4)]
    assert t.urls(HOSTS) == {
        "teachers.math": "http://h0:31800",
        "teachers.code": "http://h1:31801",
        "rollout": "http://h2:30800",
    }


def test_launch_nodes_per_teacher_and_too_few_nodes():
    t = topo("launch.nodes=6", "teachers.math.launch_nodes=2", "launch.trainer_nodes=2")
    assert [len(t.fleet("teachers.math")), len(t.fleet("teachers.code")), t.trainer_nodes] == [4, 4, (4, 5)]
    with pytest.raises(ValueError, match=r"teachers.math=1, teachers.code=1 whole nodes"):
        topo("launch.nodes=3")
    with pytest.raises(ValueError, match=r"too few GPUs for teacher 'math': teachers.math.launch_tp=16 > 8 GPUs"):
        topo("launch.nodes=1", "teachers.math.launch_tp=16")
    with pytest.raises(ValueError, match=r"teachers.math.launch_nodes=1 x 8 GPUs < teachers.math.launch_tp=16"):
        topo("teachers.math.launch_tp=16", "teachers.math.launch_nodes=1")


def test_an_http_teacher_gets_no_fleet_and_a_port_clash_is_refused():
    t = topo("launch.nodes=3", "teachers.code.kind=http", "teachers.code.urls=[http://elsewhere:1]")
    assert sorted(t.routers) == ["rollout", "teachers.math"] and not t.fleet("teachers.code")
    with pytest.raises(ValueError, match=r"port 31008 on node 0 is used by both teachers.code server and rollout"):
        topo(
            "launch.nodes=1",
            "teachers.math.launch_tp=1",
            "teachers.code.launch_tp=1",
            "launch.rollout_tp=1",
            "launch.rollout_port=31008",
        )


def test_the_trainer_is_pointed_at_each_teacher_and_each_node_starts_its_own_model():
    cfg = load_config(RECIPE)
    t = plan_topology(cfg)
    again = load_config(RECIPE, trainer_overrides(t, HOSTS))
    assert (again.teachers["math"].kind, again.teachers["math"].urls) == ("http", ["http://h0:31800"])
    assert (again.teachers["code"].kind, again.teachers["code"].urls) == ("http", ["http://h1:31801"])
    assert again.teachers["math"].model == "/models/Qwen3-32B"  # the override keeps the rest of the section
    for node, model, tp in ((0, "/models/Qwen3-32B", "4"), (1, "/models/Qwen3-14B", "2")):
        cmds = node_commands(cfg, t, node, HOSTS, "r.yaml", [])
        for _, argv in cmds["servers"]:
            assert argv[argv.index("--model-path") + 1] == model and argv[argv.index("--tp-size") + 1] == tp
        ((_, router),) = cmds["routers"]
        assert str(t.routers[["teachers.math", "teachers.code"][node]][1]) in router
    assert len(health_urls(t, HOSTS)) == 2 + 4 + 4 + 3  # servers of math, code, rollout, and their routers


def test_a_keyed_teacher_gets_its_own_key_and_no_router():
    cfg = load_config(RECIPE, ["teachers.code.api_key_env=CODE_KEY"])
    keys = fleet_keys(cfg, {"CODE_KEY": "k-code", "RLAD_API_KEY": "k-shared"})
    assert keys == {"rollout": "k-shared", "teachers.math": "k-shared", "teachers.code": "k-code"}
    keys["teachers.math"] = ""  # only the code teacher keyed
    t = plan_topology(cfg)
    code = node_commands(cfg, t, 1, HOSTS, "r.yaml", [], keys=keys)
    assert code["routers"] == [] and all(argv[argv.index("--api-key") + 1] == "k-code" for _, argv in code["servers"])
    trainer = node_commands(cfg, t, 3, HOSTS, "r.yaml", [], keys=keys)["trainer"][0][1]
    assert f"teachers.code.urls=[{','.join(f'http://h1:{31008 + k}' for k in range(4))}]" in trainer


def test_plan_sizes_each_teacher_fleet_on_an_even_share():
    cfg = load_config(RECIPE)
    plan = make_plan(cfg)
    assert "teacher" not in plan and set(plan["teachers"]) == {"math", "code"}
    math, code = plan["teachers"]["math"], plan["teachers"]["code"]
    assert (math["tp"], math["num_servers"], code["tp"], code["num_servers"]) == (4, 2, 2, 4)
    assert math["params"] > code["params"] > 0
    share = 32 * 8 // 2
    seq_len = 1024 * 0.25 + 8192 * 0.5
    h200 = gpu_spec("h200")
    expected = {
        name: score_seconds(load_arch(folder)[0], h200, num_gpus=8, num_seqs=share, seq_len=seq_len)
        for name, folder in (("math", "/models/Qwen3-32B"), ("code", "/models/Qwen3-14B"))
    }
    assert math["score_seconds"] == pytest.approx(expected["math"])
    assert code["score_seconds"] == pytest.approx(expected["code"])
    assert plan["seconds"]["teacher_score"] == pytest.approx(max(expected.values()))  # they score at once
    text = format_plan(plan)
    assert "teacher math server/GPU: 2 server(s) tp 4" in text and "teacher code server/GPU: 4 server(s) tp 2" in text
    assert plan["node_split"]["nodes"]["teacher"] >= 2  # two fleets cannot share one node


def test_rlad_plan_cli_on_a_two_teacher_recipe(capsys):
    assert rlad(["plan", RECIPE, "--nodes", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["teachers"]) == {"math", "code"} and plan["seconds"]["teacher_score"] > 0


def test_rlad_rehearse_refuses_several_teachers_with_the_way_out(tmp_path, capsys):
    assert rlad(["rehearse", RECIPE, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has several teachers (`teachers:`), which rlad rehearse does not shrink yet" in err
    assert not (tmp_path / "out" / "models").exists()  # refused before building anything


def test_the_node_agent_starts_both_teacher_fleets_before_the_trainer(tmp_path, monkeypatch):
    """One node, fake SGLang servers: the agent starts each teacher's server and router, waits for all of them,
    then runs the trainer (here a probe of both teachers' routers)."""
    import sys

    from test_launch_node_agent import FAKE_SGLANG, fake_python, free_ports

    from rlad_megatron.launch import node as agent

    rollout, teacher, rollout_router, teacher_router = free_ports(4)
    cfg = load_config(
        RECIPE,
        [
            "launch.nodes=1",
            f"run_dir={tmp_path / 'run'}",
            "launch.gpus_per_node=4",
            "teachers.math.launch_tp=1",
            "teachers.code.launch_tp=1",
            "launch.rollout_tp=1",
            "parallel.tensor_model_parallel_size=1",
            f"launch.rollout_port={rollout}",
            f"launch.teacher_port={teacher}",
            f"launch.rollout_router_port={rollout_router}",
            f"launch.teacher_router_port={teacher_router}",
        ],
    )
    topo = plan_topology(cfg)
    assert [s.port for s in topo.servers] == [teacher, teacher + 4, rollout]
    probe = tmp_path / "trainer_saw_teachers"
    urls = [f"http://127.0.0.1:{teacher_router + i}/health_generate" for i in range(2)]
    code = f"import urllib.request\nfor u in {urls!r}: urllib.request.urlopen(u)\nopen({str(probe)!r}, 'w').write('ok')"
    monkeypatch.setattr(agent, "trainer_command", lambda *a, **k: ({}, [sys.executable, "-c", code]))
    real_wait = agent.wait_healthy
    waited = []

    def wait(urls, timeout, **kw):
        waited.extend(urls)
        return real_wait(urls, timeout, 0.1, **kw)

    monkeypatch.setattr(agent, "wait_healthy", wait)
    env = {"RLAD_SGLANG_PYTHON": fake_python(tmp_path, FAKE_SGLANG), "SLURM_JOB_ID": "8"}
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"], env) == 0
    assert probe.read_text() == "ok"
    ports = sorted(int(u.split(":")[2].split("/")[0]) for u in waited)
    assert ports == sorted([teacher, teacher + 4, rollout, teacher_router, teacher_router + 1, rollout_router])
