"""The built-in training corpus ``data="builtin:skills"``: chats whose answers are computable.

Every example is a two-message chat (user question, assistant answer) drawn from a few
task families:

- arithmetic: ``What is 7*6?`` -> ``42`` (addition and subtraction below 100, the 12x12
  times table);
- letters: word length and letter counts (``How many times does the letter 'a' appear
  in 'banana'?`` -> ``3``);
- unit conversion: km/m, kg/g, hours/minutes, minutes/seconds, days/hours;
- sorting three or four words alphabetically;
- look-ups in the small fact table shipped as ``vesper_sdk/assets/facts.tsv``
  (capitals, chemical symbols, number of legs);
- questions the model cannot know: personal questions and facts about made-up
  countries, elements or animals, answered with the fixed honest phrase
  ``I don't know.``; and requests whose answer is a random draw (``Flip a coin.``), which
  no model can get right more often than chance.

So a small model can learn most of it, and its MetaHead has real uncertainty to report
on the rest. Everything is deterministic given a seed.

Each question comes from a template with typed placeholders, and its answer from a
solver over the placeholder values; :func:`expected_answer` parses a question back
through the same templates, so grading uses exactly the rule that made the data.

Held-out split: an example belongs to the held-out side when a hash of its *split key*
falls in the first ``HELD_OUT_PERCENT`` of 100 buckets. Where a rule generalises
(addition, subtraction, unit conversion, sorting) the key is the problem itself
(``add:a=3:b=4``), so every phrasing of a held-out problem is held out and the held-out
score measures generalisation to unseen problems. Where the answer is a table to learn by
heart (the times table, facts, letter counts of the fixed word list) the key is the
question text: a held-out question is a phrasing the model never saw of an item it may
have seen in another phrasing (an item never seen in any phrasing could not be learned
at all). The unknowable questions also split by text.

Calibration split: the next ``CALIBRATION_PERCENT`` buckets are in neither the training
data nor the held-out evaluation; :func:`calibration` draws from them, so the MetaHead's
calibration (fitted at the end of training) sees unseen problems as the evaluation does,
without ever seeing the evaluation's own questions.

Shifted questions (:func:`shifted`): the same templates and grading, with slots the
generator never fills so (names of random letters, operands past its ranges, longer
words): questions off the training distribution. Two disjoint sets of shifts: calibration
reads one (whether the answer confidence needs the token confidence's agreement), ``vesper
eval`` scores the other.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

VERSION = 3  # bump when the generator's output changes: it keys the token cache
_STREAM_VERSION = 2  # seeds the random streams: the held-out questions stay those of v2
IDK = "I don't know."
HELD_OUT_PERCENT = 10
CALIBRATION_PERCENT = 5
# Calibration-split chats the MetaHead's confidence is refitted on by default (vesper
# calibrate, vesper train) and the max-softmax baseline recalibrated on (vesper eval).
CALIBRATION_CHATS = 10_000

WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum orange kiwi "
    "table chair window door floor house garden river mountain forest ocean island "
    "pencil paper letter number planet rocket silver yellow purple green little "
    "happy quick slow bright dark winter summer autumn spring morning evening "
    "bottle basket candle button pocket ladder hammer needle rabbit turtle parrot "
    "tiger zebra camel monkey dragon wizard castle bridge tunnel market school"
).split()


@cache
def facts() -> dict[str, dict[str, str]]:
    """The fact table: kind -> {subject: answer}, read from ``assets/facts.tsv``."""
    table: dict[str, dict[str, str]] = {}
    text = resources.files("vesper_sdk.assets").joinpath("facts.tsv").read_text("utf-8")
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, subject, answer = line.split("\t")
        table.setdefault(kind, {})[subject] = answer
    return table


# ----------------------------------------------------------------------------- helpers
_SYLLABLES = ("bra zor vel qui mon tal rix fen dor lum sap kel nor vex pim gar tho "
              "zel wib ond ark ulm yss").split()

# Placeholder name -> regex used by expected_answer to parse a question back.
_SLOTS = {
    "a": r"\d+", "b": r"\d+", "n": r"\d+", "word": r"[a-z]+", "letter": r"[a-z]",
    "words": r"[a-z]+(?:, [a-z]+)+", "unit_from": r"[a-z]+", "unit_to": r"[a-z]+",
    "country": r"[A-Z][A-Za-z ]*", "element": r"[a-z]+", "animal": r"[a-z]+",
    "name": r"[A-Z][a-z]+", "question": r".+",
}


def _made_up(rng: random.Random, parts: int, suffix: str = "") -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)) + suffix


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>{_SLOTS[part]})" if i % 2 else re.escape(part))
    return re.compile("".join(out))


@dataclass(frozen=True)
class Task:
    """One task family: question templates, a sampler of slot values and a solver.

    ``solve(slots)`` returns the answer, or None when the answer is a random draw
    (then ``guess(rng, question)`` makes the training target). ``key(slots, question)`` is
    the held-out split key (see the module docstring).
    """

    name: str
    weight: float
    templates: tuple[str, ...]
    sample: Callable[[random.Random], dict[str, str]]
    solve: Callable[[dict[str, str]], str | None]
    key: Callable[[dict[str, str], str], str]
    guess: Callable[[random.Random, str], str] | None = None


def _by_question(slots: dict[str, str], question: str) -> str:
    return question


def _problem(name: str) -> Callable[[dict[str, str], str], str]:
    return lambda slots, question: name + ":" + ":".join(f"{k}={slots[k]}" for k in sorted(slots))


# --- arithmetic
def _operand(rng: random.Random) -> int:
    # One or two digits with equal odds (uniform on 0..99 would make one-digit sums a 1 %
    # rarity): the small problems people ask first are learned early, and they teach the
    # digit-by-digit structure the two-digit ones need.
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def _sample_add(rng: random.Random) -> dict[str, str]:
    return {"a": str(_operand(rng)), "b": str(_operand(rng))}


def _sample_sub(rng: random.Random) -> dict[str, str]:
    a, b = sorted((_operand(rng), _operand(rng)), reverse=True)
    return {"a": str(a), "b": str(b)}


def _sample_mul(rng: random.Random) -> dict[str, str]:
    return {"a": str(rng.randint(0, 12)), "b": str(rng.randint(0, 12))}


# --- letters
def _sample_word(rng: random.Random) -> dict[str, str]:
    return {"word": rng.choice(WORDS)}


def _sample_letter(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    # Mostly a letter of the word; sometimes one it lacks (answer 0).
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
    return {"word": word, "letter": letter}


# --- units: (from, to) -> multiply or divide by factor
_UNITS = {
    ("kilometers", "meters"): (1000, True), ("meters", "kilometers"): (1000, False),
    ("kilograms", "grams"): (1000, True), ("grams", "kilograms"): (1000, False),
    ("hours", "minutes"): (60, True), ("minutes", "hours"): (60, False),
    ("minutes", "seconds"): (60, True), ("seconds", "minutes"): (60, False),
    ("days", "hours"): (24, True), ("hours", "days"): (24, False),
}


def _sample_units(rng: random.Random) -> dict[str, str]:
    (src, dst), (factor, multiply) = rng.choice(list(_UNITS.items()))
    k = rng.randint(2, 20)
    return {"n": str(k if multiply else k * factor), "unit_from": src, "unit_to": dst}


def _solve_units(s: dict[str, str]) -> str | None:
    rule = _UNITS.get((s["unit_from"], s["unit_to"]))
    if rule is None:
        return None
    factor, multiply = rule
    n = int(s["n"])
    if multiply:
        return str(n * factor)
    return str(n // factor) if n % factor == 0 else None


# --- sorting
def _sample_sort(rng: random.Random) -> dict[str, str]:
    return {"words": ", ".join(rng.sample(WORDS, rng.randint(3, 4)))}


# --- facts, with made-up subjects that have no answer
def _fact_sampler(kind: str, slot: str, made_up: Callable[[random.Random], str],
                  ) -> Callable[[random.Random], dict[str, str]]:
    def sample(rng: random.Random) -> dict[str, str]:
        known = facts()[kind]
        if rng.random() < 0.8:
            return {slot: rng.choice(sorted(known))}
        while True:
            name = made_up(rng)
            if name not in known:
                return {slot: name}
    return sample


def _fact_solver(kind: str, slot: str) -> Callable[[dict[str, str]], str | None]:
    return lambda s: facts()[kind].get(s[slot], IDK)


# --- unknowable
_PERSONAL = (
    "What is my neighbour's name?", "What did I eat for breakfast today?",
    "What is my favourite colour?", "How old is my cat?", "Where did I park my car?",
    "What is my password?", "What will the weather be like tomorrow?",
    "What is in my pocket right now?", "What is the name of my first teacher?",
    "How many books are on my shelf?", "What song am I humming?",
    "Who will win the next football match?",
)
_PERSON_TEMPLATES = ("What is {name}'s phone number?", "How old is {name}?",
                     "Where does {name} live?")


def _sample_personal(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.5:
        return {"question": rng.choice(_PERSONAL)}
    name = _made_up(rng, 2).capitalize()
    return {"question": rng.choice(_PERSON_TEMPLATES).format(name=name)}


def _solve_personal(s: dict[str, str]) -> str | None:
    q = s["question"]
    if q in _PERSONAL:
        return IDK
    for template in _PERSON_TEMPLATES:
        if _template_regex(template).fullmatch(q):
            return IDK
    return None


# --- random draws: the target is a coin flip, so no model can be sure
_RANDOM = {"Flip a coin.": ("Heads", "Tails"), "Roll a die.": tuple("123456"),
           "Pick a number between 1 and 10.": tuple(str(i) for i in range(1, 11)),
           "What number am I thinking of?": tuple(str(i) for i in range(1, 11))}


def _guess_random(rng: random.Random, question: str) -> str:
    return rng.choice(_RANDOM[question])


TASKS: tuple[Task, ...] = (
    Task("add", 0.14, ("What is {a}+{b}?", "What is {a} plus {b}?", "Calculate {a}+{b}."),
         _sample_add, lambda s: str(int(s["a"]) + int(s["b"])), _problem("add")),
    Task("sub", 0.10, ("What is {a}-{b}?", "What is {a} minus {b}?", "Calculate {a}-{b}."),
         _sample_sub, lambda s: str(int(s["a"]) - int(s["b"])), _problem("sub")),
    Task("mul", 0.12, ("What is {a}*{b}?", "What is {a} times {b}?", "Calculate {a}*{b}."),
         _sample_mul, lambda s: str(int(s["a"]) * int(s["b"])), _by_question),
    Task("word_length", 0.05, ("How many letters are in the word '{word}'?",
                                "Count the letters in '{word}'."),
         _sample_word, lambda s: str(len(s["word"])), _by_question),
    Task("letter_count", 0.05, ("How many times does the letter '{letter}' appear in "
                                 "'{word}'?", "Count the letter '{letter}' in '{word}'."),
         _sample_letter, lambda s: str(s["word"].count(s["letter"])), _by_question),
    Task("units", 0.12, ("How many {unit_to} are in {n} {unit_from}?",
                         "Convert {n} {unit_from} to {unit_to}."),
         _sample_units, _solve_units, _problem("units")),
    Task("sort", 0.07, ("Sort these words alphabetically: {words}.",
                        "Put in alphabetical order: {words}."),
         _sample_sort, lambda s: ", ".join(sorted(s["words"].split(", "))), _problem("sort")),
    Task("capital", 0.08, ("What is the capital of {country}?",
                           "Which city is the capital of {country}?"),
         _fact_sampler("capital", "country", lambda r: _made_up(r, 2, "ia").capitalize()),
         _fact_solver("capital", "country"), _by_question),
    Task("symbol", 0.07, ("What is the chemical symbol for {element}?",
                          "What is the symbol of the element {element}?"),
         _fact_sampler("symbol", "element", lambda r: _made_up(r, 2, "ium")),
         _fact_solver("symbol", "element"), _by_question),
    Task("legs", 0.04, ("How many legs does a {animal} have?", "How many legs has a {animal}?"),
         _fact_sampler("legs", "animal", lambda r: _made_up(r, 2)),
         _fact_solver("legs", "animal"), _by_question),
    Task("unknowable", 0.08, ("{question}",), _sample_personal, _solve_personal, _by_question),
    Task("random", 0.08, tuple(sorted(_RANDOM)), lambda rng: {}, lambda s: None, _by_question,
         guess=_guess_random),
)
_TASK_BY_NAME = {t.name: t for t in TASKS}


@cache
def _regexes() -> list[tuple[Task, re.Pattern[str]]]:
    return [(t, _template_regex(tmpl)) for t in TASKS for tmpl in t.templates]


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def _draw(rng: random.Random) -> tuple[Task, str, str, str]:
    """(task, question, answer, split key) for one random example."""
    task = rng.choices(TASKS, weights=[t.weight for t in TASKS])[0]
    slots = task.sample(rng)
    question = rng.choice(task.templates).format(**slots)
    answer = task.solve(slots)
    if answer is None:
        assert task.guess is not None, task.name
        answer = task.guess(rng, question)
    return task, question, answer, task.key(slots, question)


def _split(key: str) -> str:
    bucket = _bucket(key)
    if bucket < HELD_OUT_PERCENT:
        return "held"
    return "calibration" if bucket < HELD_OUT_PERCENT + CALIBRATION_PERCENT else "train"


def _examples(n: int, seed: int, split: str) -> list[tuple[Task, str, str]]:
    # One random stream per split, so none depends on how many of another were drawn;
    # all filter on the same hash, so they can never overlap.
    rng = random.Random(f"vesper-skills/{_STREAM_VERSION}/{seed}/{split}")
    out: list[tuple[Task, str, str]] = []
    while len(out) < n:
        task, question, answer, key = _draw(rng)
        if split != "train" and task.guess is not None:
            continue  # a random draw cannot be graded
        if _split(key) == split:
            out.append((task, question, answer))
    return out


def _chat(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def generate(n: int, seed: int = 0) -> list[dict]:
    """``n`` training chats ``{"messages": [user, assistant], "task": name}``.

    Deterministic given ``seed``; never contains a held-out problem (see the module
    docstring for how the split is made).
    """
    return [{"messages": _chat(q, a), "task": t.name} for t, q, a in _examples(n, seed, "train")]


def calibration(n: int, seed: int = 0) -> list[dict]:
    """``n`` chats from the calibration split, shaped like :func:`generate`'s.

    Problems of the kinds the evaluation holds out, drawn from neither the training nor
    the held-out questions (see the module docstring).
    """
    return [{"messages": _chat(q, a), "task": t.name}
            for t, q, a in _examples(n, seed, "calibration")]


def held_out(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """``n`` held-out ``(messages, answer)`` pairs for accuracy evaluation.

    ``messages`` holds the user turn only (ready for ``lm.chat``); ``answer`` is the
    expected reply. Random-draw requests are left out (they have no right answer).
    """
    return [(_chat(q), a) for _, q, a in _examples(n, seed, "held")]


def held_out_tasks(n: int, seed: int = 0) -> list[tuple[str, list[dict[str, str]], str]]:
    """Like :func:`held_out`, with each example's task name first, for per-task scores."""
    return [(t.name, _chat(q), a) for t, q, a in _examples(n, seed, "held")]


