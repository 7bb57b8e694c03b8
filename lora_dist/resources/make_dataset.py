"""Generate tiny_instructions.jsonl, the instruction dataset shipped for the embedded default.

Usage: python lora_dist/resources/make_dataset.py [OUT.jsonl]   (default: beside this script)

Every row is written by the templates below from a fixed seed, so the file is ours (no third-party text)
and regenerates byte for byte. The tasks are regular on purpose: a 2-layer, 128-wide model learns their
shape within a minute on a CPU, so the eval loss of the embedded default falls clearly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 1234
ROWS_PER_TASK = 70

# Facts every atlas agrees on; small on purpose so a tiny model can memorise them.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara", "Russia": "Moscow",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Ghana": "Accra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "left": "right", "open": "closed",
    "happy": "sad", "early": "late", "light": "dark", "full": "empty", "old": "new", "high": "low",
    "strong": "weak", "wet": "dry", "hard": "soft", "long": "short", "rich": "poor", "first": "last",
    "inside": "outside", "loud": "quiet",
}
WORDS = [
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish",
    "apple", "bread", "chair", "lamp", "cloud", "rain", "snow", "wind", "book", "door", "road", "ship",
]
NUMBER_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _row(instruction: str, output: str, input_: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input_, "output": output}


def _addition(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return _row(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")


def _successor(rng: random.Random) -> dict[str, str]:
    n = rng.randint(0, 98)
    return _row(f"Which number comes after {n}?", f"The number after {n} is {n + 1}.")


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return _row("Reverse the order of the words.", " ".join(reversed(words)), " ".join(words))


def _count(rng: random.Random) -> dict[str, str]:
    words = rng.choices(WORDS, k=rng.randint(1, 9))
    return _row("How many words are in the input?", NUMBER_NAMES[len(words)], " ".join(words))


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(["What is the capital of {}?", "Name the capital city of {}."]).format(country)
    return _row(question, f"The capital of {country} is {CAPITALS[country]}.")


def _opposite(rng: random.Random) -> dict[str, str]:
    pairs = sorted(OPPOSITES.items()) + sorted((b, a) for a, b in OPPOSITES.items())
    word, opposite = rng.choice(pairs)
    question = rng.choice(["Give the opposite of the word '{}'.", "What is the opposite of '{}'?"]).format(word)
    return _row(question, opposite)


def _repeat(rng: random.Random) -> dict[str, str]:
    word, n = rng.choice(WORDS), rng.randint(2, 5)
    return _row(f"Repeat the word '{word}' {NUMBER_NAMES[n]} times.", " ".join([word] * n))


def _sort(rng: random.Random) -> dict[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return _row("Sort the digits from smallest to largest.", " ".join(map(str, sorted(digits))),
                " ".join(map(str, digits)))


TASKS = [_addition, _successor, _reverse, _count, _capital, _opposite, _repeat, _sort]


def make_rows(seed: int = SEED, rows_per_task: int = ROWS_PER_TASK) -> list[dict[str, str]]:
    """Distinct rows, `rows_per_task` of each task (fewer where a task has fewer), in a seeded order."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for task in TASKS:
        seen: set[str] = set()
        # Distinct rows keep the held-out split honest: no eval row is also a training row.
        for _ in range(rows_per_task * 20):
            row = task(rng)
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
            if len(seen) == rows_per_task:
                break
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict[str, str]], out: Path) -> None:
    """Write rows as JSON lines, atomically."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny_instructions.jsonl")
    write_jsonl(make_rows(), target)
    print(f"wrote {target}")
