"""From a chat completion to p(Yes), without a server: reading answers, log-probabilities and
samples, and rejecting what is not an answer."""

from __future__ import annotations

import math
from typing import Any

import pytest

from behaviour import Answer, MalformedAnswer, NonCompliantEndpoint, Sampling
from behaviour.answers import from_logprobs, from_samples, parse_choices, yes_no

WHERE = "http://127.0.0.1:1/v1/chat/completions"


@pytest.mark.parametrize(
    ("text", "vote"),
    [
        ("Yes", True),
        (" yes.", True),
        ("YES! I would.", True),
        ("No", False),
        ("no, never", False),
        ("'No'", False),
        ("Maybe", None),
        ("Yesterday", None),
        ("", None),
        ("  ", None),
    ],
)
def test_yes_no(text: str, vote: bool | None) -> None:
    assert yes_no(text) is vote


def test_samples_that_are_neither_are_left_out() -> None:
    answer = from_samples(["Yes.", "maybe", "no", "NO!"], WHERE)
    assert answer == Answer(1 / 3, "samples", 1.0, 2.0)


def test_logprobs_sum_every_spelling() -> None:
    top = {"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2), "I": math.log(0.4)}
    answer = from_logprobs(top, WHERE)
    assert answer.method == "logprobs"
    assert math.isclose(answer.p_yes, 0.4 / 0.6, rel_tol=1e-12)


def test_logprobs_without_yes_or_no() -> None:
    with pytest.raises(MalformedAnswer, match=r"no Yes or No among the answer's top tokens"):
        from_logprobs({"I": -0.1, "The": -3.0}, WHERE)


def _completion(**choice: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": "Yes"}, **choice}]}


@pytest.mark.parametrize(
    "logprobs",
    [
        {"content": [{"token": "Yes", "logprob": -0.1}]},
        {"content": []},
        {"content": [{"token": "Yes", "logprob": "-0.1", "top_logprobs": []}]},
        {"content": [{"token": "Yes", "logprob": 0.5, "top_logprobs": []}]},
        {"content": [{"token": 7, "logprob": -0.1, "top_logprobs": []}]},
        {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [{"token": "No"}]}]},
    ],
)
def test_malformed_logprobs(logprobs: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswer, match=rf"^{WHERE}: choice 0: "):
        parse_choices(_completion(logprobs=logprobs), WHERE)


def test_an_answer_without_logprobs() -> None:
    (choice,) = parse_choices(_completion(logprobs=None), WHERE)
    assert choice.text == "Yes" and choice.top_logprobs is None


@pytest.mark.parametrize("raw", [{"error": "no"}, {"choices": []}, ["Yes"], "Yes"])
def test_not_a_chat_completion(raw: Any) -> None:
    with pytest.raises(NonCompliantEndpoint, match="is not an OpenAI chat completion"):
        parse_choices(raw, WHERE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "guess"},
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"samples": 0},
        {"top_logprobs": 21},
        {"max_tokens": 0},
    ],
)
def test_bad_sampling_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Sampling(**kwargs)


def test_an_answer_round_trips_exactly() -> None:
    answer = Answer(0.1 + 0.2, "logprobs", 0.123456789012345678, 1e-300)
    assert Answer.from_json(answer.to_json()) == answer
    with pytest.raises(ValueError, match="outside"):
        Answer.from_json({**answer.to_json(), "p_yes": 1.5})
