"""`rlad rehearse`'s pure parts: model shapes, the recipe shrinking, the fake srun's per-node environment and
semantics, the report's checks. The whole rehearsal runs in tests/integration/test_rehearse.py."""

import json
import subprocess
import sys
import time

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.launch import fake_slurm
from rlad_megatron.launch import rehearse_inputs as inputs
from rlad_megatron.launch import rehearse_report as report
from rlad_megatron.launch import rehearse_shrink as shrink
from rlad_megatron.launch.env import expand_hostlist

KK, MATH = "examples/qwen3_kk/recipe.yaml", "examples/qwen3_math/recipe.yaml"


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    "folder, heads, kv, tie",
    [
        ("/models/Qwen3-1.7B", 16, 8, True),
        ("/models/Qwen3-8B-Base", 32, 8, False),
        ("/nowhere/Qwen3-32B", 64, 8, False),
    ],
)
def test_published_shapes_come_from_the_table_when_the_folder_is_absent(folder, heads, kv, tie):
    src = inputs.source_model(folder)
    assert (src.family, src.vocab_size, src.num_attention_heads, src.num_key_value_heads, src.tie_word_embeddings) == (
        "qwen3",
        151936,
        heads,
        kv,
        tie,
    )
    assert (src.rms_norm_eps, src.rope_theta) == (1e-6, 1_000_000.0)
    assert "built-in table" in src.origin


def test_a_config_json_wins_and_an_unknown_model_names_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 1000,
                "num_attention_heads": 12,
                "num_key_value_heads": 4,
                "tie_word_embeddings": False,
                "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 5e5},
            }
        )
    )
    src = inputs.source_model(str(tmp_path))
    assert (src.family, src.vocab_size, src.num_attention_heads, src.rope_theta) == ("llama", 1000, 12, 5e5)
    with pytest.raises(ValueError, match="put the model's config.json in /models/MyModel-7B"):
        inputs.source_model("/models/MyModel-7B")


@pytest.mark.parametrize("name, tensor, pipeline", [("Qwen3-32B", 1, 1), ("Qwen3-1.7B", 2, 1), ("Qwen3-8B", 1, 2)])
def test_tiny_models_keep_vocab_gqa_ratio_and_tying_and_fit_the_layout(name, tensor, pipeline):
    src = inputs.source_model(f"/models/{name}")
    f = inputs.tiny_model_fields(src, pipeline=pipeline, tensor=tensor)
    assert f["vocab_size"] == 151936 and f["tie_word_embeddings"] == src.tie_word_embeddings
    assert f["num_attention_heads"] // f["num_key_value_heads"] == src.num_attention_heads // src.num_key_value_heads
    assert f["num_key_value_heads"] % tensor == 0 and f["num_hidden_layers"] % pipeline == 0
    assert f["hidden_size"] == 64 and f["head_dim"] == 16


def test_llama_family_derives_head_dim_from_hidden():
    src = inputs.SourceModel("llama", 1000, 32, 8, False, 1e-5, 5e5, "test")
    f = inputs.tiny_model_fields(src, tensor=2)
    assert "head_dim" not in f and f["hidden_size"] == f["num_attention_heads"] * 16


def test_missing_data_file_becomes_rows_with_the_recipes_fields(tmp_path):
    cfg = load_config(MATH, ["data.prompt_key=question", "data.answer_key=gold", "data.metadata_keys=[difficulty,src]"])
    assert inputs.needs_replacement(cfg.data.train) and not inputs.needs_replacement("reasoning_gym:knights_knaves")
    path = inputs.write_addition_rows(tmp_path / "train.jsonl", cfg.data, 4, "train", 0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"question", "gold", "solution", "difficulty", "src"}
    assert rows[0]["src"] == "rehearsal" and isinstance(rows[0]["difficulty"], int)


# ----------------------------------------------------------------------------- shrinking
def _fields(changes):
    return {c.field: c.value for c in changes}


def test_kk_keeps_tensor_parallel_2_on_one_node_of_4_gpus():
    cfg = load_config(KK)
    got = _fields(shrink.layout_changes(cfg, want_teacher=True) + shrink.job_size_changes(cfg, 3))
    assert "parallel.tensor_model_parallel_size" not in got and got["launch.gpus_per_node"] == 4
    assert "launch.nodes" not in got
    assert got["train.num_steps"] == 3 and got["checkpoint.interval"] == 1 and got["data.task_kwargs.size"] == 16


def test_math_becomes_context_parallel_2_over_three_emulated_nodes():
    changes = shrink.layout_changes(load_config(MATH), want_teacher=True)
    cfg = load_config(MATH, [c.override() for c in changes])
    la = cfg.launch
    par = cfg.parallel
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size) == (1, 1, 2)
    assert cfg.parallel.sequence_parallel is False
    assert (
        la.nodes,
        la.trainer_nodes,
        la.rollout_nodes,
        la.teacher_nodes,
        la.gpus_per_node,
        la.rollout_tp,
        la.teacher_tp,
    ) == (3, 1, 1, 1, 2, 1, 1)


