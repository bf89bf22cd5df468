"""The node agent's supervision on CPU: fake SGLang servers (tiny HTTP servers) stand in for the real ones.

With FAKE_PIDS set, every fake server start appends its pid to FAKE_PIDS/<port>, so a test can kill one and
watch the agent start it again.
"""

import os
import signal
import socket
import sys
import threading
import time

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.launch import node as agent
from rlad_megatron.launch import supervise

RECIPE = "tests/data/launch_qwen3_8b_32b.yaml"
FAKE_SGLANG = """import os, sys, http.server
port = int(sys.argv[sys.argv.index("--port") + 1])
if os.environ.get("FAKE_PIDS"):
    with open(os.path.join(os.environ["FAKE_PIDS"], str(port)), "a") as f:
        f.write(f"{os.getpid()}\\n")
if "--fail" in sys.argv:
    sys.exit(3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/health_generate") else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fake_python(tmp_path, script: str) -> str:
    """An executable standing in for SGLang's python: it runs `script` whatever arguments it gets."""
    exe = tmp_path / "fake_python"
    exe.write_text(f"#!{sys.executable}\n{script}")
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def fake_sglang(tmp_path):
    return fake_python(tmp_path, FAKE_SGLANG)


def config(tmp_path, nodes, extra=()):
    rollout, teacher, rrouter, trouter = free_ports(4)
    return load_config(
        RECIPE,
        [
            f"launch.nodes={nodes}",
            f"run_dir={tmp_path / 'run'}",
            "launch.gpus_per_node=4",
            "launch.teacher_tp=2",
            "launch.rollout_tp=1",
            "parallel.tensor_model_parallel_size=1",
            "parallel.sequence_parallel=false",
            f"launch.rollout_port={rollout}",
            f"launch.teacher_port={teacher}",
            f"launch.rollout_router_port={rrouter}",
            f"launch.teacher_router_port={trouter}",
            *extra,
        ],
    )


def test_wait_healthy_times_out_with_a_clear_error():
    (port,) = free_ports(1)
    with pytest.raises(TimeoutError, match="not healthy after 0 s"):
        agent.wait_healthy([f"http://127.0.0.1:{port}/health"], timeout_s=0.2, poll_s=0.05)


def test_single_node_waits_for_servers_then_trains_and_stops_them(tmp_path, fake_sglang, monkeypatch):
    cfg = config(tmp_path, 1)
    probe = tmp_path / "trainer_saw_servers"
    url = f"http://127.0.0.1:{cfg.launch.teacher_router_port}/health"
    code = f"import urllib.request; urllib.request.urlopen('{url}'); open('{probe}', 'w').write('ok')"
    trainer = [sys.executable, "-c", code]
    real_wait = agent.wait_healthy
    monkeypatch.setattr(agent, "trainer_command", lambda *a, **k: ({}, trainer))
    monkeypatch.setattr(agent, "wait_healthy", lambda urls, timeout, **kw: real_wait(urls, timeout, 0.1, **kw))
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "7"}
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"], env) == 0
    assert probe.read_text() == "ok"
    assert agent.done_file(cfg, env).read_text() == "0"


def test_server_node_stops_when_the_trainer_is_done(tmp_path, fake_sglang, monkeypatch):
    monkeypatch.setattr(agent, "POLL_S", 0.1)
    cfg = config(tmp_path, 3)
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "8", "SLURM_RESTART_COUNT": "1"}
    done = agent.done_file(cfg, env)
    assert done.name == "done.8.1"

    def finish_later():
        time.sleep(1.5)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("0")

    threading.Thread(target=finish_later, daemon=True).start()
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"] * 3, env) == 0  # node 0: two teacher servers + router
    assert done.exists(), "the server node returned before the trainer wrote its done file"


def test_a_crashing_server_fails_the_node(tmp_path, fake_sglang, monkeypatch):
    monkeypatch.setattr(agent, "POLL_S", 0.1)
    cfg = config(tmp_path, 3, ["rollout.server_args={fail: true}", "launch.restart_servers=0"])
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "9"}
    assert agent.run_node(cfg, RECIPE, [], 1, ["127.0.0.1"] * 3, env) == 3  # node 1: rollout servers exit 3


