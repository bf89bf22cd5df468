"""Dataset loading: every bad-row kind named by file/row/field, skip counting, fuzzing, formats, templates."""

import datetime
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlad_megatron.config import DataConfig
from rlad_megatron.data import DatasetError, load_prompts, load_run_data
from rlad_megatron.data.loader import encode_prompt
from rlad_megatron.data.row_readers import iter_jsonl
from rlad_megatron.data.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def write_jsonl(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


GOOD = {"prompt": "2+2=", "answer": "4", "level": 1}
BAD_ROWS = [  # (line content, field named in the error, words in the problem)
    ({"answer": "4", "level": 1}, "prompt", "missing field"),
    ({"prompt": "2+2=", "level": 1}, "answer", "missing field"),
    ({"prompt": "2+2=", "answer": "4"}, "level", "missing field"),
    ({"prompt": "   ", "answer": "4", "level": 1}, "prompt", "empty prompt"),
    ({"prompt": 7, "answer": "4", "level": 1}, "prompt", "wrong type int"),
    ({"prompt": [{"role": "user"}], "answer": "4", "level": 1}, "prompt", "wrong type list"),
    ({"prompt": "2+2=", "answer": None, "level": 1}, "answer", "wrong type NoneType"),
    ({"prompt": "2+2=", "answer": "", "level": 1}, "answer", "empty answer"),
    (b'{"prompt": "caf\xe9", "answer": "4", "level": 1}', "<row>", "not valid UTF-8"),
    (b'{"prompt": "2+2=", "answer": ', "<row>", "malformed JSON"),
    (b"[1, 2]", "<row>", "expected an object"),
    ({"prompt": "9" * 100, "answer": "4", "level": 1}, "prompt", "over data.max_prompt_length=40"),
    (
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "4", "level": 1},
        "prompt",
        "cannot apply the plain template",
    ),
]


def cfg(**kw):
    return DataConfig(
        metadata_keys=["level"], max_prompt_length=40, template="plain", plain_template="Q: {prompt}", **kw
    )


@pytest.mark.parametrize("line,field,problem", BAD_ROWS)
def test_each_bad_row_kind_is_named_by_file_row_and_field(tmp_path, tok, line, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, line, GOOD])
    with pytest.raises(DatasetError) as err:
        load_prompts(str(path), cfg(), tok)
    assert len(err.value.bad_rows) == 1
    bad = err.value.bad_rows[0]
    assert (bad.source, bad.row, bad.field) == (str(path), 3, field) and problem in bad.problem
    message = str(err.value)
    assert f"{path}:3: field {field!r}" in message and "data.bad_rows=skip" in message


def test_error_lists_all_bad_rows_and_skip_counts_them(tmp_path, tok):
    lines = [GOOD] + [line for line, _, _ in BAD_ROWS] + [b"", GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DatasetError) as err:
        load_prompts(str(path), cfg(), tok)
    assert [b.row for b in err.value.bad_rows] == list(range(2, 2 + len(BAD_ROWS)))
    assert "raise data.max_prompt_length" in str(err.value)
    ds = load_prompts(str(path), cfg(bad_rows="skip"), tok)
    assert len(ds) == 2 and ds.num_skipped == len(BAD_ROWS) and ds.num_rows == len(BAD_ROWS) + 2
    rec = ds[0]
    assert rec["record"] == {"prompt": "2+2=", "answer": "4", "metadata": {"level": 1}, "id": f"{path}:1"}
    assert tok.decode(rec["prompt_ids"]) == "Q: 2+2="


def test_all_rows_bad_under_skip_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [b"{", {"x": 1}])
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompts(str(path), cfg(bad_rows="skip"), tok)


def test_field_mapping_and_chat_template(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"question": "hi", "label": 3, "d": "easy", "other": 1},
            {"question": [{"role": "user", "content": "yo"}], "label": [1], "d": "hard"},
        ],
    )
    ds = load_prompts(str(path), DataConfig(prompt_key="question", answer_key="label", metadata_keys=["d"]), tok)
    assert [r["record"]["answer"] for r in ds] == [3, [1]]
    assert [r["record"]["metadata"] for r in ds] == [{"d": "easy"}, {"d": "hard"}]
    assert tok.decode(ds[0]["prompt_ids"]) == "<user>hi<assistant>"
    assert ds[0]["prompt_ids"] == encode_prompt("hi", tok, "chat", "")
    assert (
        tok.decode(
            load_prompts(
                str(path), DataConfig(prompt_key="question", answer_key="label", template="none", bad_rows="skip"), tok
            )[0]["prompt_ids"]
        )
        == "hi"
    )


