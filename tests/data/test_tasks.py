"""The benchmark's bundled tasks: three families, train/validation/test, disjoint, checkable, realistic mistakes."""

from __future__ import annotations

import json
import re

import pytest

from infopo_cli.bundled import tasks
from infopo_cli.inference.answers import last_number, matches

GENERATED = tasks.generate()


def shipped(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (tasks.HERE / f"{task}_{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_shipped_files_are_what_the_generator_writes():
    for (task, split), rows in GENERATED.items():
        assert shipped(task, split) == [{k: r[k] for k in ("prompt", "chosen", "rejected", "answer")} for r in rows]


def test_three_tasks_with_at_least_500_problems_in_validation_and_test_and_no_prompt_twice():
    assert len(tasks.TASKS) >= 3
    prompts: dict[str, tuple[str, str]] = {}
    for name in ("arith_train", "arith_eval"):  # what the default preset was chosen on
        for line in (tasks.HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            prompts[json.loads(line)["prompt"]] = (name, "")
    for task in tasks.TASKS:
        assert len(shipped(task, "validation")) >= 500 and len(shipped(task, "test")) >= 500
        for split in tasks.SPLITS:
            for row in shipped(task, split):
                assert row["prompt"] not in prompts, (row["prompt"], prompts.get(row["prompt"]), task, split)
                prompts[row["prompt"]] = (task, split)


def test_no_problem_comes_back_in_other_words_or_with_other_names():
    """'Convert 24 weeks to days.' and 'How many days are in 24 weeks?' are one problem (one worked solution), as are two
    word problems that differ only in a name: each is in one split of one task at most, and not in the arith files."""
    seen: dict[str, tuple[str, str]] = {}
    for name in ("arith_train", "arith_eval"):
        for line in (tasks.HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            seen[tasks._solution(json.loads(line))] = (name, "")
    for task in tasks.TASKS:
        for split in tasks.SPLITS:
            for row in shipped(task, split):
                solution = tasks._solution(row)
                assert solution not in seen, (row["prompt"], seen.get(solution), task, split)
                seen[solution] = (task, split)


def test_a_count_of_one_is_singular():
    assert (tasks._count(1, "feet"), tasks._count(3, "feet"), tasks._count(1, "inches")) == ("1 foot", "3 feet", "1 inch")
    one = re.compile(r"\b1 (" + "|".join(tasks.SINGULAR) + r")\b")
    assert not [row["prompt"] for split in tasks.SPLITS for row in shipped("units", split)
                if one.search(row["prompt"] + row["chosen"] + row["rejected"])]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_chosen_replies_are_right_and_rejected_ones_wrong_by_the_checker(task):
    for split in tasks.SPLITS:
        for row in shipped(task, split):
            assert matches(row["chosen"], row["answer"]) and not matches(row["rejected"], row["answer"]), row


def test_column_mistakes_are_a_dropped_carry_or_a_forgotten_borrow():
    for row in GENERATED["columns", "test"]:
        off = abs(last_number(row["rejected"]) - int(row["answer"]))
        assert off in (10, 100, 1000, 10000), row  # one carry or borrow, carried to the end
        assert re.fullmatch(r"(dropped the carry from the|forgot the borrow in the) (ones|tens|hundreds|thousands)",
                            row["mistake"]), row["mistake"]


def test_unit_mistakes_are_a_confusable_factor_or_a_left_out_remainder():
    factors = {one: (factor, confused) for _, one, _, factor, confused in tasks.UNITS}
    for row in GENERATED["units", "test"]:
        said = re.search(r"1 (\w+) is (\d+) ", row["rejected"])
        one, factor = said.group(1), int(said.group(2))
        right, confused = factors[one]
        if row["mistake"].startswith("took 1"):
            assert factor in confused, row
        else:
            assert row["mistake"].startswith("left out the") and factor == right and "Add the" not in row["rejected"]


def test_the_checker_on_hand_written_replies():
    answer = "1375"
    for right in ("So 456 + 919 = 1375. The answer is 1375.", "The answer is 1,375.", "1375", "the answer is 1375 cm",
                  "It is **1375**", "456 + 919 = 1375"):
        assert matches(right, answer), right
    for wrong in ("The answer is 1365.", "1375, no wait: 1385.", "The answer is 13750.", "The answer is 137.5",
                  "I cannot tell."):
        assert not matches(wrong, answer), wrong
