"""Running at scale: where each process goes, how it is started, and whether it fits.

* `topology`  node roles (trainer / rollout fleet / teacher fleet), GPUs and ports from `RunConfig.launch` (pure)
* `node`      the per-node agent `python -m rlad_megatron.launch.node RECIPE` that srun starts on every node
* `supervise` the agent's children: start, restart crashed servers and routers with back-off, stop on signals
* `render`    `rlad render`: the sbatch job of a recipe (template: slurm/job.sbatch.tmpl)
* `plan`      `rlad plan`: memory per GPU, recommended TP/PP/DP, step time by phase (`capacity`, `hardware`)
* `env`       rank / world / master from torchrun or Slurm variables, Slurm host-list expansion

See docs/launch.md and docs/scaling.md.
"""