@pytest.mark.parametrize(
    "tp, pp, cp, want",
    [
        (2, 1, 1, (2, 1, 1)),
        (4, 2, 1, (1, 2, 1)),
        (8, 1, 1, (2, 1, 1)),
        (1, 4, 1, (1, 2, 1)),
        (1, 1, 1, (1, 1, 1)),
        (4, 1, 2, (1, 1, 2)),
        (2, 1, 4, (1, 1, 2)),
    ],
)
def test_trainer_layout_fits_two_processes(tp, pp, cp, want):
    assert shrink.trainer_layout(tp, pp, cp) == want


def test_the_users_overrides_win_and_every_change_loads():
    cfg = load_config(MATH)
    changes = shrink.without_user_fields(
        shrink.job_size_changes(cfg, 3) + shrink.machine_changes(cfg, False), ["train.prompts_per_step=4"]
    )
    assert "train.prompts_per_step" not in _fields(changes)
    shrunk = load_config(MATH, [c.override() for c in changes] + ["train.prompts_per_step=4"])
    assert (shrunk.train.prompts_per_step, shrunk.launch.container_image, shrunk.launch.server_impl) == (4, "", "rlad")


def test_busy_ports_move_by_whole_blocks_and_free_ones_stay():
    cfg = load_config(MATH)
    busy = {("127.0.0.2", 30001), ("127.0.0.1", 31800)}
    changes = shrink.port_changes(
        cfg,
        {
            "launch.rollout_port": ["127.0.0.2"],
            "launch.teacher_router_port": ["127.0.0.1"],
            "launch.teacher_port": ["127.0.0.1"],
        },
        {"launch.rollout_port": 2, "launch.teacher_port": 2},
        free=lambda host, port: (host, port) not in busy,
    )
    assert _fields(changes) == {"launch.rollout_port": 30097, "launch.teacher_router_port": 31897}


def test_table_lists_every_change():
    text = shrink.table([shrink.Change("launch.container_image", "img.sqsh", "", "no container")])
    assert "| launch.container_image | img.sqsh | ''" in text and "no container" in text


def test_out_folder_is_fresh_and_a_foreign_one_is_refused(tmp_path):
    from rlad_megatron.launch import rehearse

    out = tmp_path / "r"
    rehearse.prepare_out(out)
    (out / "run").mkdir()
    rehearse.prepare_out(out)  # made by a rehearsal: emptied
    assert [p.name for p in out.iterdir()] == [rehearse.MARKER]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not made by rlad rehearse"):
        rehearse.prepare_out(tmp_path / "mine")
    assert rehearse.default_out(KK) == "runs/rehearse/qwen3_kk"


# ----------------------------------------------------------------------------- fake srun
def test_nodelist_and_per_node_environment():
    hosts = expand_hostlist(fake_slurm.loopback_nodelist(3))
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    env = fake_slurm.node_env(
        {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "127.0.0.[1-3]", "SLURM_RESTART_COUNT": "1"}, 2, hosts
    )
    assert {
        k: env[k]
        for k in (
            "SLURM_NODEID",
            "SLURM_PROCID",
            "SLURM_LOCALID",
            "SLURM_NTASKS",
            "SLURM_NNODES",
            "SLURM_RESTART_COUNT",
            "SLURM_JOB_ID",
            "RLAD_BIND_HOST",
        )
    } == {
        "SLURM_NODEID": "2",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "3",
        "SLURM_NNODES": "3",
        "SLURM_RESTART_COUNT": "1",
        "SLURM_JOB_ID": "7",
        "RLAD_BIND_HOST": "127.0.0.3",
    }


def test_srun_options_end_at_the_command():
    options, command = fake_slurm.parse_srun(
        ["--nodes=3", "-N", "3", "--kill-on-bad-exit=1", "python", "-m", "x", "--y"]
    )
    assert options == {"--nodes": "3", "-N": "3", "--kill-on-bad-exit": "1"} and command == ["python", "-m", "x", "--y"]
    with pytest.raises(ValueError, match="no container runtime"):
        fake_slurm._check_options({"--container-image": "img"}, ["h"])


def _srun(tmp_path, script: str, nodes: int = 2, kill_on_bad_exit: bool = True) -> subprocess.Popen:
    bin_dir = fake_slurm.write_bin(tmp_path / "bin")
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": fake_slurm.loopback_nodelist(nodes)}
    flags = ["--kill-on-bad-exit=1"] if kill_on_bad_exit else []
    return subprocess.Popen(
        [str(bin_dir / "srun"), f"--nodes={nodes}", *flags, sys.executable, "-c", script], env=env, cwd=tmp_path
    )


