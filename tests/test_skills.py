"""The built-in corpus: deterministic, held-out split disjoint, answers computed correctly."""

from __future__ import annotations

from collections import Counter

import pytest

from vesper_sdk import skills


def _q(ex: dict) -> str:
    return ex["messages"][0]["content"]


def _a(ex: dict) -> str:
    return ex["messages"][1]["content"]


def test_generate_is_deterministic_and_seeded():
    a, b = skills.generate(300, seed=3), skills.generate(300, seed=3)
    assert a == b
    assert a != skills.generate(300, seed=4)
    assert skills.held_out(100, seed=3) == skills.held_out(100, seed=3)
    # A prefix is stable: asking for more examples does not change the first ones.
    assert skills.generate(500, seed=3)[:300] == a


def test_examples_are_two_turn_chats_and_cover_every_task():
    examples = skills.generate(3000, seed=0)
    assert all([m["role"] for m in ex["messages"]] == ["user", "assistant"] for ex in examples)
    counts = Counter(ex["task"] for ex in examples)
    assert set(counts) == {t.name for t in skills.TASKS}
    # The mixture follows the weights roughly (arithmetic is the biggest family).
    assert counts["add"] > counts["legs"]


def test_held_out_never_overlaps_training():
    train = skills.generate(20000, seed=0)
    held = skills.held_out(2000, seed=0)
    train_questions = {_q(ex) for ex in train}
    assert not train_questions & {m[0]["content"] for m, _ in held}
    # No split key (the problem, or the question text for tables to learn by heart) is
    # on both sides, so no phrasing of a held-out arithmetic problem is ever trained on.
    held_keys = {skills.split_key(m[0]["content"]) for m, _ in held}
    assert not held_keys & {skills.split_key(q) for q in train_questions}
    assert all(skills.is_held_out(m[0]["content"]) for m, _ in held)
    assert not any(skills.is_held_out(q) for q in train_questions)
    assert skills.split_key("What is 3+4?") == skills.split_key("What is 3 plus 4?")
    assert skills.split_key("How many meters are in 3 kilometers?") == \
        skills.split_key("Convert 3 kilometers to meters.")
    assert skills.split_key("What is the capital of France?") == "What is the capital of France?"


def test_calibration_split_is_disjoint_from_training_and_held_out():
    train_keys = {skills.split_key(_q(ex)) for ex in skills.generate(20000, seed=0)}
    held_keys = {skills.split_key(m[0]["content"]) for m, _ in skills.held_out(2000, seed=0)}
    calib = skills.calibration(1000, seed=0)
    calib_keys = {skills.split_key(_q(ex)) for ex in calib}
    assert not calib_keys & train_keys and not calib_keys & held_keys
    assert all(skills.is_correct(_q(ex), _a(ex)) for ex in calib)
    # The gradable task families of the evaluation all appear, and no random draws.
    held_tasks = {t for t, _, _ in skills.held_out_tasks(2000, seed=0)}
    assert {ex["task"] for ex in calib} == held_tasks


def test_answers_are_computed_by_the_same_rule_as_grading():
    for ex in skills.generate(3000, seed=1):
        q, a = _q(ex), _a(ex)
        assert skills.task_of(q) == ex["task"]
        if ex["task"] == "random":
            assert skills.expected_answer(q) is None  # a coin flip has no right answer
        else:
            assert skills.expected_answer(q) == a, q
            assert skills.is_correct(q, f" {a}. ")


@pytest.mark.parametrize("question, answer", [
    ("What is 7*6?", "42"),
    ("What is 53-17?", "36"),
    ("What is 19 plus 23?", "42"),
    ("How many meters are in 3 kilometers?", "3000"),
    ("Convert 120 minutes to hours.", "2"),
    ("How many times does the letter 'a' appear in 'banana'?", "3"),
    ("How many letters are in the word 'banana'?", "6"),
    ("Sort these words alphabetically: pear, apple, fig.", "apple, fig, pear"),
    ("What is the capital of France?", "Paris"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the capital of Zorblaxia?", skills.IDK),
    ("What is my neighbour's name?", skills.IDK),
    ("Flip a coin.", None),
    ("Write me a poem.", None),
])
def test_expected_answer(question, answer):
    assert skills.expected_answer(question) == answer


def test_fact_table_and_held_out_answers():
    table = skills.facts()
    assert {"capital", "symbol", "legs"} <= set(table)
    assert sum(len(v) for v in table.values()) >= 60
    held = skills.held_out(500, seed=0)
    assert len(held) == 500
    for messages, answer in held:
        assert [m["role"] for m in messages] == ["user"]
        assert skills.expected_answer(messages[0]["content"]) == answer
    # Some held-out questions are unanswerable, and their answer is the honest phrase.
    assert any(a == skills.IDK for _, a in held)
