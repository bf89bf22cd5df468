"""Config: every example recipe loads, overrides work, and bad input is a ValueError naming the field."""

import dataclasses
from pathlib import Path

import pytest

from rlad_megatron.config import (
    AlgorithmConfig,
    RunConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(ROOT.glob("examples/**/*.yaml"))


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(p, id=str(p.relative_to(ROOT))) for p in RECIPES]
    or [pytest.param(None, marks=pytest.mark.skip(reason="no example recipes under examples/ yet"))],
)
def test_every_example_recipe_loads(recipe, tmp_path):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    # the resolved config written to a run folder loads back to the same values
    again = load_config(save_config(cfg, tmp_path))
    assert to_dict(again, redact=False) == to_dict(cfg, redact=False)


def test_recipe_then_overrides_in_both_forms(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  name: kdrl\n  alpha: 0.7\ntrain:\n  num_steps: 5\n")
    cfg = load_config(recipe, ["algorithm.alpha=0.3", "--set", "train.lr=2e-6", "--set=seed=7"])
    assert (cfg.algorithm.name, cfg.algorithm.alpha, cfg.train.num_steps, cfg.train.lr, cfg.seed) == (
        "kdrl",
        0.3,
        5,
        2e-6,
        7,
    )
    assert parse_overrides(["--set", "a.b=1", "c.d=x=y"]) == ["a.b=1", "c.d=x=y"]
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["algorithm.alpha"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("algorithm.alhpa=0.3", r"unknown config key 'algorithm.alhpa'.*valid keys here: .*alpha"),
        ("algorithmm.alpha=0.3", r"unknown config key 'algorithmm'.*algorithm"),
        ("rollout.tempreature=1", r"unknown config key 'rollout.tempreature'.*temperature"),
        ("train.numsteps=1", r"unknown config key 'train.numsteps'.*num_steps"),
    ],
)
def test_unknown_keys_list_the_valid_ones(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,field",
    [
        ("algorithm.alpha=abc", "algorithm.alpha"),
        ("algorithm.group_size=2.5", "algorithm.group_size"),
        ("algorithm.kd_reward_mask=maybe", "algorithm.kd_reward_mask"),
        ("train.num_steps=many", "train.num_steps"),
        ("model.megatron=3", "model.megatron"),
        ("seed=abc", "seed"),
    ],
)
def test_bad_types_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"bad value for config key '{field}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("algorithm.alpha=1.5", r"algorithm.alpha=1.5 is invalid: must be in \[0, 1\]"),
        ("algorithm.clip_low=1.0", r"algorithm.clip_low=1.0 is invalid"),
        ("algorithm.name=ppo", r"algorithm.name='ppo' is not allowed; choose one of .*'rlad'"),
        ("algorithm.clamp_mode=frozen", r"algorithm.clamp_mode='frozen'.*'detached', 'live'"),
        ("algorithm.aggregation=sum", r"algorithm.aggregation='sum'.*token_mean"),
        ("algorithm.kd_estimator=k4", r"algorithm.kd_estimator='k4'"),
        ("algorithm.gkd_jsd_beta=2", r"algorithm.gkd_jsd_beta=2.0 is invalid"),
        ("algorithm.advantage_eps=-1", r"algorithm.advantage_eps=-1.0 is invalid: must be >= 0"),
        ("algorithm.max_resample_rounds=-1", r"algorithm.max_resample_rounds=-1 is invalid"),
        ("algorithm.opd_reward_coef=-0.5", r"algorithm.opd_reward_coef=-0.5 is invalid"),
        ("train.lr=-1", r"train.lr=-1.0 is invalid: must be >= 0"),
        ("rollout.top_p=0", r"rollout.top_p=0.0 is invalid"),
        ("parallel.tensor_model_parallel_size=0", r"parallel.tensor_model_parallel_size=0 is invalid"),
        ("parallel.sequence_parallel=true", r"parallel.sequence_parallel=True needs"),
        ("model.params_dtype=fp64", r"model.params_dtype='fp64' is not allowed"),
    ],
)
def test_out_of_range_values_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, [override])


@pytest.mark.parametrize(
    "text,needle",
    [
        ("algorithm:\n  alpha: 0.3\n  bogus: 1\n", r"unknown config key 'algorithm.bogus'"),
        ("algorithm:\n  alpha: [1, 2]\n", r"bad value for config key 'algorithm.alpha'"),
        ("algorithm: 3\n", r"section 'algorithm' must be a mapping"),
        ("- 1\n- 2\n", r"must be a mapping of sections"),
        ("algorithm:\n  alpha: 0.3\n bad indent\n", r"is not valid YAML"),
        ("rollout:\n  kind: http\n", r"rollout.urls must list at least one server"),
    ],
)
def test_bad_recipe_files_raise_value_errors(tmp_path, text, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_config(recipe)


def test_every_algorithm_field_is_documented():
    """Each field carries a docstring in the source (the schema is the documentation)."""
    import inspect

    source = inspect.getsource(AlgorithmConfig)
    for f in dataclasses.fields(AlgorithmConfig):
        line = next(i for i, text in enumerate(source.splitlines()) if text.strip().startswith(f"{f.name}:"))
        assert source.splitlines()[line + 1].strip().startswith('"""'), f.name


def test_save_config_redacts_api_keys(tmp_path):
    cfg = load_config(None, ["teacher.api_key=secret-value", f"run_dir={tmp_path}"])
    text = save_config(cfg).read_text()
    assert "secret-value" not in text and "<redacted>" in text


@pytest.mark.parametrize("algorithm", ["rlad", "kdrl", "opd", "gkd"])
def test_teacher_algorithms_refuse_rollout_temperature_other_than_one(algorithm):
    """The teacher is scored at temperature 1; a tempered student would be compared with an untempered teacher."""
    with pytest.raises(ValueError, match=r"rollout\.temperature=0\.7.*scored at temperature 1"):
        load_config(None, [f"algorithm.name={algorithm}", "rollout.temperature=0.7"])
    # eval may sample at any temperature; methods without a teacher term may roll out at any temperature
    assert load_config(None, [f"algorithm.name={algorithm}", "eval.temperature=0.6"]).eval.temperature == 0.6
    assert load_config(None, ["algorithm.name=grpo", "rollout.temperature=0.7"]).rollout.temperature == 0.7
