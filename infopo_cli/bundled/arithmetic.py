"""Seeded generator of infopo's bundled arithmetic preference data.

Every pair is objectively ordered: "chosen" is a short, correct worked solution and
"rejected" has the same template with exactly one mistake (one wrong step carried
consistently to the end, or correct working with a wrong final result). That gives a
preference-trained model a real signal that a test can verify.

Run ``python -m infopo_cli.bundled.arithmetic`` to rewrite arith_train.jsonl and
arith_eval.jsonl next to this file. Stdlib only, and deterministic: all randomness comes
from one ``random.Random(seed)``, so the files can be checked against the script.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

SEED = 0
N_TRAIN = 600
N_EVAL = 150
HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "arith_train.jsonl"
EVAL_FILE = HERE / "arith_eval.jsonl"

# Share of rejected answers whose working is right but whose final result is wrong; the
# rest get one wrong intermediate step.
WRONG_FINAL_SHARE = 0.3

NAMES = (
    "Ava", "Ben", "Chloe", "Daniel", "Emma", "Farah", "Gabriel", "Hana", "Isaac", "Jade",
    "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Wei", "Yusuf", "Zoe", "Leo", "Mia", "Ravi", "Sofia", "Tom",
)
THINGS = (
    "apples", "stickers", "marbles", "cards", "pencils", "shells", "stamps", "cookies",
    "books", "beads", "toy cars", "crayons", "balloons", "oranges", "buttons",
)
ITEMS = (  # (singular, plural) of things with a whole-dollar price
    ("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"),
    ("sandwich", "sandwiches"), ("toy car", "toy cars"), ("book", "books"), ("mug", "mugs"),
    ("kite", "kites"), ("ball", "balls"), ("plant", "plants"), ("puzzle", "puzzles"),
    ("lunch box", "lunch boxes"), ("cap", "caps"), ("comic", "comics"),
)
GROUPS = (  # (container, contents) for equal-groups problems
    ("boxes", "crayons"), ("bags", "apples"), ("shelves", "books"), ("rows", "chairs"),
    ("packs", "cards"), ("baskets", "eggs"), ("trays", "cookies"), ("teams", "players"),
    ("jars", "sweets"), ("vans", "children"),
)
ACTIVITIES = (
    "homework", "reading", "a bike ride", "piano practice", "a football game",
    "cleaning the kitchen", "baking a cake", "a walk in the park", "a swim", "painting",
)
SHAPES = ("rectangle", "rectangular garden", "rectangular poster", "rectangular field",
          "rectangular table", "rectangular room")


class _Work:
    """Passes a family's computed values to its template, corrupting at most one.

    Families route each intermediate result through ``v`` in working order and use the
    returned value downstream, so a single wrong step is carried consistently to the end.
    """

    def __init__(self, rng: random.Random | None = None, fault_at: int = -1) -> None:
        self.rng = rng
        self.fault_at = fault_at
        self.steps = 0
        self.values: list[int] = []

    def v(self, x: int) -> int:
        if self.steps == self.fault_at and self.rng is not None:
            x = _wrong(self.rng, x)
        self.steps += 1
        self.values.append(x)
        return x


Render = Callable[[_Work], tuple[str, int]]  # working text and final value
Family = Callable[[random.Random], tuple[str, Render]]


def _wrong(rng: random.Random, x: int) -> int:
    """A plausible slip on ``x``: off by one/two, off by ten (a carry), or swapped digits."""
    cands = [x + 1, x - 1, x + 2, x + 10, x - 10]
    s = str(x)
    if len(s) >= 2 and s[-1] != "0":  # no leading zero after the swap
        cands.append(int(s[:-2] + s[-1] + s[-2]))
    cands = [c for c in dict.fromkeys(cands) if c > 0 and c != x]
    return rng.choice(cands)


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


# --- problem families: each returns (prompt, render) ---------------------------------


def _addition(rng: random.Random) -> tuple[str, Render]:
    a = rng.randint(12, 480)
    b = rng.randint(1, 7) * 10 + rng.randint(1, 9)  # non-zero ones, so both steps matter
    prompt = rng.choice((
        "What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
        "Calculate {a} + {b}.", "Find the total of {a} and {b}.",
    )).format(a=a, b=b)

    def render(w: _Work) -> tuple[str, int]:
        tens, ones = b - b % 10, b % 10
        s1 = w.v(a + tens)
        s2 = w.v(s1 + ones)
        return f"Add the tens first: {a} + {tens} = {s1}. Then add the ones: {s1} + {ones} = {s2}.", s2

    return prompt, render


def _subtraction(rng: random.Random) -> tuple[str, Render]:
    b = rng.randint(1, 8) * 10 + rng.randint(1, 9)
    a = rng.randint(b + 5, 400)
    prompt = rng.choice((
        "What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?",
        "Calculate {a} - {b}.", "Take {b} away from {a}. What is left?",
    )).format(a=a, b=b)

    def render(w: _Work) -> tuple[str, int]:
        tens, ones = b - b % 10, b % 10
        s1 = w.v(a - tens)
        s2 = w.v(s1 - ones)
        return f"Subtract the tens first: {a} - {tens} = {s1}. Then subtract the ones: {s1} - {ones} = {s2}.", s2

    return prompt, render


def _multiplication(rng: random.Random) -> tuple[str, Render]:
    a = rng.randint(1, 9) * 10 + rng.randint(1, 9)
    b = rng.randint(3, 9)
    prompt = rng.choice((
        "What is {a} × {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?",
        "Calculate {b} × {a}.", "What is the product of {a} and {b}?",
    )).format(a=a, b=b)

    def render(w: _Work) -> tuple[str, int]:
        tens, ones = a - a % 10, a % 10
        p1 = w.v(tens * b)
        p2 = w.v(ones * b)
        p = w.v(p1 + p2)
        return f"Split {a} into {tens} and {ones}: {tens} × {b} = {p1} and {ones} × {b} = {p2}. Then {p1} + {p2} = {p}.", p

    return prompt, render


def _change(rng: random.Random) -> tuple[str, Render]:
    name = _names(rng, 1)[0]
    (i1, _), (i2, _) = rng.sample(ITEMS, 2)
    p1, p2 = rng.randint(2, 19), rng.randint(2, 19)
    bill = rng.choice([x for x in (10, 20, 50, 100) if x > p1 + p2])
    prompt = rng.choice((
        "{n} buys a {i1} for ${p1} and a {i2} for ${p2}, and pays with a ${bill} bill. How much change does {n} get?",
        "A {i1} costs ${p1} and a {i2} costs ${p2}. {n} buys both with a ${bill} bill. How many dollars of change should {n} receive?",
        "{n} has a ${bill} bill and spends ${p1} on a {i1} and ${p2} on a {i2}. How much money is left?",
    )).format(n=name, i1=i1, i2=i2, p1=p1, p2=p2, bill=bill)

    def render(w: _Work) -> tuple[str, int]:
        t = w.v(p1 + p2)
        c = w.v(bill - t)
        return f"The total cost is ${p1} + ${p2} = ${t}. The change is ${bill} - ${t} = ${c}.", c

    return prompt, render


def _item_price(rng: random.Random) -> tuple[str, Render]:
    one, many = rng.choice(ITEMS)
    p, n = rng.randint(2, 25), rng.randint(2, 9)
    name = _names(rng, 1)[0]
    prompt = rng.choice((
        "One {one} costs ${p}. How much do {n} {many} cost?",
        "{name} buys {n} {many} at ${p} each. How much does {name} spend?",
        "A shop sells {many} for ${p} each. What is the price of {n} {many}?",
    )).format(one=one, many=many, p=p, n=n, name=name)

    def render(w: _Work) -> tuple[str, int]:
        t = w.v(n * p)
        return f"Each {one} costs ${p}, so {n} of them cost {n} × ${p} = ${t}.", t

    return prompt, render


def _sharing(rng: random.Random) -> tuple[str, Render]:
    n, q = rng.randint(2, 9), rng.randint(2, 15)
    total = n * q  # built from the quotient so the division is always exact
    name = _names(rng, 1)[0]
    thing = rng.choice(THINGS)
    prompt = rng.choice((
        "{name} has {total} {thing} and shares them equally among {n} friends. How many {thing} does each friend get?",
        "{total} {thing} are packed equally into {n} boxes. How many {thing} are in each box?",
        "A teacher splits {total} {thing} equally between {n} groups. How many {thing} does each group get?",
    )).format(name=name, total=total, thing=thing, n=n)

    def render(w: _Work) -> tuple[str, int]:
        r = w.v(total // n)
        return f"Sharing equally means dividing: {total} ÷ {n} = {r}. Each share has {r} {thing}.", r

    return prompt, render


def _elapsed_time(rng: random.Random) -> tuple[str, Render]:
    h = rng.randint(1, 10)
    m1, m2 = 5 * rng.randint(1, 11), 5 * rng.randint(1, 11)
    name, act = _names(rng, 1)[0], rng.choice(ACTIVITIES)
    prompt = rng.choice((
        "{name} started {act} at {h}:{m1:02d} and finished at {h2}:{m2:02d}. How many minutes did it take?",
        "{act_cap} began at {h}:{m1:02d} and ended at {h2}:{m2:02d}. How many minutes long was it?",
    )).format(name=name, act=act, act_cap=act[0].upper() + act[1:], h=h, h2=h + 1, m1=m1, m2=m2)

    def render(w: _Work) -> tuple[str, int]:
        s1 = w.v(60 - m1)
        s2 = w.v(s1 + m2)
        return f"From {h}:{m1:02d} to {h + 1}:00 is 60 - {m1} = {s1} minutes. Then add {m2} more minutes: {s1} + {m2} = {s2}.", s2

    return prompt, render


def _perimeter(rng: random.Random) -> tuple[str, Render]:
    length = rng.randint(5, 40)
    width = rng.randint(2, length - 1)
    unit = rng.choice(("cm", "m"))
    shape = rng.choice(SHAPES)
    prompt = rng.choice((
        "A {shape} is {l} {u} long and {wd} {u} wide. What is its perimeter?",
        "What is the perimeter of a {shape} that measures {l} {u} by {wd} {u}?",
        "A {shape} is {l} {u} long and {wd} {u} wide. How many {u} of ribbon go once around its edge?",
    )).format(shape=shape, l=length, wd=width, u=unit)

    def render(w: _Work) -> tuple[str, int]:
        s = w.v(length + width)
        p = w.v(2 * s)
        return f"Add the length and width: {length} + {width} = {s}. The perimeter is twice that: 2 × {s} = {p} {unit}.", p

    return prompt, render


def _area(rng: random.Random) -> tuple[str, Render]:
    length, width = rng.randint(3, 15), rng.randint(2, 9)
    unit = rng.choice(("cm", "m"))
    shape = rng.choice(SHAPES)
    prompt = rng.choice((
        "A {shape} is {l} {u} long and {wd} {u} wide. What is its area?",
        "What is the area of a {shape} that measures {l} {u} by {wd} {u}?",
        "How many square {u} does a {shape} cover if it is {l} {u} long and {wd} {u} wide?",
    )).format(shape=shape, l=length, wd=width, u=unit)

    def render(w: _Work) -> tuple[str, int]:
        a = w.v(length * width)
        return f"Area is length times width: {length} × {width} = {a} square {unit}.", a

    return prompt, render


def _percent(rng: random.Random) -> tuple[str, Render]:
    k = rng.randint(2, 9)
    base = 10 * rng.randint(2, 50)  # a multiple of 10, so 10% is a whole number
    pct = 10 * k
    prompt = rng.choice((
        "What is {pct}% of {base}?",
        "A jacket costs ${base} and is {pct}% off. How many dollars is the discount?",
        "There are {base} students in a school and {pct}% of them walk to school. How many students walk?",
        "Find {pct} percent of {base}.",
    )).format(pct=pct, base=base)

    def render(w: _Work) -> tuple[str, int]:
        t = w.v(base // 10)
        r = w.v(k * t)
        return f"10% of {base} is {base} ÷ 10 = {t}. So {pct}% is {k} × {t} = {r}.", r

    return prompt, render


def _age(rng: random.Random) -> tuple[str, Render]:
    a, b = _names(rng, 2)
    kind = rng.randrange(3)
    if kind == 0:
        x, d, y = rng.randint(4, 40), rng.randint(2, 30), rng.randint(2, 15)
        prompt = f"{a} is {x} years old. {b} is {d} years older than {a}. How old will {b} be in {y} years?"

        def render(w: _Work) -> tuple[str, int]:
            s1 = w.v(x + d)
            s2 = w.v(s1 + y)
            return f"{b} is {x} + {d} = {s1} years old now. In {y} years {b} will be {s1} + {y} = {s2}.", s2
    elif kind == 1:
        x = rng.randint(20, 60)
        d = rng.randint(2, x - 12)
        y = rng.randint(2, min(9, x - d - 3))
        prompt = f"{a} is {x} years old and {b} is {d} years younger. How old was {b} {y} years ago?"

        def render(w: _Work) -> tuple[str, int]:
            s1 = w.v(x - d)
            s2 = w.v(s1 - y)
            return f"{b} is {x} - {d} = {s1} years old now. {y} years ago {b} was {s1} - {y} = {s2}.", s2
    else:
        x, k = rng.randint(3, 15), rng.randint(2, 5)
        prompt = f"{b} is {x} years old. {a} is {k} times as old as {b}. How old is {a}?"

        def render(w: _Work) -> tuple[str, int]:
            s = w.v(k * x)
            return f"{a} is {k} times {b}'s age: {k} × {x} = {s} years old.", s

    return prompt, render


def _unit_conversion(rng: random.Random) -> tuple[str, Render]:
    # (big unit, small unit, factor, range of the small part, prompt templates)
    big, small, factor, lo, hi, step, templates = rng.choice((
        ("meters", "centimeters", 100, 5, 95, 1, (
            "How many centimeters are in {a} meters and {b} centimeters?",
            "A rope is {a} m {b} cm long. How long is it in centimeters?")),
        ("kilograms", "grams", 1000, 50, 950, 50, (
            "A bag of flour weighs {a} kg {b} g. How many grams is that?",
            "How many grams are in {a} kilograms and {b} grams?")),
        ("hours", "minutes", 60, 5, 55, 5, (
            "A movie lasts {a} hours and {b} minutes. How many minutes is that?",
            "How many minutes are in {a} hours and {b} minutes?")),
        ("minutes", "seconds", 60, 5, 55, 5, (
            "A song is {a} minutes and {b} seconds long. How many seconds is that?",
            "How many seconds are in {a} minutes and {b} seconds?")),
    ))
    a = rng.randint(2, 5 if factor == 1000 else 9)  # from 2: keeps "{a} meters" plural
    b = step * rng.randint(lo // step, hi // step)
    prompt = rng.choice(templates).format(a=a, b=b)

    def render(w: _Work) -> tuple[str, int]:
        s1 = w.v(a * factor)
        s2 = w.v(s1 + b)
        return f"1 {big[:-1]} is {factor} {small}, so {a} × {factor} = {s1} {small}. Add the rest: {s1} + {b} = {s2}.", s2

    return prompt, render


def _difference(rng: random.Random) -> tuple[str, Render]:
    a, b = _names(rng, 2)
    thing = rng.choice(THINGS)
    x = rng.randint(10, 150)
    y = x + rng.randint(3, 90)
    kind = rng.randrange(3)
    verb = "has"
    if kind == 0:
        prompt = f"{a} has {x} {thing} and {b} has {y} {thing}. How many more {thing} does {b} have than {a}?"
    elif kind == 1:
        prompt = f"{b} has {y} {thing}. {a} has {x} {thing}. How many fewer {thing} does {a} have?"
    else:
        prompt = f"{a} scored {x} points and {b} scored {y} points. How many more points did {b} score?"
        thing, verb = "points", "scored"

    def render(w: _Work) -> tuple[str, int]:
        d = w.v(y - x)
        return f"{b} {verb} {y} {thing} and {a} {verb} {x}, so the difference is {y} - {x} = {d}.", d

    return prompt, render


def _two_step(rng: random.Random) -> tuple[str, Render]:
    a, b = _names(rng, 2)
    thing = rng.choice(THINGS)
    if rng.random() < 0.5:
        x, y = rng.randint(8, 90), rng.randint(3, 50)
        z = rng.randint(2, x + y - 3)
        prompt = rng.choice((
            "{a} had {x} {t}. {a} bought {y} more and then gave {z} to {b}. How many {t} does {a} have now?",
            "{a} had {x} {t} and got {y} more from {b}. Then {a} lost {z} of them. How many {t} are left?",
        )).format(a=a, b=b, t=thing, x=x, y=y, z=z)

        def render(w: _Work) -> tuple[str, int]:
            s1 = w.v(x + y)
            s2 = w.v(s1 - z)
            return f"First {x} + {y} = {s1} {thing}. Then {s1} - {z} = {s2} {thing}.", s2
    else:
        x, y = rng.randint(5, 80), rng.randint(2, 40)
        prompt = (f"{a} has {x} {thing}. {b} has {y} more {thing} than {a}. "
                  f"How many {thing} do they have together?")

        def render(w: _Work) -> tuple[str, int]:
            s1 = w.v(x + y)
            s2 = w.v(x + s1)
            return f"{b} has {x} + {y} = {s1} {thing}. Together they have {x} + {s1} = {s2} {thing}.", s2

    return prompt, render


def _average(rng: random.Random) -> tuple[str, Render]:
    a, b = rng.randint(5, 95), rng.randint(5, 95)
    c = rng.choice([v for v in range(5, 96) if (a + b + v) % 3 == 0])  # integer mean
    name = _names(rng, 1)[0]
    prompt = rng.choice((
        "What is the average of {a}, {b} and {c}?",
        "{n} scored {a}, {b} and {c} points in three games. What is the average score?",
        "Three bags weigh {a} kg, {b} kg and {c} kg. What is their average weight in kg?",
        "Find the mean of {a}, {b} and {c}.",
    )).format(a=a, b=b, c=c, n=name)

    def render(w: _Work) -> tuple[str, int]:
        s = a + b + c  # not a fault point: a wrong sum would make the mean non-integer
        m = w.v(s // 3)
        return f"Add the three numbers: {a} + {b} + {c} = {s}. Divide by 3: {s} ÷ 3 = {m}.", m

    return prompt, render


def _equal_groups(rng: random.Random) -> tuple[str, Render]:
    box, item = rng.choice(GROUPS)
    n, k = rng.randint(2, 9), rng.randint(3, 25)
    prompt = rng.choice((
        "There are {n} {box} with {k} {item} in each. How many {item} are there in total?",
        "Each of the {n} {box} holds {k} {item}. How many {item} are there altogether?",
    )).format(n=n, box=box, k=k, item=item)

    def render(w: _Work) -> tuple[str, int]:
        t = w.v(n * k)
        return f"There are {n} groups of {k}, so multiply: {n} × {k} = {t} {item}.", t

    return prompt, render


def _money_count(rng: random.Random) -> tuple[str, Render]:
    name = _names(rng, 1)[0]
    x, y = rng.randint(2, 9), rng.randint(2, 9)
    big, small, value, unit = rng.choice((
        ("five-dollar bills", "one-dollar bills", 5, "dollars"),
        ("ten-dollar bills", "one-dollar bills", 10, "dollars"),
        ("dimes", "pennies", 10, "cents"),
        ("nickels", "pennies", 5, "cents"),
    ))
    prompt = f"{name} has {x} {big} and {y} {small}. How many {unit} does {name} have?"

    def render(w: _Work) -> tuple[str, int]:
        s1 = w.v(x * value)
        s2 = w.v(s1 + y)
        return f"The {big} are worth {x} × {value} = {s1} {unit}. Adding the {small}: {s1} + {y} = {s2} {unit}.", s2

    return prompt, render


def _missing_number(rng: random.Random) -> tuple[str, Render]:
    a, b = rng.randint(5, 120), rng.randint(5, 90)
    c = a + b
    name, thing = _names(rng, 1)[0], rng.choice(THINGS)
    prompt = rng.choice((
        "What number added to {b} gives {c}?",
        "{n} had some {t}. After getting {b} more, {n} has {c}. How many {t} did {n} have at first?",
        "A number plus {b} equals {c}. What is the number?",
    )).format(b=b, c=c, n=name, t=thing)

    def render(w: _Work) -> tuple[str, int]:
        r = w.v(c - b)
        return f"Work backwards by subtracting: {c} - {b} = {r}.", r

    return prompt, render


FAMILIES: tuple[tuple[str, Family], ...] = (
    ("addition", _addition),
    ("subtraction", _subtraction),
    ("multiplication", _multiplication),
    ("shopping_change", _change),
    ("price_of_items", _item_price),
    ("sharing_equally", _sharing),
    ("elapsed_time", _elapsed_time),
    ("rectangle_perimeter", _perimeter),
    ("rectangle_area", _area),
    ("percent", _percent),
    ("age", _age),
    ("unit_conversion", _unit_conversion),
    ("difference", _difference),
    ("two_step", _two_step),
    ("average", _average),
    ("equal_groups", _equal_groups),
    ("money_count", _money_count),
    ("missing_number", _missing_number),
)


# --- assembling rows -----------------------------------------------------------------


def _respond(working: str, final: int) -> str:
    return f"{working} The answer is {final}."


def _make_row(rng: random.Random, family: str, fn: Family) -> dict[str, str]:
    prompt, render = fn(rng)
    good = _Work()
    working, answer = render(good)
    for _ in range(100):  # retry only on the rare slip that cancels out or goes negative
        if rng.random() < WRONG_FINAL_SHARE:
            bad_working, bad_final = working, _wrong(rng, answer)
        else:
            bad = _Work(rng, fault_at=rng.randrange(good.steps))
            bad_working, bad_final = render(bad)
            if min(bad.values) < 1:
                continue
        if bad_final != answer:
            break
    else:
        raise RuntimeError(f"could not corrupt a {family} problem: {prompt!r}")
    return {
        "prompt": prompt,
        "chosen": _respond(working, answer),
        "rejected": _respond(bad_working, bad_final),
        "answer": str(answer),
        "family": family,
    }


def generate_with_answers(
    seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval rows with the true ``answer`` and ``family`` kept, for checking."""
    rng = random.Random(seed)
    seen: set[str] = set()  # membership only; never iterated, so order stays seeded
    order: list[tuple[str, Family]] = []
    splits: list[list[dict[str, str]]] = []
    for n in (n_train, n_eval):
        rows: list[dict[str, str]] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError("too many duplicate prompts; widen the templates")
            if not order:  # shuffled rounds keep the families balanced in both splits
                order = list(FAMILIES)
                rng.shuffle(order)
            row = _make_row(rng, *order.pop())
            if row["prompt"] in seen:  # dedupe within and across splits
                continue
            seen.add(row["prompt"])
            rows.append(row)
        splits.append(rows)
    return splits[0], splits[1]


def generate(
    seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval rows with exactly the keys prompt, chosen, rejected."""
    train, evals = generate_with_answers(seed, n_train, n_eval)
    keep = ("prompt", "chosen", "rejected")
    return ([{k: r[k] for k in keep} for r in train], [{k: r[k] for k in keep} for r in evals])


_ANSWER_RE = re.compile(r"The answer is\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The number after the last "The answer is", without "$" or commas; None if absent."""
    found = _ANSWER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    # Temp file in the same folder + os.replace: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the data is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    """Rewrite arith_train.jsonl and arith_eval.jsonl from the seeded generator."""
    train, evals = generate()
    _write_jsonl(TRAIN_FILE, train)
    _write_jsonl(EVAL_FILE, evals)
    print(f"wrote {len(train)} rows to {TRAIN_FILE} and {len(evals)} rows to {EVAL_FILE}")


if __name__ == "__main__":
    main()