# ----------------------------------------------------------------------------- shifted
def _letters(rng: random.Random, shortest: int = 5, longest: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase)
                   for _ in range(rng.randint(shortest, longest)))


# Questions in the corpus's own templates, graded by its own rules, with slots its
# generator never fills this way: names of random letters (it makes names up from a few
# syllables, countries ending in -ia, elements in -ium), operands past its ranges, longer
# words. A confidence fitted on the corpus's questions has never seen these. Two sets of
# shifts, kept apart: calibration may read the first; evaluation scores the second, shifts
# nothing was fitted or chosen on.
_SHIFTS: dict[str, tuple[Callable[[random.Random], str], ...]] = {
    "calibration": (
        lambda r: f"What is the capital of {_letters(r).capitalize()}?",
        lambda r: f"What is the chemical symbol for {_letters(r)}?",
        lambda r: f"What is {r.randint(100, 999)} plus {r.randint(10, 999)}?",
        lambda r: f"How many letters are in the word '{_letters(r, 9, 12)}'?",
    ),
    "held": (
        lambda r: f"How many legs does a {_letters(r)} have?",
        lambda r: f"What is {_letters(r).capitalize()}'s phone number?",
        lambda r: f"What is {r.randint(13, 30)} times {r.randint(13, 30)}?",
        lambda r: f"What is {r.randint(200, 999)} minus {r.randint(100, 199)}?",
        lambda r: (f"How many times does the letter '{r.choice('aeiou')}' appear in "
                   f"'{_letters(r, 9, 12)}'?"),
    ),
}


