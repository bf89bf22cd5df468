"""The recipe, shrunk to a rehearsal on one 2-core CPU machine: every change as (field, recipe value,
rehearsal value, why), printed as a table and passed to `rlad render` as overrides.

Pure functions of the loaded `RunConfig`: the job size (steps, prompts, group, lengths, eval), the layout
(node counts, GPUs per node, server TP, trainer TP / PP kept where two trainer processes allow it) and the
rehearsal's own paths. Fields the user overrode on the command line are never changed. The result has at
most 2 trainer processes and about 4 server processes.

Left out: several trainer nodes (one emulated trainer node holds both processes).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rlad_megatron.config import RunConfig

PROMPTS, GROUP, NEW_TOKENS, EVAL_PROMPTS, MICRO_BATCH_TOKENS, TASK_SIZE = 2, 2, 16, 2, 1024, 16
TRAINER_PROCESSES = 2
HEALTH_TIMEOUT_S = 600


@dataclass(frozen=True)
class Change:
    field: str
    recipe: Any
    value: Any
    why: str

    def override(self) -> str:
        return f"{self.field}={_dotlist_value(self.value)}"


def _dotlist_value(value: Any) -> str:
    """A value as OmegaConf's dotlist parser reads it back (an empty string must be quoted)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dotlist_value(v) for v in value) + "]"
    return str(value)


def get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _changed(cfg: RunConfig, field: str, value: Any, why: str) -> list[Change]:
    old = get(cfg, field)
    return [] if old == value else [Change(field, old, value, why)]


def _smaller(cfg: RunConfig, field: str, limit: int, why: str) -> list[Change]:
    return _changed(cfg, field, min(get(cfg, field), limit), why)


def job_size_changes(cfg: RunConfig, steps: int) -> list[Change]:
    """Fewer steps, prompts, samples and tokens; every step checkpointed; CPU-friendly settings."""
    prompts = min(cfg.train.prompts_per_step, PROMPTS)
    out = [
        *_changed(cfg, "train.num_steps", steps, "a rehearsal runs a few steps"),
        *_smaller(cfg, "train.prompts_per_step", PROMPTS, "2 CPU cores"),
        *_smaller(cfg, "algorithm.group_size", GROUP, "2 CPU cores"),
        *_smaller(cfg, "train.num_minibatches", prompts, "minibatches hold whole groups"),
        *_smaller(
            cfg,
            "train.micro_batch_tokens",
            MICRO_BATCH_TOKENS,
            "the tiny models keep the real vocabulary: bounds the logits' memory",
        ),
        *_smaller(cfg, "rollout.max_new_tokens", NEW_TOKENS, "random models never stop early"),
        *_changed(cfg, "checkpoint.interval", 1, "checkpoint every step (the restart resumes from one)"),
        *_changed(cfg, "model.params_dtype", "float32", "CPU trainer; the servers run float32 too"),
        *_smaller(cfg, "reward.num_workers", 1, "2 CPU cores"),
        *_changed(cfg, "logging.progress_bar", False, "the job's output goes to a log file"),
        *_smaller(cfg, "launch.health_timeout_s", HEALTH_TIMEOUT_S, "a rehearsal that cannot start fails in minutes"),
    ]
    if cfg.data.eval:
        out += [
            *_smaller(cfg, "eval.num_samples", GROUP, "2 CPU cores"),
            *_smaller(cfg, "eval.max_new_tokens", NEW_TOKENS, "random models never stop early"),
            *_changed(
                cfg,
                "eval.max_prompts",
                min(cfg.eval.max_prompts or EVAL_PROMPTS, EVAL_PROMPTS),
                "a tiny eval still runs the eval path",
            ),
        ]
    if any(s.startswith("reasoning_gym:") for s in (cfg.data.train, cfg.data.eval)):
        size = int(cfg.data.task_kwargs.get("size", 1000))  # 1000: the sources' default
        if size > TASK_SIZE:
            out.append(
                Change(
                    "data.task_kwargs.size",
                    size,
                    TASK_SIZE,
                    "reasoning-gym builds each puzzle in ~20 ms (the held-out split draws ~10x more to find its share)",
                )
            )
    return out