def test_an_edited_recipe_or_wrong_node_count_is_refused(tmp_path):
    from rlad_megatron.launch.render import render
    from rlad_megatron.launch.topology import fingerprint, plan_topology

    cfg = config(tmp_path, 3)
    script = render(cfg, RECIPE, [])
    assert f'RLAD_TOPOLOGY_FINGERPRINT="{fingerprint(plan_topology(cfg))}"' in script
    with pytest.raises(ValueError, match="re-run `rlad render`"):
        agent.run_node(cfg, RECIPE, [], 0, ["h"] * 3, {"RLAD_TOPOLOGY_FINGERPRINT": "0123456789abcdef"})
    with pytest.raises(ValueError, match="the job has 2 nodes but launch.nodes=3"):
        agent.run_node(cfg, RECIPE, [], 0, ["h"] * 2, {})


def pids(folder, port) -> list[int]:
    path = folder / str(port)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def fast_restarts(tmp_path, monkeypatch):
    """Record fake-server pids; poll and back off in tenths of a second instead of seconds."""
    folder = tmp_path / "pids"
    folder.mkdir()
    monkeypatch.setenv("FAKE_PIDS", str(folder))
    monkeypatch.setattr(agent, "POLL_S", 0.1)
    monkeypatch.setattr(supervise, "RESTART_BACKOFF_S", 0.1)
    return folder


TRAINER_KILLS_A_SERVER = """if True:
    import os, signal, sys, time, urllib.request
    path = os.path.join({folder!r}, "{port}")
    os.kill(int(open(path).read().split()[0]), signal.SIGKILL)
    for _ in range(600):
        time.sleep(0.1)
        if len(open(path).read().split()) < 2:
            continue
        try:
            urllib.request.urlopen("http://127.0.0.1:{port}/health_generate", timeout=2)
            sys.exit(0)
        except OSError:
            pass
    sys.exit(1)
"""


def test_a_killed_server_is_restarted_while_the_trainer_runs(tmp_path, fake_sglang, fast_restarts, monkeypatch):
    """The trainer (a script here) kills the rollout server with SIGKILL, then needs it back to finish."""
    cfg = config(tmp_path, 1)
    port = cfg.launch.rollout_port
    trainer = [sys.executable, "-c", TRAINER_KILLS_A_SERVER.format(folder=str(fast_restarts), port=port)]
    real_wait = agent.wait_healthy
    monkeypatch.setattr(agent, "trainer_command", lambda *a, **k: ({}, trainer))
    monkeypatch.setattr(agent, "wait_healthy", lambda urls, timeout, **kw: real_wait(urls, timeout, 0.1, **kw))
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "12"}
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"], env) == 0
    assert len(pids(fast_restarts, port)) == 2 and len(pids(fast_restarts, cfg.launch.teacher_port)) == 1


def test_a_server_node_restarts_a_killed_server(tmp_path, fake_sglang, fast_restarts, capfd):
    cfg = config(tmp_path, 3)
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "13"}
    done, port = agent.done_file(cfg, env), cfg.launch.teacher_port + 1  # node 0: teacher servers + router
    restarted = []

    def kill_then_finish():
        if wait_for(lambda: pids(fast_restarts, port)):
            os.kill(pids(fast_restarts, port)[0], signal.SIGKILL)
            restarted.append(
                wait_for(
                    lambda: (
                        len(pids(fast_restarts, port)) == 2
                        and agent._ok(f"http://127.0.0.1:{port}/health_generate", timeout_s=2)
                    )
                )
            )
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("0")

    threading.Thread(target=kill_then_finish, daemon=True).start()
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"] * 3, env) == 0
    assert restarted == [True]
    assert "exited with -9; restart 1/3" in capfd.readouterr().out


def test_a_crash_looping_server_ends_the_node_once_its_restarts_are_used(tmp_path, fake_sglang, fast_restarts, capfd):
    cfg = config(
        tmp_path, 3, ["rollout.server_args={fail: true}", "launch.restart_servers=2", "launch.rollout_tp=4"]
    )  # node 1: one rollout server
    env = {"RLAD_SGLANG_PYTHON": fake_sglang, "SLURM_JOB_ID": "14"}
    assert agent.run_node(cfg, RECIPE, [], 1, ["127.0.0.1"] * 3, env) == 3
    assert len(pids(fast_restarts, cfg.launch.rollout_port)) == 3  # the first start and two restarts
    out = capfd.readouterr().out
    assert "restart 2/2" in out and "no restarts left (launch.restart_servers=2)" in out
