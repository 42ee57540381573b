"""Seeded generator of the benchmark's three verifiable task families, each in train, validation and test splits.

- `word`: the arithmetic word problems of `arithmetic.py` (money, time, shapes, ages, sharing, ...); the rejected
  reply carries one slip through its working (off by one or ten, swapped digits) or states a wrong final result.
- `columns`: multi-digit addition and subtraction written out column by column; the rejected reply drops one carry
  (addition) or forgets one borrow (subtraction) and carries the mistake to the end, so it is off by a power of ten.
- `units`: unit conversions (length, mass, volume, time, money) one way or the other, or with a remainder; the
  rejected reply uses a confusable factor (100 centimeters to a meter taken as 10 or 1000, 60 minutes to an hour
  as 100) or forgets to add the remainder.

Every reply ends "The answer is N." and every row carries its `answer`: a reply is right when the last number it
writes equals the answer (`inference/answers.py`). No problem appears twice anywhere — neither its prompt nor its
worked solution (names aside), so a conversion asked in other words or a word problem about someone else is the same
problem: not in two splits, not in two tasks, and not in the default preset's `arith_train`/`arith_eval`, so the
test splits are problems no setting was chosen on. Settings are chosen on `validation`; `test` is only for reporting.

Run ``python -m infopo_cli.bundled.tasks`` to rewrite the TASK_SPLIT.jsonl files next to this file; stdlib only
and deterministic (one ``random.Random(SEED)``), so a test checks the files against the script.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from infopo_cli.bundled import arithmetic

SEED = 2026
TASKS = ("word", "columns", "units")
SPLITS = {"train": 600, "validation": 500, "test": 500}
HERE = Path(__file__).resolve().parent
PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands")

# (big unit, its singular, small unit, small units in one big, the factors a hurried reply confuses it with)
UNITS = (
    ("meters", "meter", "centimeters", 100, (10, 1000)),
    ("kilometers", "kilometer", "meters", 1000, (100,)),
    ("kilograms", "kilogram", "grams", 1000, (100,)),
    ("liters", "liter", "milliliters", 1000, (100,)),
    ("centimeters", "centimeter", "millimeters", 10, (100,)),
    ("hours", "hour", "minutes", 60, (100, 24)),
    ("minutes", "minute", "seconds", 60, (100,)),
    ("days", "day", "hours", 24, (12, 60)),
    ("weeks", "week", "days", 7, (5, 10)),
    ("feet", "foot", "inches", 12, (10,)),
    ("yards", "yard", "feet", 3, (12,)),
    ("dollars", "dollar", "cents", 100, (10,)),
)

Row = dict[str, str]
SINGULAR = {"centimeters": "centimeter", "meters": "meter", "grams": "gram", "milliliters": "milliliter",
            "millimeters": "millimeter", "minutes": "minute", "seconds": "second", "hours": "hour", "days": "day",
            "inches": "inch", "feet": "foot", "cents": "cent"}


def _count(k: int, unit: str) -> str:
    """'1 foot', '3 feet'."""
    return f"{k} {SINGULAR.get(unit, unit) if k == 1 else unit}"


def _row(prompt: str, working: str, answer: int, wrong_working: str, wrong: int, mistake: str) -> Row:
    return {"prompt": prompt, "chosen": f"{working} The answer is {answer}.",
            "rejected": f"{wrong_working} The answer is {wrong}.", "answer": str(answer), "mistake": mistake}


# --- columns ----------------------------------------------------------------------------------------------

def _digits(n: int, width: int) -> list[int]:
    """Digits of `n`, ones first, padded to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def _add_columns(a: int, b: int, drop: int | None = None) -> tuple[str, int]:
    """Column addition of a + b in words; `drop`: the column whose carry the next column forgets."""
    width = len(str(max(a, b)))
    steps, carry, total = [], 0, 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        s = x + y + carry
        added = f"{x} + {y} + {carry}" if carry else f"{x} + {y}"
        last = i == width - 1
        carry = s // 10
        if last:
            steps.append(f"{PLACES[i].capitalize()}: {added} = {s}, write {s}.")
            total += s * 10 ** i
        else:
            steps.append(f"{PLACES[i].capitalize()}: {added} = {s}, write {s % 10}"
                         + (" and carry 1." if carry else "."))
            total += (s % 10) * 10 ** i
        if i == drop:
            carry = 0
    return " ".join(steps) + f" So {a} + {b} = {total}.", total


