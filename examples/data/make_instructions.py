"""Write the small instruction/response dataset that `tinkex train` uses by default.

The dataset is generated, not scraped: a fixed random seed builds a few hundred short
prompt/response pairs in six families (arithmetic, string reversal, capitals, unit
conversions, simple facts, letter counting). The responses are short, so a tiny
byte-level model can learn something from them within a minute on a CPU.

Run it from anywhere; it writes two identical files:

    examples/data/instructions.jsonl      (what you read and copy)
    core/tinkex/_data/instructions.jsonl  (the copy installed inside the package)

    python examples/data/make_instructions.py [--check]

``--check`` only verifies that both files are up to date (exit 1 if not).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20251125
HERE = Path(__file__).resolve().parent
OUTPUTS = (
    HERE / "instructions.jsonl",
    HERE.parent.parent / "core" / "tinkex" / "_data" / "instructions.jsonl",
)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Nepal": "Kathmandu",
}

WORDS = [
    "cat",
    "dog",
    "tree",
    "moon",
    "star",
    "fish",
    "book",
    "lamp",
    "rain",
    "snow",
    "bird",
    "milk",
    "door",
    "road",
    "ship",
    "gold",
    "sand",
    "wind",
    "leaf",
    "rock",
    "apple",
    "river",
    "cloud",
    "bread",
    "stone",
    "light",
    "green",
    "water",
    "music",
    "table",
]

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "old": "new",
    "day": "night",
    "open": "closed",
    "happy": "sad",
    "early": "late",
    "light": "dark",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "in": "out",
    "left": "right",
}

FACTS = [
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does a dog have?", "4"),
    ("How many hours are in a day?", "24"),
    ("What is frozen water called?", "ice"),
    ("Which planet do we live on?", "Earth"),
    ("What do bees make?", "honey"),
    ("What is the first letter of the alphabet?", "a"),
    ("What is the last letter of the alphabet?", "z"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("What gas do plants take in?", "carbon dioxide"),
    ("What is the largest ocean?", "Pacific"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("How many minutes are in an hour?", "60"),
]


def _arithmetic(rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(110):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            result = a * b
        elif op == "+":
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            result = a + b
        else:
            a = rng.randint(10, 60)
            b = rng.randint(0, a)
            result = a - b
        out.append(
            {"task": "arithmetic", "prompt": f"What is {a} {op} {b}?", "response": str(result)}
        )
    return out


def _reversal(rng: random.Random) -> list[dict[str, str]]:
    out = [{"task": "reverse", "prompt": f"Reverse: {w}", "response": w[::-1]} for w in WORDS]
    out += [
        {"task": "uppercase", "prompt": f"Uppercase: {w}", "response": w.upper()}
        for w in rng.sample(WORDS, 20)
    ]
    return out


def _capitals() -> list[dict[str, str]]:
    out = []
    for country, capital in CAPITALS.items():
        out.append({"task": "capital", "prompt": f"Capital of {country}?", "response": capital})
    return out


def _units(rng: random.Random) -> list[dict[str, str]]:
    kinds = [
        ("km", "m", 1000),
        ("m", "cm", 100),
        ("kg", "g", 1000),
        ("hours", "minutes", 60),
        ("minutes", "seconds", 60),
        ("days", "hours", 24),
        ("liters", "ml", 1000),
        ("feet", "inches", 12),
    ]
    out = []
    for _ in range(70):
        src, dst, factor = rng.choice(kinds)
        n = rng.randint(1, 9)
        out.append(
            {"task": "units", "prompt": f"{n} {src} in {dst}?", "response": f"{n * factor} {dst}"}
        )
    return out


def _facts(rng: random.Random) -> list[dict[str, str]]:
    out = [{"task": "fact", "prompt": q, "response": a} for q, a in FACTS]
    out += [
        {"task": "opposite", "prompt": f"Opposite of {w}?", "response": o}
        for w, o in OPPOSITES.items()
    ]
    for w in rng.sample(WORDS, 20):
        out.append(
            {"task": "count", "prompt": f"How many letters in {w}?", "response": str(len(w))}
        )
    for _ in range(15):
        i = rng.randint(0, 24)
        a, b = chr(ord("a") + i), chr(ord("a") + i + 1)
        out.append({"task": "letters", "prompt": f"Letter after {a}?", "response": b})
    return out


def build() -> list[dict[str, str]]:
    """All pairs, in a fixed shuffled order (the same on every run)."""
    rng = random.Random(SEED)
    rows = _arithmetic(rng) + _reversal(rng) + _capitals() + _units(rng) + _facts(rng)
    # de-duplicate identical prompts (random draws can repeat), keep the first
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    rng.shuffle(unique)
    return unique


def render(rows: list[dict[str, str]]) -> str:
    return "".join(
        json.dumps({"prompt": r["prompt"], "response": r["response"], "task": r["task"]}) + "\n"
        for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the files are up to date"
    )
    args = parser.parse_args(argv)
    text = render(build())
    stale = [p for p in OUTPUTS if not p.exists() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p}", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        print(f"wrote {len(text.splitlines())} pairs to {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
