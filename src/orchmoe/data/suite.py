"""The built-in task suite: instruction tasks with exact answers, generated procedurally from a seed.

It is written in the SNI layout (``tasks/<name>.json``, ``splits/default/{train,test}_tasks.txt``), so the same
loader reads it; it needs no download, and because every example's true task is known it measures whether the
Task Router discovers the tasks. The two test-split tasks are near relatives of training tasks (min vs max, lower
vs upper case), for the unseen-task evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "green",
    "quick",
    "light",
    "music",
    "paper",
    "water",
    "forest",
    "garden",
    "window",
    "silver",
    "bread",
    "candle",
    "rocket",
    "planet",
    "mirror",
    "yellow",
    "orange",
    "pencil",
    "bottle",
    "circle",
    "dragon",
    "engine",
    "farmer",
    "guitar",
    "island",
    "jacket",
    "kettle",
    "lemon",
    "mountain",
    "needle",
    "ocean",
    "pepper",
    "rabbit",
    "saddle",
    "tiger",
    "umbrella",
    "violin",
    "wagon",
    "zebra",
    "anchor",
    "basket",
    "cactus",
    "desert",
    "feather",
    "hammer",
    "ladder",
    "marble",
    "noodle",
    "pillow",
    "shadow",
    "tunnel",
    "velvet",
    "whistle",
]
ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("hard", "soft"), ("high", "low"), ("old", "new"), ("rich", "poor"),
    ("wet", "dry"), ("full", "empty"), ("long", "short"), ("strong", "weak"), ("loud", "quiet"), ("thick", "thin"),
)  # fmt: skip
UNITS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return UNITS[n]
    tens, unit = divmod(n, 10)
    return TENS[tens] + (f"-{UNITS[unit]}" if unit else "")


def _words(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _numbers(rng: random.Random, lo: int = 3, hi: int = 6) -> list[int]:
    return rng.sample(range(1, 100), rng.randint(lo, hi))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"{a} + {b}", str(a + b)


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 9)
    return " ".join(words), str(len(words))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 2, 4))
    return text, text.upper()


def _lower(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 2, 4))
    return text.upper(), text


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _longest(rng: random.Random) -> tuple[str, str]:
    while True:
        words = _words(rng)
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] != lengths[1]:
            return " ".join(words), max(words, key=len)


def _word_to_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    return number_words(n), str(n)


def _antonym_analogy(rng: random.Random) -> tuple[str, str]:
    (a, b), (c, d) = rng.sample(ANTONYMS, 2)
    return f"{a} : {b} :: {c} : ?", d


def _acronym(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 4)
    return " ".join(words), "".join(w[0] for w in words).upper()


def _maximum(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return ", ".join(map(str, nums)), str(max(nums))


def _minimum(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return ", ".join(map(str, nums)), str(min(nums))


# name -> (definition, generator); the order is the suite's order
TRAIN_TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "suite001_addition": ("Add the two numbers and give the sum.", _add),
    "suite002_count_words": ("Count the words in the text and give the count as a number.", _count_words),
    "suite003_reverse_word": ("Write the given word backwards, letter by letter.", _reverse),
    "suite004_uppercase": ("Rewrite the text in upper case letters.", _upper),
    "suite005_sort_numbers": ("Sort the list of numbers in increasing order.", _sort),
    "suite006_longest_word": ("Give the longest word of the text.", _longest),
    "suite007_word_to_number": ("Write the number given in words as digits.", _word_to_number),
    "suite008_antonym_analogy": ("Complete the analogy; each pair are opposites.", _antonym_analogy),
    "suite009_acronym": ("Write the acronym made of the first letter of every word, in capitals.", _acronym),
    "suite010_maximum": ("Give the largest number of the list.", _maximum),
}
TEST_TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "suite101_minimum": ("Give the smallest number of the list.", _minimum),
    "suite102_lowercase": ("Rewrite the text in lower case letters.", _lower),
}


def task_json(name: str, definition: str, gen: Callable, n: int, seed: int) -> dict:
    rng = random.Random(f"{seed}:{name}")
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for _ in range(100 * n):  # distinct inputs; every generator has far more than n of them
        inp, out = gen(rng)
        if inp not in seen:
            seen.add(inp)
            pairs.append((inp, out))
        if len(pairs) == n + 2:
            break
    examples, instances = pairs[:2], pairs[2:]
    return {
        "Contributors": ["orchmoe built-in suite"],
        "Source": ["synthetic"],
        "Categories": ["Synthetic"],
        "Definition": [definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Positive Examples": [{"input": i, "output": o, "explanation": ""} for i, o in examples],
        "Negative Examples": [],
        "Instances": [{"id": f"{name}-{k}", "input": i, "output": [o]} for k, (i, o) in enumerate(instances)],
    }


def write_suite(out_dir: str | Path, seed: int = 0, n_instances: int = 200, n_train_tasks: int | None = None) -> Path:
    """Write the suite in the SNI layout under ``out_dir`` and return it. Same seed, same bytes."""
    out = Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "splits" / "default").mkdir(parents=True, exist_ok=True)
    train = list(TRAIN_TASKS)[: n_train_tasks or len(TRAIN_TASKS)]
    for name in train + list(TEST_TASKS):
        definition, gen = {**TRAIN_TASKS, **TEST_TASKS}[name]
        data = task_json(name, definition, gen, n_instances, seed)
        (out / "tasks" / f"{name}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "splits" / "default" / "train_tasks.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "splits" / "default" / "test_tasks.txt").write_text("\n".join(TEST_TASKS) + "\n", encoding="utf-8")
    return out