def trainer_layout(tp: int, pp: int, cp: int = 1) -> tuple[int, int, int]:
    """(TP, PP, CP) within TRAINER_PROCESSES processes: kept when they fit, else PP, then CP up to 2 first
    (they exercise the per-stage weight sync and the split of every packed row), then TP with what is left."""
    new_pp = min(pp, TRAINER_PROCESSES)
    new_cp = min(cp, TRAINER_PROCESSES // new_pp)
    return min(tp, TRAINER_PROCESSES // (new_pp * new_cp)), new_pp, new_cp


def layout_changes(cfg: RunConfig, want_teacher: bool) -> list[Change]:
    """Trainer TP / PP, node counts and GPUs per node for <= 2 trainer processes and one process per server."""
    par = cfg.parallel
    tp, pp, cp = trainer_layout(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    )
    why_par = "at most 2 trainer processes on 2 cores"
    out = [
        *_changed(cfg, "parallel.tensor_model_parallel_size", tp, why_par),
        *_changed(cfg, "parallel.pipeline_model_parallel_size", pp, why_par),
        *_changed(cfg, "parallel.context_parallel_size", cp, why_par),
    ]
    if tp == 1:
        out += _changed(cfg, "parallel.sequence_parallel", False, "sequence parallelism needs TP > 1")
    one = "rlad serve runs one process per server"
    out += [*_changed(cfg, "launch.rollout_tp", 1, one), *_changed(cfg, "launch.teacher_tp", 1, one)]
    if cfg.launch.nodes == 1:  # shared node: teacher GPU, rollout GPU, then the trainer's
        gpus = tp * pp * cp + 1 + int(want_teacher)
        return out + _changed(cfg, "launch.gpus_per_node", gpus, "one 'GPU' per server and trainer process")
    why = "one emulated node per role"
    return out + [
        *_changed(cfg, "launch.nodes", 2 + int(want_teacher), why),
        *_changed(cfg, "launch.trainer_nodes", 1, why),
        *_changed(cfg, "launch.rollout_nodes", 1, why),
        *_changed(cfg, "launch.teacher_nodes", int(want_teacher), why),
        *_changed(cfg, "launch.gpus_per_node", tp * pp * cp, "trainer processes per node (and servers per node)"),
    ]


def machine_changes(cfg: RunConfig, kill_server: bool) -> list[Change]:
    """What this machine cannot do as a cluster does: containers, SGLang on CPU."""
    out = [
        *_changed(cfg, "launch.container_image", "", "no container runtime here: the host venv runs the job"),
        *_changed(cfg, "launch.container_mounts", [], "no container"),
    ]
    out += _changed(cfg, "launch.server_impl", "rlad", "SGLang cannot serve on CPU: rlad serve, same HTTP API")
    if kill_server and cfg.launch.restart_servers < 1:
        out.append(Change("launch.restart_servers", 0, 1, "--kill-server-at-step: the agent restarts the server"))
    return out


def path_changes(cfg: RunConfig, paths: dict[str, str], why: dict[str, str]) -> list[Change]:
    """run_dir, model folders and replaced data files (`paths`: field -> new value, `why`: field -> reason)."""
    return [c for field, value in paths.items() for c in _changed(cfg, field, value, why[field])]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_changes(
    cfg: RunConfig, hosts_of: dict[str, Sequence[str]], counts: dict[str, int], free=port_free
) -> list[Change]:
    """Keep the recipe's ports where they are free on the emulated node addresses, else move the block.

    `hosts_of`: port field -> addresses that bind it; `counts`: port field -> consecutive ports it needs."""
    out: list[Change] = []
    taken: set[int] = set()
    for field, hosts in hosts_of.items():
        base = get(cfg, field)
        start = base
        while not _block_free(start, counts.get(field, 1), hosts, taken, free):
            start += 97  # a prime stride: steps over blocks other jobs hold
        taken.update(range(start, start + counts.get(field, 1)))
        out += _changed(cfg, field, start, f"port {base} is taken on this machine") if start != base else []
    return out


def _block_free(start: int, count: int, hosts: Iterable[str], taken: set, free) -> bool:
    ports = range(start, start + count)
    return ports[-1] <= 65535 and not taken.intersection(ports) and all(free(h, p) for h in hosts for p in ports)


def without_user_fields(changes: Sequence[Change], user_overrides: Sequence[str]) -> list[Change]:
    """What the user set on the command line wins over the rehearsal's shrinking."""
    user = {o.split("=", 1)[0].strip() for o in user_overrides}
    return [c for c in changes if c.field not in user]


def table(changes: Sequence[Change]) -> str:
    """The changes as a markdown table (screen and rehearsal.md)."""
    rows = [("field", "recipe", "rehearsal", "why")] + [
        (c.field, _cell(c.recipe), _cell(c.value), c.why) for c in changes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "''" if value == "" else str(value)