def test_solution_field_is_kept_for_offline_distillation(tmp_path, tok):
    from rlad_megatron.components import trace_fn
    from rlad_megatron.config import load_config

    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"prompt": "2+2=", "answer": "4", "trace": "2+2 is 4 #4"}, {"prompt": "1+1=", "answer": "2", "trace": ""}],
    )
    with pytest.raises(DatasetError, match="trace"):
        load_prompts(str(path), DataConfig(solution_key="trace"), tok)
    ds = load_prompts(str(path), DataConfig(solution_key="trace", bad_rows="skip"), tok)
    assert [r["record"]["solution"] for r in ds] == ["2+2 is 4 #4"]
    assert trace_fn(load_config(None, []))(ds[0]["record"]) == "2+2 is 4 #4"
    assert "solution" not in load_prompts(str(path), DataConfig(), tok)[0]["record"]  # default key absent: no field


def test_template_misconfiguration_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(DatasetError, match="not a valid template"):
        load_prompts(str(path), DataConfig(template="plain", plain_template="{question}"), tok)
    tok2 = build_char_tokenizer()
    tok2.chat_template = None
    with pytest.raises(DatasetError, match="no chat template"):
        load_prompts(str(path), DataConfig(), tok2)


def test_missing_and_unsupported_sources(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"), DataConfig(), tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_prompts(str(tmp_path / "x.csv"), DataConfig(), tok)


def test_parquet_and_datasets_folder(tmp_path, tok):
    import datasets

    rows = [
        {"prompt": f"{i}+1=", "answer": str(i + 1), "level": {"n": i % 2, "day": datetime.date(2024, 1, i + 1)}}
        for i in range(5)
    ]
    rows.append({"prompt": "", "answer": "1", "level": {"n": 0, "day": datetime.date(2024, 2, 1)}})
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    for source, split, n in [("t.parquet", "train", 5), ("saved", "train", 5), ("dict", "test", 2)]:
        with pytest.raises(DatasetError, match="empty prompt") if n == 5 else _nothing():
            load_prompts(str(tmp_path / source), cfg(dataset_split=split), tok)
        loaded = load_prompts(str(tmp_path / source), cfg(dataset_split=split, bad_rows="skip"), tok)
        assert [r["record"]["answer"] for r in loaded] == [str(i + 1) for i in range(n)]
        assert loaded[0]["record"]["metadata"] == {"level": {"n": 0, "day": "2024-01-01"}}  # JSON-safe metadata
        json.dumps([r["record"] for r in loaded])
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_prompts(str(tmp_path / "dict"), cfg(dataset_split="validation"), tok)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_task_sources_and_run_data(tok):
    from rlad_megatron.config import load_config

    run = load_config(
        None,
        [
            "data.train=task:addition",
            "data.eval=task:addition",
            "data.task_kwargs={size: 30}",
            "data.prompt_key=ignored_for_tasks",
        ],
    )
    train, evaluation = load_run_data(run, tok)
    assert len(train) == len(evaluation) == 30
    assert not {r["record"]["prompt"] for r in train} & {r["record"]["prompt"] for r in evaluation}
    assert train[0]["record"]["metadata"]["task"] == "addition"
    with pytest.raises(DatasetError, match="data.train is empty"):
        load_run_data(load_config(None, []), tok)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["prompt", "answer", "x"]) | st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=6),
    policy=st.sampled_from(["error", "skip"]),
)
def test_fuzz_jsonl_gives_rows_or_dataset_error(tmp_path_factory, tok, lines, policy):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        ds = load_prompts(str(path), DataConfig(bad_rows=policy, max_prompt_length=64), tok)
    except DatasetError as err:
        assert str(path) in str(err)
        return
    for rec in ds:
        assert isinstance(rec["prompt_ids"], list) and 0 < len(rec["prompt_ids"]) <= 64
        assert rec["record"]["prompt"] and rec["record"]["answer"] is not None
    assert ds.num_rows == len(ds) + ds.num_skipped == sum(1 for _ in iter_jsonl(path))


def test_folder_of_data_files_loads_offline_with_a_local_cache(tmp_path, tok):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [GOOD, dict(GOOD, prompt="3+3=", answer="6")])
    ds = load_prompts(str(folder), cfg(cache_dir=str(tmp_path / "cache")), tok)
    assert [r["record"]["answer"] for r in ds] == ["4", "6"] and ds[1]["record"]["id"] == f"{folder}[train]:2"
    assert (tmp_path / "cache").is_dir()