def _subtract_columns(a: int, b: int, forget: int | None = None) -> tuple[str, int]:
    """Column subtraction of a - b (a > b) in words; `forget`: the column whose borrow the next column forgets."""
    width = len(str(a))
    steps, borrow, total = [], 0, 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        top = x - borrow
        shown = f"{x} - 1 borrowed = {top}, and " if borrow else ""
        if top < 0:  # a 0 that has lent: it borrows ten itself and is 9 after lending
            d = 9 - y
            steps.append(f"{PLACES[i].capitalize()}: 0 has lent 1, so borrow ten: 10 - 1 = 9, and 9 - {y} = {d}.")
        elif top < y:
            d, borrow = top + 10 - y, 1
            steps.append(f"{PLACES[i].capitalize()}: {shown}{top} is less than {y}, so borrow ten: "
                         f"{top + 10} - {y} = {d}.")
        else:
            d, borrow = top - y, 0
            steps.append(f"{PLACES[i].capitalize()}: {shown}{top} - {y} = {d}.")
        total += d * 10 ** i
        if i == forget:
            borrow = 0
    return " ".join(steps) + f" So {a} - {b} = {total}.", total


def _columns(rng: random.Random) -> Row:
    width = rng.randint(3, 4)
    while True:
        a, b = rng.randint(10 ** (width - 1), 10 ** width - 1), rng.randint(10 ** (width - 2), 10 ** width - 1)
        if rng.random() < 0.5:
            prompt = rng.choice(("What is {a} + {b}? Add column by column.", "Add {a} and {b}, column by column.",
                                 "Work out {a} + {b} in columns.")).format(a=a, b=b)
            working, answer = _add_columns(a, b)
            places = [i for i in range(width - 1) if (a // 10 ** i) % 10 + (b // 10 ** i) % 10 + _carry_in(a, b, i) >= 10]
            if places:
                slip = rng.choice(places)
                wrong_working, wrong = _add_columns(a, b, drop=slip)
                return _row(prompt, working, answer, wrong_working, wrong, f"dropped the carry from the {PLACES[slip]}")
        else:
            a, b = max(a, b), min(a, b)
            if a - b < 10:
                continue
            prompt = rng.choice(("What is {a} - {b}? Subtract column by column.", "Subtract {b} from {a} in columns.",
                                 "Work out {a} - {b} in columns.")).format(a=a, b=b)
            working, answer = _subtract_columns(a, b)
            places = [i for i in range(len(str(a)) - 1) if _borrows(a, b, i)]
            if places:
                slip = rng.choice(places)
                wrong_working, wrong = _subtract_columns(a, b, forget=slip)
                return _row(prompt, working, answer, wrong_working, wrong, f"forgot the borrow in the {PLACES[slip + 1]}")


def _carry_in(a: int, b: int, i: int) -> int:
    """The carry into column i of a + b."""
    return 1 if (a % 10 ** i) + (b % 10 ** i) >= 10 ** i else 0


def _borrows(a: int, b: int, i: int) -> bool:
    """Whether column i of a - b borrows from the next."""
    return (a % 10 ** (i + 1)) < (b % 10 ** (i + 1))


# --- units ------------------------------------------------------------------------------------------------

def _units(rng: random.Random) -> Row:
    big, one, small, factor, confused = rng.choice(UNITS)
    wrong_factor = rng.choice(confused)
    kind = rng.choice(("down", "up", "remainder"))
    if kind == "down":
        n = rng.randint(2, 40)
        prompt = rng.choice(("How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.",
                             "{n} {big} is how many {small}?")).format(n=n, big=big, small=small)

        def say(f: int) -> tuple[str, int]:
            return f"1 {one} is {f} {small}, so multiply: {n} × {f} = {n * f}.", n * f
        working, answer = say(factor)
        wrong_working, wrong = say(wrong_factor)
        mistake = f"took 1 {one} as {wrong_factor} {small}"
    elif kind == "up":
        step = factor * wrong_factor // _gcd(factor, wrong_factor)  # whole numbers either way
        m = step * rng.randint(1, max(2, 4000 // step))
        prompt = rng.choice(("How many {big} is {m} {small}?", "Convert {m} {small} to {big}.",
                             "{m} {small} is how many {big}?")).format(m=m, big=big, small=small)

        def say(f: int) -> tuple[str, int]:
            return f"1 {one} is {f} {small}, so divide: {m} ÷ {f} = {m // f}.", m // f
        working, answer = say(factor)
        wrong_working, wrong = say(wrong_factor)
        mistake = f"took 1 {one} as {wrong_factor} {small}"
    else:
        n, k = rng.randint(2, 12), rng.randint(1, factor - 1)
        rest = _count(k, small)
        prompt = rng.choice(("How many {small} are in {n} {big} and {rest}?",
                             "Write {n} {big} and {rest} in {small}.")).format(n=n, rest=rest, big=big, small=small)

        def say(f: int, add: bool = True) -> tuple[str, int]:
            head = f"1 {one} is {f} {small}, so {n} × {f} = {n * f} {small}."
            return (f"{head} Add the {rest}: {n * f} + {k} = {n * f + k}.", n * f + k) if add else (head, n * f)
        working, answer = say(factor)
        if rng.random() < 0.5:
            (wrong_working, wrong), mistake = say(wrong_factor), f"took 1 {one} as {wrong_factor} {small}"
        else:
            (wrong_working, wrong), mistake = say(factor, add=False), f"left out the {rest}"
    if answer == wrong:  # a confusion that changes nothing is no mistake: draw again
        return _units(rng)
    return _row(prompt, working, answer, wrong_working, wrong, mistake)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# --- word problems ----------------------------------------------------------------------------------------

def _word_maker() -> Callable[[random.Random], Row]:
    """Word problems from `arithmetic.py`'s families in shuffled rounds (every family in every split)."""
    order: list = []

    def make(rng: random.Random) -> Row:
        if not order:
            order.extend(arithmetic.FAMILIES)
            rng.shuffle(order)
        family, fn = order.pop()
        row = arithmetic._make_row(rng, family, fn)
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "answer": row["answer"],
                "mistake": f"one slip in a word problem ({family})"}
    return make


# --- assembling --------------------------------------------------------------------------------------------

def generate(seed: int = SEED) -> dict[tuple[str, str], list[Row]]:
    """{(task, split): rows}, each row with prompt, chosen, rejected, answer and the rejected reply's `mistake`."""
    rng = random.Random(seed)
    # a problem is its prompt and its worked solution: "Convert 24 weeks to days." and "How many days are in 24 weeks?"
    # are one problem (the same chosen reply), as are two word problems that differ only in a name
    arith = [json.loads(line) for name in ("arith_train", "arith_eval")
             for line in (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    seen = {row["prompt"] for row in arith} | {_solution(row) for row in arith}
    makers = {"word": _word_maker(), "columns": _columns, "units": _units}
    out: dict[tuple[str, str], list[Row]] = {}
    for task in TASKS:
        for split, n in SPLITS.items():
            rows: list[Row] = []
            for _ in range(200 * n):
                if len(rows) == n:
                    break
                row = makers[task](rng)
                if row["prompt"] not in seen and _solution(row) not in seen:
                    seen.update((row["prompt"], _solution(row)))
                    rows.append(row)
            else:
                raise RuntimeError(f"{task}: too few distinct prompts for {split}; widen the templates")
            out[task, split] = rows
    return out


def _solution(row: Row) -> str:
    """The worked solution without the names in it: two word problems that differ only in who has the apples are one."""
    return re.sub(r"\b(" + "|".join(arithmetic.NAMES) + r")\b", "NAME", row["chosen"])


def main() -> None:
    """Rewrite every TASK_SPLIT.jsonl next to this file from the seeded generator (without the `mistake` notes)."""
    for (task, split), rows in generate().items():
        path = HERE / f"{task}_{split}.jsonl"
        arithmetic._write_jsonl(path, [{k: r[k] for k in ("prompt", "chosen", "rejected", "answer")} for r in rows])
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
