"""Environment discovery: Slurm host lists, torchrun / Slurm / default rank variables."""

import pytest

from rlad_megatron.launch.env import (
    discover,
    ensure_torchrun_env,
    expand_hostlist,
    slurm_node,
)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu-01", ["gpu-01"]),
        ("gpu-[01-03,07]", ["gpu-01", "gpu-02", "gpu-03", "gpu-07"]),
        ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_bad_hostlist_is_a_clear_error():
    with pytest.raises(ValueError, match="bad Slurm host range"):
        expand_hostlist("gpu-[a-b]")


def test_torchrun_variables_win_over_slurm():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }
    found = discover(env)
    assert (found.rank, found.world_size, found.local_rank, found.master_addr, found.master_port, found.source) == (
        3,
        8,
        1,
        "h0",
        1234,
        "torchrun",
    )


def test_slurm_variables_and_master_from_first_host():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    found = discover(env, default_port=29555)
    assert (found.rank, found.world_size, found.local_rank, found.master_addr, found.master_port, found.source) == (
        5,
        16,
        5,
        "gpu-07",
        29555,
        "slurm",
    )
    filled = dict(env)
    ensure_torchrun_env(filled)
    assert filled["RANK"] == "5" and filled["WORLD_SIZE"] == "16" and filled["MASTER_ADDR"] == "gpu-07"


def test_plain_process_is_rank_zero_of_one():
    found = discover({})
    assert (found.rank, found.world_size, found.source) == (0, 1, "default")
    env = {}
    assert ensure_torchrun_env(env).source == "default" and env == {}  # caller keeps its own defaults


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="RANK='x'"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_node_outside_slurm_is_a_clear_error():
    with pytest.raises(ValueError, match="not inside a Slurm job"):
        slurm_node({})
    assert slurm_node({"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NODEID": "2"}) == (2, ["n1", "n2", "n3", "n4"])
