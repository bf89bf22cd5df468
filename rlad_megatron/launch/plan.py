"""`rlad plan RECIPE.yaml --nodes N --gpus-per-node 8 --gpu h100`: will the run fit, how to split it, how long a step.

Reads the recipe, places roles with `launch.topology` (the same placement `rlad render` uses), takes the
architectures from each model folder's config.json (or the built-in table), and prints:
memory per GPU for the student (configured layout, with and without the distributed optimizer and full
recompute; the largest packed row is the token budget or one longest prompt + response, split over CP ranks;
logits counted per log-prob chunk), for rollout and teacher servers (weights + KV cache at the configured batch and lengths), a
recommended TP/PP/CP/DP for the student, and the estimated time of one RL step by phase (several teachers: each
fleet sized on its own, scoring an even share of the batch at the same time as the others). Formulas and constants
are in `capacity.py` and `hardware.py`. Mean prompt and response lengths are assumptions (flags) because the
recipe holds only maxima; docs/scaling.md compares the estimates with published step times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from rlad_megatron.config import RunConfig, Teacher, load_config, parse_overrides, teachers_of
from rlad_megatron.launch import capacity as cap
from rlad_megatron.launch import hardware as hw
from rlad_megatron.launch.topology import Topology, fleet_engine, plan_topology


def _recompute(cfg: RunConfig) -> bool:
    return cfg.model.megatron.get("recompute_granularity") == "full"


def num_microbatches(cfg: RunConfig, tokens_per_seq: float, dp: int) -> int:
    """Packed micro-batches per DP rank per optimizer step."""
    seqs = cfg.train.prompts_per_step * cfg.algorithm.group_size / cfg.train.num_minibatches
    return max(1, math.ceil(seqs * tokens_per_seq / dp / cfg.train.micro_batch_tokens))


def row_tokens(cfg: RunConfig) -> int:
    """Tokens of the largest packed micro-batch: the token budget, or one longest sequence if it is longer."""
    return max(cfg.train.micro_batch_tokens, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)


CP_SIZES = (1, 2, 4, 8)


def recommend_split(
    arch: cap.Arch, cfg: RunConfig, num_gpus: int, gpus_per_node: int, hbm_bytes: float, tokens_per_seq: float
) -> tuple[int, int, int, int, bool] | None:
    """(TP, PP, CP, DP, recompute) with the fewest model-parallel GPUs that fits, then no PP before PP,
    then the smallest CP, no recompute before recompute; None when nothing fits. Context parallelism is
    not combined with pipeline parallelism (the trainer refuses it). Uses the distributed optimizer."""
    options = []
    for recompute in (False, True):
        for tp in (1, 2, 4, 8):
            for pp in range(1, arch.num_layers + 1):
                for cp in CP_SIZES if pp == 1 else (1,):
                    ok = (
                        tp <= gpus_per_node
                        and arch.num_attention_heads % tp == 0
                        and arch.num_key_value_heads % tp == 0
                        and arch.num_layers % pp == 0
                        and num_gpus % (tp * pp * cp) == 0
                    )
                    if not ok:
                        continue
                    dp = num_gpus // (tp * pp * cp)
                    mem = cap.student_memory(
                        arch,
                        tp=tp,
                        pp=pp,
                        dp=dp,
                        micro_batch_tokens=row_tokens(cfg),
                        num_microbatches=num_microbatches(cfg, tokens_per_seq, dp),
                        params_dtype=cfg.model.params_dtype,
                        recompute=recompute,
                        cp=cp,
                        logprob_chunk_size=cfg.model.logprob_chunk_size,
                    )
                    if mem["total"] <= hbm_bytes:
                        options.append((int(recompute), tp * pp * cp, pp, cp, tp, dp))
    if not options:
        return None
    needs_recompute, _, pp, cp, tp, dp = min(options)
    return tp, pp, cp, dp, bool(needs_recompute)


def _server_report(
    arch: cap.Arch, gpu: hw.GPU, topo: Topology, fleet: str, cfg: RunConfig, seq_len: int, num_seqs: int
) -> dict[str, float]:
    servers = topo.fleet(fleet)
    tp = servers[0].tp
    engine = fleet_engine(cfg, fleet)[0]
    # The HTTP client keeps at most max_concurrency requests in flight per fleet, spread over its servers.
    concurrent = min(math.ceil(num_seqs / len(servers)), max(1, engine.max_concurrency // len(servers)))
    fraction = float(engine.server_args.get("mem_fraction_static", hw.SGLANG_MEM_FRACTION))
    mem = cap.server_memory(
        arch, tp=tp, hbm_gb=gpu.hbm_gb, concurrent_seqs=concurrent, seq_len=seq_len, mem_fraction=fraction
    )
    return {**mem, "tp": tp, "num_servers": len(servers), "concurrent": concurrent}


def make_plan(cfg: RunConfig, prompt_fill: float = 0.25, response_fill: float = 0.5) -> dict:
    """Everything `rlad plan` prints, as a dict (bytes and seconds)."""
    gpu = hw.gpu(cfg.launch.gpu)
    topo = plan_topology(cfg)
    student, student_src = cap.load_arch(cfg.model.student)
    prompt_len = cfg.data.max_prompt_length * prompt_fill
    response_len = cfg.rollout.max_new_tokens * response_fill
    seq_len, max_seq = prompt_len + response_len, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    num_seqs = cfg.train.prompts_per_step * cfg.algorithm.group_size
    trainer_gpus = len(topo.trainer_nodes) * len(topo.trainer_gpus)
    par = cfg.parallel
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    dp = trainer_gpus // (tp * pp * cp)
    mbs = num_microbatches(cfg, seq_len, dp)
    layouts = {}
    for dist in (False, True):
        for rec in (False, True):
            layouts[f"dist_opt={dist} recompute={rec}"] = cap.student_memory(
                student,
                tp=tp,
                pp=pp,
                dp=dp,
                micro_batch_tokens=row_tokens(cfg),
                num_microbatches=mbs,
                params_dtype=cfg.model.params_dtype,
                distributed_optimizer=dist,
                recompute=rec,
                cp=cp,
                logprob_chunk_size=cfg.model.logprob_chunk_size,
            )
    configured = layouts[f"dist_opt={par.use_distributed_optimizer} recompute={_recompute(cfg)}"]
    hbm = gpu.hbm_gb * hw.GB
    plan: dict = {
        "gpu": gpu.name,
        "topology": topo.describe(),
        "student": dataclasses.asdict(student),
        "student_source": student_src,
        "student_params": student.num_params,
        "num_seqs": num_seqs,
        "mean_prompt": prompt_len,
        "mean_response": response_len,
        "trainer_gpus": trainer_gpus,
        "layout": {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "microbatches": mbs},
        "row_tokens": row_tokens(cfg),
        "logprob_chunk_size": cfg.model.logprob_chunk_size,
        "student_memory": layouts,
        "student_fits": configured["total"] <= hbm,
        "hbm": hbm,
        "recommended": recommend_split(student, cfg, trainer_gpus, cfg.launch.gpus_per_node, hbm, seq_len),
    }
    times: dict[str, float] = {}
    times["train"] = cap.train_seconds(
        student,
        gpu,
        num_gpus=trainer_gpus,
        num_seqs=num_seqs,
        seq_len=seq_len,
        ppo_epochs=cfg.train.ppo_epochs,
        recompute=_recompute(cfg),
        pp=pp,
        num_microbatches=mbs,
        reference_forward=cfg.algorithm.ref_kl_coef > 0,
    )
    if topo.fleet("rollout"):
        rollout = _server_report(student, gpu, topo, "rollout", cfg, max_seq, num_seqs)
        plan["rollout"] = rollout
        times["generate"] = cap.generate_seconds(
            student,
            gpu,
            tp=int(rollout["tp"]),
            num_servers=int(rollout["num_servers"]),
            num_seqs=num_seqs,
            prompt_len=prompt_len,
            response_len=response_len,
            max_response_len=cfg.rollout.max_new_tokens,
            seqs_at_once=int(min(rollout["seqs_at_once"], rollout["concurrent"])),
        )
        # Launcher-started fleets are kind=http for the trainer, which updates them from disk.
        times["weight_sync"] = cap.sync_seconds(student, gpu, same_node=topo.nodes == 1, via="disk")
        plan["weight_sync_nccl"] = cap.sync_seconds(student, gpu, same_node=topo.nodes == 1)
    if topo.fleet("teacher"):
        teacher, plan["teacher_source"] = cap.load_arch(cfg.model.teacher)
        plan["teacher_params"] = teacher.num_params
        plan["teacher"] = _server_report(teacher, gpu, topo, "teacher", cfg, max_seq, num_seqs)
        teacher_gpus = sum(s.tp for s in topo.fleet("teacher"))
        times["teacher_score"] = cap.score_seconds(
            teacher, gpu, num_gpus=teacher_gpus, num_seqs=num_seqs, seq_len=seq_len
        )
    named = [t for t in teachers_of(cfg) if cfg.teachers and topo.fleet(t.section)]
    if named:
        plan["teachers"], score = _teacher_reports(named, gpu, topo, cfg, max_seq, num_seqs, seq_len)
        times["teacher_score"] = score
    times["total"] = sum(times.values())
    plan["seconds"] = times
    teacher_fleets = [f for f in topo.routers if f == "teacher" or f.startswith("teachers.")]
    nodes = {
        "trainer": len(topo.trainer_nodes),
        "rollout": len({n for s in topo.fleet("rollout") for n in s.nodes}),
        "teacher": len({n for f in teacher_fleets for s in topo.fleet(f) for n in s.nodes}),
    }
    plan["overlap"] = overlap_report(times, cfg.train.prompts_per_step)
    # roles sharing a node (a one-node recipe) have no node split to recommend
    plan["node_split"] = (
        recommend_node_split(
            times,
            nodes,
            cfg.train.prompts_per_step,
            lambda n: _student_fits(cfg, student, n, hbm, seq_len),
            min_teacher_nodes=len(teacher_fleets),  # several teachers: one node each at least
            off_policy=cfg.train.max_staleness > 0,
        )
        if sum(nodes.values()) == topo.nodes
        else {}
    )
    return plan


def _teacher_reports(
    teachers: list[Teacher], gpu: hw.GPU, topo: Topology, cfg: RunConfig, max_seq: int, num_seqs: int, seq_len: float
) -> tuple[dict[str, dict], float]:
    """Several teachers: each fleet's servers and scoring time, assuming each scores an even share of the
    step's sequences (the share of rows naming it is not known before the data is read); the fleets score
    at the same time, so the step waits for the slowest."""
    share = math.ceil(num_seqs / len(teachers))
    reports, slowest = {}, 0.0
    for t in teachers:
        arch, source = cap.load_arch(t.model)
        report: dict = _server_report(arch, gpu, topo, t.section, cfg, max_seq, share)
        gpus = sum(s.tp for s in topo.fleet(t.section))
        seconds = cap.score_seconds(arch, gpu, num_gpus=gpus, num_seqs=share, seq_len=seq_len)
        reports[t.name] = {**report, "source": source, "params": arch.num_params, "score_seconds": seconds}
        slowest = max(slowest, seconds)
    return reports, slowest


def _student_fits(cfg: RunConfig, student: cap.Arch, trainer_nodes: int, hbm: float, seq_len: float) -> bool:
    gpus = trainer_nodes * cfg.launch.gpus_per_node
    return recommend_split(student, cfg, gpus, cfg.launch.gpus_per_node, hbm, seq_len) is not None


def step_seconds(times: dict[str, float], prompts_per_step: int, streaming: bool, off_policy: bool = False) -> float:
    """One step's wall time. Without streaming the phases follow each other; with streaming scoring the teacher
    scores each prompt group while generation goes on, so generate + score take the longer of the two plus the
    last group's scoring (1 / prompts_per_step of the teacher phase). `off_policy` (train.max_staleness=1):
    the next step's samples are collected while this step trains, so the step takes the longer of the two,
    then the weight sync (which waits for the collection to end)."""
    generate, teacher = times.get("generate", 0.0), times.get("teacher_score", 0.0)
    train, sync = times.get("train", 0.0), times.get("weight_sync", 0.0)
    if not streaming or not teacher:
        collect = generate + teacher
    else:
        collect = max(generate, teacher) + teacher / max(prompts_per_step, 1)
    return (max(collect, train) if off_policy else collect + train) + sync


OVERLAP_MODES = {
    "after_generation": ("scoring after generation", False, False),
    "streaming": ("streaming scoring", True, False),
    "off_policy": ("streaming scoring + train.max_staleness=1", True, True),
}
"""mode -> (label, streaming scoring, generation of step N+1 during training of step N)."""


def overlap_report(times: dict[str, float], prompts_per_step: int) -> dict:
    """Step time and each role's utilization (its busy seconds / step seconds), scoring after generation
    (train.stream_scoring=false), streaming, and streaming with off-policy overlap (train.max_staleness=1).
    Busy: the trainer trains and sends weights, the rollout fleet generates and receives weights, the teacher
    fleet scores."""
    busy = {
        "trainer": times.get("train", 0.0) + times.get("weight_sync", 0.0),
        "rollout": times.get("generate", 0.0) + times.get("weight_sync", 0.0),
        "teacher": times.get("teacher_score", 0.0),
    }
    out = {}
    for mode, (_, streaming, off_policy) in OVERLAP_MODES.items():
        step = step_seconds(times, prompts_per_step, streaming, off_policy)
        out[mode] = {"step": step, "utilization": {r: b / step for r, b in busy.items() if b}}
    return out


def recommend_node_split(
    times: dict[str, float],
    nodes: dict[str, int],
    prompts_per_step: int,
    trainer_fits,
    min_teacher_nodes: int = 1,
    off_policy: bool = False,
) -> dict:
    """The split of the same number of nodes between trainer, rollout and teacher with the shortest streaming
    step (with off-policy overlap when the recipe sets train.max_staleness), assuming each phase's time scales
    inversely with its role's nodes (ideal scaling: an estimate; the weight sync is kept as is). Roles the
    recipe does not use stay at 0 nodes; the trainer needs enough nodes for the student to fit, and several
    teacher fleets (`min_teacher_nodes`) one node each at least."""
    total = sum(nodes.values())
    scale = {"generate": "rollout", "teacher_score": "teacher", "train": "trainer"}
    best: dict = {}
    for trainer in range(1, total + 1):
        if not trainer_fits(trainer):
            continue
        for rollout in range(1 if nodes["rollout"] else 0, total - trainer + 1):
            teacher = total - trainer - rollout
            split = {"trainer": trainer, "rollout": rollout, "teacher": teacher}
            if (teacher > 0) != (nodes["teacher"] > 0) or (rollout > 0) != (nodes["rollout"] > 0):
                continue
            if nodes["teacher"] and teacher < min_teacher_nodes:
                continue
            scaled = {
                k: v * nodes[scale[k]] / split[scale[k]] if k in scale and nodes[scale[k]] else v
                for k, v in times.items()
                if k != "total"
            }
            step = step_seconds(scaled, prompts_per_step, True, off_policy)
            if not best or step < best["step"]:
                best = {"nodes": split, "step": step, "off_policy": off_policy}
    return best


def _gib(x: float) -> str:
    return f"{x / hw.GIB:7.1f} GiB"


def format_plan(plan: dict) -> str:
    student = f"{plan['student']['name']} ({plan['student_params'] / 1e9:.2f} B params, from {plan['student_source']})"
    batch = (
        f"{plan['num_seqs']} sequences, assumed mean prompt {plan['mean_prompt']:.0f} + response "
        f"{plan['mean_response']:.0f} tokens"
    )
    lines = [
        plan["topology"],
        f"GPU: {plan['gpu']}, HBM {_gib(plan['hbm']).strip()}",
        f"student: {student}",
        f"batch: {batch}",
        f"trainer layout: {plan['layout']}, {plan['trainer_gpus']} GPUs; largest packed row {plan['row_tokens']} "
        f"tokens, log-probs in chunks of {plan['logprob_chunk_size'] or 'the whole row'}",
    ]
    for name, mem in plan["student_memory"].items():
        parts = ", ".join(f"{k} {_gib(v).strip()}" for k, v in mem.items() if k != "total")
        verdict = "fits" if mem["total"] <= plan["hbm"] else "DOES NOT FIT"
        lines.append(f"  student/GPU [{name}]: total {_gib(mem['total'])} ({verdict}): {parts}")
    rec = plan["recommended"]
    lines.append(
        f"recommended student split: TP={rec[0]} PP={rec[1]} CP={rec[2]} DP={rec[3]} recompute={rec[4]} "
        "(distributed optimizer)"
        if rec
        else "recommended student split: none fits; add trainer GPUs"
    )
    fleets = [(f, plan[f]) for f in ("rollout", "teacher") if f in plan]
    fleets += [(f"teacher {name}", s) for name, s in plan.get("teachers", {}).items()]
    for fleet, s in fleets:
        if "score_seconds" in s:
            lines.append(
                f"{fleet}: {s['params'] / 1e9:.2f} B params (from {s['source']}), scores an even share "
                f"of the batch in {s['score_seconds']:.1f} s"
            )
        lines.append(
            f"{fleet} server/GPU: {int(s['num_servers'])} server(s) tp {int(s['tp'])}: weights "
            f"{_gib(s['weights']).strip()}, KV pool {_gib(s['kv_pool']).strip()} holds "
            f"{int(s['seqs_at_once'])} full-length sequences, {int(s['concurrent'])} in flight per "
            f"server{'' if s['fits'] else ': DOES NOT FIT (weights leave no room for one sequence)'}"
        )
    lines.append("estimated step time: " + ", ".join(f"{k} {v:.1f} s" for k, v in plan["seconds"].items()))
    for mode, (label, _, _) in OVERLAP_MODES.items():
        o = plan["overlap"][mode]
        use = ", ".join(f"{role} {u:.0%}" for role, u in o["utilization"].items())
        lines.append(f"step with {label}: {o['step']:.1f} s; utilization {use}")
    if plan.get("node_split"):
        split = plan["node_split"]
        mode = OVERLAP_MODES["off_policy" if split.get("off_policy") else "streaming"][0]
        lines.append(
            f"recommended node split ({mode}, phases scaled by node count): "
            + " / ".join(f"{role} {n}" for role, n in split["nodes"].items())
            + f", step {split['step']:.1f} s"
        )
    if "weight_sync_nccl" in plan:
        lines.append(
            f"weight sync through the shared file system; over NCCL it would take {plan['weight_sync_nccl']:.1f} s"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides (before the options, or use --set)")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another override (repeatable; may follow the options)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        help="launch.nodes; the recipe's launch.*_nodes role counts become automatic (0) unless given as overrides too",
    )
    parser.add_argument("--gpus-per-node", type=int, help="launch.gpus_per_node")
    parser.add_argument("--gpu", help=f"launch.gpu: one of {sorted(hw.GPUS)}")
    parser.add_argument("--prompt-fill", type=float, default=0.25, help="mean prompt length / max_prompt_length")
    parser.add_argument("--response-fill", type=float, default=0.5, help="mean response length / max_new_tokens")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


ROLE_COUNTS = ("trainer_nodes", "rollout_nodes", "teacher_nodes")


def flag_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """launch.* overrides for --nodes / --gpus-per-node / --gpu, applied after `overrides`.

    `--nodes N` asks "what if the job had N nodes": the recipe's role counts were chosen for its own node
    count (and may not even fit in N), so they go back to automatic unless the command line sets them too."""
    extra = [
        f"launch.{key}={getattr(args, key)}"
        for key in ("nodes", "gpus_per_node", "gpu")
        if getattr(args, key) is not None
    ]
    if args.nodes is not None:
        given = {item.split("=", 1)[0] for item in overrides}
        extra += [f"launch.{name}=0" for name in ROLE_COUNTS if f"launch.{name}" not in given]
    return extra


def run(args: argparse.Namespace) -> int:
    try:
        if not (0 < args.prompt_fill <= 1 and 0 < args.response_fill <= 1):
            raise ValueError("--prompt-fill and --response-fill must be in (0, 1]")
        overrides = parse_overrides(args.overrides + args.set_overrides)
        cfg = load_config(args.recipe, overrides + flag_overrides(args, overrides))
        plan = make_plan(cfg, args.prompt_fill, args.response_fill)
    except ValueError as err:
        print(f"rlad plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1, default=str) if args.json else format_plan(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlad plan")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
