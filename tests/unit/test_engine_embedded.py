"""The embedded engine against transformers' own generate / forward on tiny random models."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.engines.base import SamplingParams
from rlad_megatron.engines.embedded import EmbeddedEngine
from rlad_megatron.tiny_models import FAMILIES, save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        save_tiny_model(d, fam, seed=1)
        out[fam] = str(d)
    return out


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logprobs(hf, prompt, response, temperature=1.0):
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + response])).logits[0].float()
    lp = (logits / temperature).log_softmax(-1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), lp


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(models, family):
    hf = _hf(models[family])
    engine = EmbeddedEngine(models[family], max_batch_size=3)  # < number of prompts: slots get refilled
    prompts = _prompts(hf.config.vocab_size, [1, 4, 9, 2, 6, 3, 7])
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    for prompt, (out,) in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert out.response_ids == ref[0, len(prompt) :].tolist()
        assert out.finish_reason == "length"
        want, _ = _hf_logprobs(hf, prompt, out.response_ids)  # greedy: temperature-1 distribution
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sampled_logprobs_are_temperature_scaled_before_truncation(models, family):
    hf = _hf(models[family])
    engine = EmbeddedEngine(models[family], max_batch_size=8)
    prompts = _prompts(hf.config.vocab_size, [3, 5, 8])
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, seed=5, ignore_eos=True)
    for prompt, outs in zip(prompts, engine.generate(prompts, sp, n=2)):
        for out in outs:
            want, lp = _hf_logprobs(hf, prompt, out.response_ids, temperature=0.7)
            torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
            # every sampled token survived top-k=20 and top-p=0.9 of the same distribution
            ranks = (lp > want[:, None]).sum(-1)
            assert int(ranks.max()) < 20
            mass_before = torch.where(lp > want[:, None], lp.exp(), torch.zeros_like(lp)).sum(-1)
            assert float(mass_before.max()) < 0.9


def test_seeded_sampling_is_reproducible_and_batch_independent(models):
    prompts = _prompts(100, [2, 5, 3, 7])
    sp = SamplingParams(temperature=1.0, max_new_tokens=15, seed=123, ignore_eos=True)
    a = EmbeddedEngine(models["llama"], max_batch_size=64).generate(prompts, sp, n=3)
    b = EmbeddedEngine(models["llama"], max_batch_size=2).generate(prompts, sp, n=3)
    c = EmbeddedEngine(models["llama"]).generate(prompts[2:3], sp, n=3)  # prompt 2 alone gets other seeds
    ids = lambda res: [[o.response_ids for o in row] for row in res]
    assert ids(a) == ids(b)
    assert len({tuple(x) for row in ids(a) for x in row}) == 12  # samples of one prompt differ
    other = SamplingParams(temperature=1.0, max_new_tokens=15, seed=124, ignore_eos=True)
    assert ids(EmbeddedEngine(models["llama"]).generate(prompts, other, n=3)) != ids(a)
    assert ids(c)[0] != ids(a)[2]


def test_top_k_one_is_greedy_and_stop_tokens_end_generation(models):
    engine = EmbeddedEngine(models["qwen2"])
    prompts = _prompts(100, [4, 6])
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    topk1 = engine.generate(
        prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8, seed=1, ignore_eos=True)
    )
    assert [o[0].response_ids for o in greedy] == [o[0].response_ids for o in topk1]
    ids = greedy[0][0].response_ids
    stop = ids[3]
    out = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,)))[0][0]
    first = min(i for i, t in enumerate(ids) if t == stop or t in engine.spec.eos_token_ids)
    assert out.response_ids == ids[: first + 1]  # the stop token is kept as the last output token
    assert out.finish_reason == "stop"
    # SGLang's rule: ignore_eos turns off every token stop, stop_token_ids included
    through = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(stop,), ignore_eos=True)
    assert engine.generate(prompts[:1], through)[0][0].response_ids == ids
    zero = engine.generate(prompts[:1], SamplingParams(max_new_tokens=0))[0][0]
    assert zero.response_ids == [] and zero.finish_reason == "length"


def test_score_matches_forward_with_topk(models):
    hf = _hf(models["qwen3"])
    engine = EmbeddedEngine(models["qwen3"], max_score_tokens=20)  # forces several padded chunks
    seqs = _prompts(hf.config.vocab_size, [2, 9, 5, 12, 3])
    starts = [1, 4, 5, 7, 2]  # includes an empty span (start == len)
    outs = engine.score(seqs, starts, top_k=4)
    for seq, st, out in zip(seqs, starts, outs):
        want, lp = _hf_logprobs(hf, seq[:st], seq[st:])
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
        vals, idx = lp.topk(4, dim=-1)
        assert out.topk_ids.tolist() == idx.tolist()
        torch.testing.assert_close(torch.tensor(out.topk_logprobs).reshape(-1, 4), vals, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="response_start"):
        engine.score([[1, 2]], [0])
    with pytest.raises(ValueError, match="vocab_size"):
        engine.score([[1, 10_000]], [1])


def test_update_weights_in_place_and_from_disk_match_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    engine = EmbeddedEngine(models["qwen2"])
    prompt = _prompts(100, [6])[0]
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    before = engine.generate([prompt], sp)[0][0]
    new_dir = tmp_path / "step_1"
    save_tiny_model(new_dir, "qwen2", seed=7)
    hf_new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()

    engine.update_weights(named_tensors=dict(hf_new.state_dict()), version=1)
    after = engine.generate([prompt], sp)[0][0]
    want, _ = _hf_logprobs(hf_new, prompt, after.response_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), want, atol=1e-4, rtol=0)
    assert after.logprobs != before.logprobs and engine.version == 1

    fresh = EmbeddedEngine(models["qwen2"])
    fresh.update_weights(path=str(new_dir), version=2)
    again = fresh.generate([prompt], sp)[0][0]
    assert again.response_ids == after.response_ids and fresh.version == 2
    torch.testing.assert_close(torch.tensor(again.logprobs), want, atol=1e-4, rtol=0)
    with pytest.raises(KeyError, match="unknown parameter"):
        engine.update_weights(named_tensors={"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, version=3)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(named_tensors={"model.norm.weight": torch.zeros(3)}, version=3)


def test_missing_shard_and_pickle_only_folders_are_refused(models, tmp_path):
    import json
    import shutil

    from rlad_megatron.engines.model import iter_safetensors

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(f"{models['llama']}/config.json", pickled / "config.json")
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        EmbeddedEngine(str(pickled))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing"):
        list(iter_safetensors(sharded))