def shifted(n: int, seed: int = 0, split: str = "held",
            ) -> list[tuple[str, list[dict[str, str]], str]]:
    """``n`` shifted questions ``(task, [user message], expected answer)``, the shifts of
    ``split`` ("held": for evaluation; "calibration": others) taken in turn."""
    if split not in _SHIFTS:
        raise ValueError(f"unknown shifted split {split!r}: use 'held' or 'calibration'")
    rng = random.Random(f"vesper-skills/shifted/{seed}/{split}")
    shifts, out = _SHIFTS[split], []
    while len(out) < n:
        question = shifts[len(out) % len(shifts)](rng)
        expected, task = expected_answer(question), task_of(question)
        if expected is not None and task is not None:
            out.append((task, _chat(question), expected))
    return out


def expected_answer(question: str) -> str | None:
    """The right answer to a question in the corpus's templates, else None.

    None also for random-draw requests (``Flip a coin.``), which have no right answer.
    """
    question = question.strip()
    for task, regex in _regexes():
        m = regex.fullmatch(question)
        if m is None:
            continue
        answer = task.solve(m.groupdict())
        if answer is not None or task.guess is not None:
            return answer
    return None


def task_of(question: str) -> str | None:
    """Name of the task family a question belongs to (None if it matches none)."""
    question = question.strip()
    for task, regex in _regexes():
        m = regex.fullmatch(question)
        if m is not None and (task.guess is not None or task.solve(m.groupdict()) is not None):
            return task.name
    return None


def split_key(question: str) -> str | None:
    """The key whose hash puts ``question`` on the training or the held-out side.

    The problem (``add:a=3:b=4``) where a rule generalises, else the question text; None
    for a question outside the corpus's templates.
    """
    question = question.strip()
    for task, regex in _regexes():
        m = regex.fullmatch(question)
        if m is not None and (task.guess is not None or task.solve(m.groupdict()) is not None):
            return task.key(m.groupdict(), question)
    return None


def is_held_out(question: str) -> bool:
    """Whether ``question`` belongs to the held-out side (never in :func:`generate`)."""
    key = split_key(question)
    return key is not None and _bucket(key) < HELD_OUT_PERCENT


def is_correct(question: str, reply: str) -> bool:
    """Whether ``reply`` answers ``question`` (whitespace and a final period ignored)."""
    expected = expected_answer(question)
    if expected is None:
        return False

    def norm(s: str) -> str:
        return " ".join(s.strip().rstrip(".").split()).lower()

    return norm(reply) == norm(expected)


__all__ = ["IDK", "TASKS", "Task", "expected_answer", "facts", "generate", "held_out",
           "held_out_tasks", "is_correct", "is_held_out", "shifted", "split_key", "task_of"]
