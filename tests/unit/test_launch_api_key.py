"""The node agent with a fleet API key: servers get --api-key, probes send the bearer key, no open router,
and the key never reaches logs, --dry-run output or the rendered sbatch script."""

import subprocess
import sys

import pytest
from test_launch_node_agent import RECIPE, config, fake_python, free_ports

from rlad_megatron.launch import node as agent
from rlad_megatron.launch.render import render
from rlad_megatron.launch.topology import plan_topology

KEY = "s3cret-fleet-key"
# A fake SGLang server that, like SGLang's api-key middleware, answers 401 without the right bearer key.
FAKE_KEYED_SGLANG = """import sys, http.server
port = int(sys.argv[sys.argv.index("--port") + 1])
key = sys.argv[sys.argv.index("--api-key") + 1] if "--api-key" in sys.argv else ""
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = not key or self.headers.get("Authorization") == "Bearer " + key
        self.send_response(404 if self.path not in ("/health", "/health_generate") else 200 if ok else 401)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@pytest.fixture
def keyed_sglang(tmp_path):
    return fake_python(tmp_path, FAKE_KEYED_SGLANG)


def test_keyed_fleets_get_the_key_option_no_router_and_direct_trainer_urls(tmp_path):
    cfg = config(tmp_path, 3)
    topo, hosts = plan_topology(cfg), ["n0", "n1", "n2"]
    keys = agent.fleet_keys(cfg, {"RLAD_API_KEY": KEY})
    assert keys == {"rollout": KEY, "teacher": KEY}
    node0 = agent.node_commands(cfg, topo, 0, hosts, RECIPE, [], keys=keys)  # node 0: teacher servers + router
    for _, argv in node0["servers"]:
        assert argv[argv.index("--api-key") + 1] == KEY
    assert node0["routers"] == []
    trainer = agent.node_commands(cfg, topo, topo.trainer_nodes[0], hosts, RECIPE, [], keys=keys)["trainer"]
    teacher_urls = next(a for a in trainer[0][1] if a.startswith("teacher.urls="))
    assert teacher_urls == f"teacher.urls=[{','.join(topo.server_urls('teacher', hosts))}]"
    routers = tuple(topo.urls(hosts).values())
    assert not any(u.startswith(routers) for u in agent.health_urls(topo, hosts, keys))


def test_without_a_key_nothing_changes(tmp_path):
    cfg = config(tmp_path, 3)
    topo, hosts = plan_topology(cfg), ["n0", "n1", "n2"]
    keys = agent.fleet_keys(cfg, {})
    assert keys == {"rollout": "", "teacher": ""}
    assert agent.node_commands(cfg, topo, 0, hosts, RECIPE, [], keys=keys) == agent.node_commands(
        cfg, topo, 0, hosts, RECIPE, []
    )
    assert not any("--api-key" in argv for _, argv in agent.node_commands(cfg, topo, 0, hosts, RECIPE, [])["servers"])
    routers = tuple(topo.urls(hosts).values())
    assert sum(u.startswith(routers) for u in agent.health_urls(topo, hosts, keys)) == len(topo.routers)


def test_probes_send_the_bearer_key_and_logs_do_not_show_it(tmp_path, keyed_sglang, monkeypatch, capfd):
    cfg = config(tmp_path, 1)
    trainer_argv, real_trainer = [], agent.trainer_command

    def fake_trainer(*args, **kwargs):
        trainer_argv.append(real_trainer(*args, **kwargs)[1])
        return {}, [sys.executable, "-c", "pass"]

    real_wait = agent.wait_healthy
    monkeypatch.setattr(agent, "trainer_command", fake_trainer)
    monkeypatch.setattr(agent, "wait_healthy", lambda urls, timeout, **kw: real_wait(urls, 20, 0.1, **kw))
    env = {"RLAD_SGLANG_PYTHON": keyed_sglang, "SLURM_JOB_ID": "11", "RLAD_API_KEY": KEY}
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"], env) == 0
    assert f"teacher.urls=[http://127.0.0.1:{cfg.launch.teacher_port}]" in trainer_argv[0]
    out = capfd.readouterr().out
    assert "--api-key <redacted>" in out and KEY not in out


def test_probes_without_the_key_are_refused(tmp_path, keyed_sglang):
    (port,) = free_ports(1)
    server = subprocess.Popen([keyed_sglang, "-m", "sglang.launch_server", "--port", str(port), "--api-key", KEY])
    try:
        url = f"http://127.0.0.1:{port}/health_generate"
        agent.wait_healthy({url: agent.auth_headers(KEY)}, 20, 0.1)
        with pytest.raises(TimeoutError):
            agent.wait_healthy([url], 0.3, 0.1)
    finally:
        server.terminate()
        server.wait()


def test_dry_run_and_rendered_script_do_not_contain_the_key(tmp_path, monkeypatch, capsys):
    cfg = config(tmp_path, 3)
    monkeypatch.setenv("RLAD_API_KEY", KEY)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[0-2]")
    monkeypatch.setenv("SLURM_NODEID", "0")
    overrides = [
        "launch.nodes=3",
        "launch.gpus_per_node=4",
        "launch.teacher_tp=2",
        "launch.rollout_tp=1",
        "parallel.tensor_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        f"run_dir={tmp_path}",
    ]
    assert agent.main([RECIPE, *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--api-key <redacted>" in out and KEY not in out
    script = tmp_path / "job.sbatch"
    script.write_text(render(cfg, RECIPE, []))
    assert KEY not in script.read_text()
    shown = subprocess.run(
        ["bash", str(script)],
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "RLAD_API_KEY": KEY},
        capture_output=True,
        text=True,
        check=True,
    )
    assert KEY not in shown.stdout + shown.stderr


def test_render_refuses_a_key_in_overrides_or_launch_env(tmp_path):
    cfg = config(tmp_path, 3)
    with pytest.raises(ValueError, match="export RLAD_API_KEY"):
        render(cfg, RECIPE, [f"teacher.api_key={KEY}"])
    keyed_env = config(tmp_path, 3, ["launch.env={RLAD_API_KEY: x}"])
    with pytest.raises(ValueError, match="RLAD_API_KEY would write the API key"):
        render(keyed_env, RECIPE, [])