def test_srun_starts_one_task_per_node_with_its_own_variables(tmp_path):
    script = "import json, os; json.dump(dict(os.environ), open(f'node{os.environ[\"SLURM_NODEID\"]}.json', 'w'))"
    assert _srun(tmp_path, script, nodes=3).wait(timeout=60) == 0
    seen = [json.loads((tmp_path / f"node{i}.json").read_text()) for i in range(3)]
    assert [(e["SLURM_PROCID"], e["RLAD_BIND_HOST"], e["SLURMD_NODENAME"]) for e in seen] == [
        ("0", "127.0.0.1", "127.0.0.1"),
        ("1", "127.0.0.2", "127.0.0.2"),
        ("2", "127.0.0.3", "127.0.0.3"),
    ]


def test_kill_on_bad_exit_ends_the_others_and_reports_the_worst_status(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "if os.environ['SLURM_NODEID'] == '1': sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, lambda *a: (open('terminated', 'w').close(), sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    assert _srun(tmp_path, script).wait(timeout=60) == 3
    assert time.monotonic() - start < 20 and (tmp_path / "terminated").exists()


def test_sigterm_reaches_every_task(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (open('got' + os.environ['SLURM_NODEID'], 'w').close(), "
        "sys.exit(143)))\n"
        "open('ready' + os.environ['SLURM_NODEID'], 'w').close(); time.sleep(60)\n"
    )
    proc = _srun(tmp_path, script, kill_on_bad_exit=False)
    deadline = time.monotonic() + 30
    while not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=30) == 143
    assert (tmp_path / "got0").exists() and (tmp_path / "got1").exists()


# ----------------------------------------------------------------------------- report checks
ROWS = [
    {
        "step": 1,
        "kind": "train",
        "time/generate": 1.0,
        "time/step": 2.0,
        "kl/rollout_vs_old_max_abs": 2e-6,
        "num_samples": 4.0,
    },
    {
        "step": 2,
        "kind": "train",
        "time/generate": 1.5,
        "time/step": 2.5,
        "kl/rollout_vs_old_max_abs": 3e-6,
        "num_samples": 4.0,
    },
]


def test_logprob_check_needs_the_metric_and_a_small_gap():
    assert report.check_logprobs(ROWS).ok
    assert not report.check_logprobs([dict(ROWS[0], **{"kl/rollout_vs_old_max_abs": 0.05})]).ok
    assert not report.check_logprobs([{k: v for k, v in ROWS[0].items() if not k.startswith("kl/")}]).ok


def test_steps_samples_and_versions_checks():
    assert report.check_steps(ROWS, 2).ok and not report.check_steps(ROWS[1:], 2).ok
    assert report.check_samples(ROWS, 4).ok and not report.check_samples(ROWS, 8).ok
    attempt = report.Attempt(
        0,
        0,
        10.0,
        "",
        [
            {"url": "u1", "fleet": "rollout", "version": "2"},
            {"url": "u2", "fleet": "rollout", "version": "1"},
            {"url": "t", "fleet": "teacher", "version": "0"},
        ],
    )
    assert not report.check_versions(attempt, 2).ok
    attempt.servers[1]["version"] = "2"
    assert report.check_versions(attempt, 2).ok


def test_phase_table_has_a_row_per_step():
    lines = report.phase_table(ROWS).splitlines()
    assert lines[0] == "| step | generate | step | max abs lp diff |" and lines[3].startswith(
        "| 2 | 1.50 | 2.50 | 3.00e-06"
    )


def test_plan_table_puts_plan_shares_beside_steady_state_measured_shares():
    rows = [
        {"step": 1, "time/generate": 100.0, "time/train": 1.0},  # start-up: left out
        {"step": 2, "time/generate": 3.0, "time/score": 1.0, "time/logprobs": 0.5, "time/train": 0.5},
        {"step": 3, "time/generate": 5.0, "time/score": 1.0, "time/logprobs": 0.5, "time/train": 1.5},
    ]
    measured = report.measured_seconds(rows)
    assert measured == {"generate": 4.0, "teacher_score": 1.0, "train": 1.5, "weight_sync": 0.0}
    table = report.plan_table({"generate": 80.0, "teacher_score": 10.0, "train": 10.0}, rows).splitlines()
    assert table[2] == "| generate | 80.0 | 80% | 4.00 | 62% |"
    assert table[4] == "| train | 10.0 | 10% | 1.50 | 23% |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| generate", "| teacher_score", "| train"]


def test_plan_table_says_why_there_is_no_estimate():
    assert report.plan_table(None, ROWS, "no config.json") == "No plan estimate: no config.json"
