"""Several teachers in the config (`teachers:` + data.teacher_field) and the loader's routing of rows."""

import json

import pytest

from rlad_megatron.config import load_config, teachers_of, to_dict
from rlad_megatron.data.loader import DatasetError, load_prompts

TWO = ["teachers.math.model=/m/math", "teachers.code.model=/m/code", "data.teacher_field=domain"]


def test_the_single_teacher_form_is_one_unnamed_teacher():
    cfg = load_config(None, ["model.teacher=/m/t", "teacher.kind=embedded"])
    (t,) = teachers_of(cfg)
    assert (t.name, t.section, t.model, t.engine.kind, t.tp) == ("", "teacher", "/m/t", "embedded", 8)


def test_two_teachers_load_from_yaml_in_order_with_their_own_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "teachers:\n"
        "  math: {model: /m/math, kind: http, urls: ['http://a:1'], api_key: secret}\n"
        "  code: {model: /m/code, launch_tp: 2}\n"
        "data: {teacher_field: domain, teacher_default: code}\n"
    )
    cfg = load_config(recipe)
    math, code = teachers_of(cfg)
    assert (math.name, math.section, math.engine.urls, math.tp) == ("math", "teachers.math", ["http://a:1"], 8)
    assert (code.name, code.model, code.engine.kind, code.tp) == ("code", "/m/code", "auto", 2)
    assert to_dict(cfg)["teachers"]["math"]["api_key"] == "<redacted>"
    assert to_dict(cfg, redact=False)["teachers"]["math"]["api_key"] == "secret"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (TWO + ["model.teacher=/m/t"], r"both teacher forms are given: `teachers:` \(math, code\)"),
        (TWO + ["teacher.kind=embedded"], "move the teacher settings and model folder into teachers.<name>"),
        (TWO[:2], r"lists 2 teachers \(math, code\) but data.teacher_field is empty; set it"),
        (TWO + ["data.teacher_default=physics"], r"data.teacher_default='physics' is not a teacher; choose one of"),
        (["data.teacher_field=domain"], "data.teacher_field='domain' routes prompts to teachers, but there is no"),
        (["teachers.math.kind=embedded", "data.teacher_field=d"], "teachers.math.model is empty; set it"),
        (["teachers.a.b.model=/m"], "unknown config key"),
        (["teachers.m@th.model=/m"], "a teacher name may hold only letters, digits"),
        (TWO + ["teachers.code.kind=http"], r"teachers.<name>.urls must list at least one server"),
        (TWO + ["launch.nodes=4", "launch.teacher_nodes=2"], "set teachers.<name>.launch_nodes instead"),
        (TWO + ["algorithm.name=sft", "train.offline_source=teacher"], "use train.offline_source=dataset"),
        (TWO + ["teachers.math.launch_tp=-1"], r"teachers.<name>.launch_tp=-1 is invalid"),
    ],
)
def test_bad_teacher_configs_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_mistyped_key_lists_a_named_teachers_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'teachers.math.modle'; valid keys here: .*\bmodel\b"):
        load_config(None, ["teachers.math.modle=/m"])


def test_one_named_teacher_needs_no_field():
    cfg = load_config(None, ["teachers.only.model=/m/o"])
    assert [t.section for t in teachers_of(cfg)] == ["teachers.only"]


def _rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class _Chars:
    """A tokenizer stand-in: one id per character (the loader only counts prompt tokens)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_the_loader_routes_rows_by_field_then_default(tmp_path):
    cfg = load_config(None, TWO + ["data.template=none", "data.teacher_default=code"])
    rows = [{"prompt": "a", "answer": "1", "domain": "math"}, {"prompt": "b", "answer": "2"}]
    rows.append({"prompt": "c", "answer": "3", "domain": ""})
    data = load_prompts(_rows(tmp_path, rows), cfg.data, _Chars(), teachers=list(cfg.teachers))
    assert [r["record"]["teacher"] for r in data.records] == ["math", "code", "code"]
    single = load_prompts(_rows(tmp_path, rows), cfg.data, _Chars())  # no teachers: records carry no name
    assert all("teacher" not in r["record"] for r in single.records)


def test_the_loader_lists_rows_naming_unknown_or_no_teacher(tmp_path):
    cfg = load_config(None, TWO + ["data.template=none"])
    rows = [
        {"prompt": "a", "answer": "1", "domain": "math"},
        {"prompt": "b", "answer": "2", "domain": "physics"},
        {"prompt": "c", "answer": "3"},
        {"prompt": "d", "answer": "4", "domain": 7},
    ]
    with pytest.raises(DatasetError) as err:
        load_prompts(_rows(tmp_path, rows), cfg.data, _Chars(), teachers=list(cfg.teachers))
    text = str(err.value)
    assert "3 bad rows of 4" in text
    assert ":2: field 'domain': unknown teacher 'physics'; the teachers are ['math', 'code']" in text
    assert ":3: field 'domain': names no teacher and data.teacher_default is empty" in text
    assert ":4: field 'domain': unknown teacher 7" in text
    skip = load_config(None, TWO + ["data.template=none", "data.bad_rows=skip"])
    kept = load_prompts(_rows(tmp_path, rows), skip.data, _Chars(), teachers=list(skip.teachers))
    assert [r["record"]["prompt"] for r in kept.records] == ["a"] and kept.num_skipped == 3
