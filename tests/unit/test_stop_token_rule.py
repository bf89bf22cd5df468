"""drop_final_eos_from_teacher follows ONE rule (Sample.ends_with_stop_token) in all three places that
read it: teacher scoring, the trainer's teacher mask and the OPD advantage term, including responses that
end on an extra stop token (rollout.stop_token_ids) rather than EOS."""

from types import SimpleNamespace

import pytest

from rlad_megatron.algorithms import build_objective
from rlad_megatron.backends.megatron.trainer import MegatronTrainer
from rlad_megatron.config import AlgorithmConfig
from rlad_megatron.engines.base import ScoreOutput
from rlad_megatron.teacher import score_samples
from rlad_megatron.train import compute_advantages
from rlad_megatron.types import Sample

EOS, EXTRA_STOP = 2, 9

# (response ids, finish_reason, ends on the token that stopped it)
CASES = [
    ([5, 6, EOS], "stop", True),
    ([5, 6, EXTRA_STOP], "stop", True),  # rollout.stop_token_ids=[9]: the engine keeps the matched token
    ([5, 6, EOS], "length", False),  # ignore_eos run cut by the budget: its last id is not a stop
    ([5, 6, 7], "length", False),
]


class EchoTeacher:
    """Scores every response token -1.0 and records what it was sent."""

    def __init__(self):
        self.sent = []

    def score(self, ids, starts, top_k=0):
        self.sent += [seq[st:] for seq, st in zip(ids, starts)]
        return [ScoreOutput([-1.0] * (len(seq) - st)) for seq, st in zip(ids, starts)]


def _samples():
    return [
        Sample(prompt_ids=[1, 3], group_index=i, response_ids=list(r), finish_reason=f, rollout_logprobs=[-0.5] * 3)
        for i, (r, f, _) in enumerate(CASES)
    ]


@pytest.mark.parametrize("algorithm", ["opd", "rlad"])
def test_scoring_trainer_mask_and_advantage_term_drop_the_same_final_tokens(algorithm):
    samples = _samples()
    assert [s.ends_with_stop_token for s in samples] == [c[2] for c in CASES]
    objective = build_objective(AlgorithmConfig(name=algorithm, drop_final_eos_from_teacher=True))

    teacher = EchoTeacher()
    score_samples(teacher, samples, drop_final_eos=True)
    scored_whole = [len(sent) == len(s.response_ids) for sent, s in zip(teacher.sent, samples)]

    trainer = SimpleNamespace(objective=objective)
    values = MegatronTrainer._per_token(trainer, samples, [[0.0] * 3] * len(samples), {})
    mask_keeps_final = [row[-1] == 1.0 for row in values["teacher_mask"]]

    expected_keeps = [not c[2] for c in CASES]
    assert scored_whole == expected_keeps
    assert mask_keeps_final == expected_keeps
    if algorithm == "opd":  # the teacher term -(lp_old - lp_T) is non-zero wherever it is kept
        run = SimpleNamespace(objective=objective, cfg=SimpleNamespace(algorithm=SimpleNamespace(group_size=1)))
        old = [[0.0, 0.0, 0.0] for _ in samples]
        advantages = compute_advantages(run, samples, old, step=0)
        term_on_final = [a[-1] != 0.0 for a in advantages]
        assert term_on_final == expected_keeps
