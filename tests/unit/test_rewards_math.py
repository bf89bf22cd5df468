"""Math reward: answer extraction, a table of equivalences judged by math-verify, the timeout."""

import time

import pytest

from rlad_megatron.rewards.math import MathReward, extract_answer, last_boxed
from rlad_megatron.rewards.verify_pool import VerifyPool

# (response, gold answer, expected verdict)
TABLE = [
    # fractions
    (r"So the result is \boxed{\frac{1}{2}}.", "1/2", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"The answer is 2/4.", r"\frac{1}{2}", True),
    (r"\boxed{\frac{2}{3}}", "0.6", False),
    (r"\boxed{-\frac{5}{2}}", "-2.5", True),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    # decimals and integers
    (r"\boxed{0.25}", r"\frac14", True),
    (r"\boxed{3.14}", "3.15", False),
    (r"The total is 1,000 dollars, so 1000", "1000", True),
    (r"\boxed{42}", "42", True),
    (r"\boxed{42}", "24", False),
    (r"\boxed{-7}", "7", False),
    (r"we get x = 12", "12", True),
    (r"we get x = 12 and then 13", "12", False),
    (r"\boxed{1.0}", "1", True),
    # LaTeX expressions
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", False),
    (r"\boxed{\pi}", r"\pi", True),
    (r"\boxed{2\pi}", r"\pi", False),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2", True),
    (r"\boxed{x^2+1}", r"(x+1)^2", False),
    (r"\boxed{\frac{\pi}{4}}", r"\pi/4", True),
    (r"\boxed{e^{2}}", r"e^2", True),
    (r"\boxed{10^{3}}", "1000", True),
    (r"\boxed{\left(\frac{1}{2}\right)^2}", r"\frac{1}{4}", True),
    # units and text
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{12\text{ meters}}", "12", True),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{7 \text{ cm}}", "5", False),
    (r"\boxed{50\%}", "50", True),
    # intervals, sets, tuples
    (r"\boxed{[1,2)}", "[1,2)", True),
    (r"\boxed{(1,2)}", "[1,2]", False),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True),
    (r"\boxed{(0, \infty)}", r"(0,\infty)", True),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    (r"\boxed{(3, 4)}", "(3,4)", True),
    (r"\boxed{(3, 5)}", "(3,4)", False),
    # nested braces, multiple boxes, no answer
    (r"first \boxed{1} then \boxed{\frac{2}{\sqrt{4}}}", "1", True),
    (r"\boxed{\frac{1}{2}} wait, no: \boxed{\frac{1}{3}}", "1/3", True),
    ("I am not sure.", "4", False),
    (r"\boxed{}", "0", False),
    (r"The answer is $\frac{3}{2}$.", "1.5", True),
    (r"Final answer: \fbox{8}", "8", True),
]


@pytest.fixture(scope="module")
def reward():
    pool = VerifyPool(num_workers=2, timeout_s=10.0)
    yield MathReward(pool=pool)
    pool.close()


def test_table_has_at_least_40_pairs_with_both_verdicts():
    assert len(TABLE) >= 40
    assert {v for _, _, v in TABLE} == {True, False}


def test_equivalence_table(reward):
    results = reward.score_batch([r for r, _, _ in TABLE], [{"answer": g} for _, g, _ in TABLE])
    wrong = [(resp, gold, want, res.details) for (resp, gold, want), res in zip(TABLE, results) if res.correct != want]
    assert not wrong, wrong
    for (_, _, want), res in zip(TABLE, results):
        assert res.score == (1.0 if want else 0.0)


def test_single_call_matches_batch(reward):
    assert reward(r"\boxed{\frac{6}{8}}", {"answer": "0.75"}).score == 1.0
    assert reward("nothing here", {"answer": "0.75"}).details == {"correct": False, "extracted": None, "timeout": False}


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"\boxed{1} and \boxed{ {2} }", "{2}"),
        (r"\boxed{\frac{1}{2}", None),
        ("no box", None),
    ],
)
def test_last_boxed_nested(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text,answer,method",
    [
        (r"x \boxed{3}", "3", "boxed"),
        ("So the answer is: $-4$.", "-4", "answer_is"),
        ("The Answer Is 17\nthanks", "17", "answer_is"),
        ("a 3 then 4.5 then -2/3 end", "-2/3", "last_number"),
    ],
)
def test_extract_answer(text, answer, method):
    assert extract_answer(text) == {"answer": answer, "method": method}


def test_pathological_answer_times_out_and_pool_recovers():
    pool = VerifyPool(num_workers=1, timeout_s=1.5)
    try:
        reward = MathReward(pool=pool)
        pool.verify_many([("$1$", "$1$")])  # start the worker outside the timed region
        start = time.monotonic()
        slow = reward(r"\boxed{(10^{10^{10}})!}", {"answer": "1"})
        elapsed = time.monotonic() - start
        assert slow.score == 0.0 and slow.details["timeout"] is True
        assert elapsed < 1.5 + 3.0, elapsed
        assert pool.num_replaced == 1
        # the replaced worker answers the next question correctly
        assert reward(r"\boxed{2}", {"answer": "2"}).details == {
            "correct": True,
            "extracted": "2",
            "method": "boxed",
            "timeout": False,
        }
    finally:
        pool.close()
