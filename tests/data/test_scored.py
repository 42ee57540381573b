"""Scored, ranked, labelled and rated public preference rows -> the exact pairs, the drops and their reasons."""

from __future__ import annotations

import copy

import pytest

from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.scored import PAIRINGS, SCORED_FORMATS, ScoreOptions, detect_scored, scored_pairs
from infopo_cli.errors import ConfigError, DataError

WHERE = "d.jsonl:7"


def annotations(helpfulness: str, honesty: str, instruction_following: str, truthfulness: str) -> dict:
    """UltraFeedback's per-aspect annotations, ratings as the strings the dataset stores."""
    return {"helpfulness": {"Rating": helpfulness, "Rationale": "...", "Rationale For Rating": "...", "Type": ["1"]},
            "honesty": {"Rating": honesty, "Rationale": "..."},
            "instruction_following": {"Rating": instruction_following, "Rationale": "..."},
            "truthfulness": {"Rating": truthfulness, "Rationale": "...", "Rationale For Rating": "...", "Type": ["0"]}}


# openbmb/UltraFeedback: scores from overall_score, else fine-grained_score, else the mean annotation rating.
ULTRAFEEDBACK = {
    "source": "evol_instruct", "instruction": "Name a prime number greater than 10.",
    "models": ["gpt-4", "alpaca-7b", "llama-2-13b-chat", "falcon-40b-instruct"],
    "completions": [
        {"model": "gpt-4", "principle": "helpfulness", "custom_system_prompt": "You are helpful.",
         "response": "11 is a prime number greater than 10.", "annotations": annotations("5", "5", "5", "5"),
         "critique": "Correct and concise.", "overall_score": 8.5, "fine-grained_score": 5.0},
        {"model": "alpaca-7b", "principle": "honesty", "custom_system_prompt": "Be honest.",
         "response": "12 is prime.", "annotations": annotations("1", "2", "3", "1"),
         "critique": "12 is not prime.", "overall_score": "2", "fine-grained_score": 1.75},
        {"model": "llama-2-13b-chat", "principle": "helpfulness", "custom_system_prompt": "",
         "response": "13.", "annotations": annotations("4", "4", "5", "4"), "critique": "Terse.",
         "fine-grained_score": 4.25},
        {"model": "falcon-40b-instruct", "principle": "truthfulness", "custom_system_prompt": "",
         "response": "Seventeen, for example.", "annotations": annotations("5", "N/A", "4", "3"), "critique": "Fine."},
    ],
    "correct_answers": ["None"], "incorrect_answers": ["None"],
}
UF_PROMPT = "Name a prime number greater than 10."
UF_11, UF_12, UF_13, UF_17 = ("11 is a prime number greater than 10.", "12 is prime.", "13.", "Seventeen, for example.")
# scores: 11 -> 8.5 (overall), 12 -> 2 (overall, a string), 13 -> 4.25 (fine-grained), 17 -> 4.0 (mean of 5, 4, 3)

# berkeley-nest/Nectar: an HH transcript prompt and ranked answers, rank 1 best.
NECTAR = {
    "prompt": "\n\nHuman: What is 2+2?\n\nAssistant:",
    "answers": [{"answer": "2 + 2 = 5.", "model": "llama-2-7b-chat", "rank": 3.0},
                {"answer": "2 + 2 = 4.", "model": "gpt-4", "rank": 1.0},
                {"answer": "It is 4.", "model": "gpt-3.5-turbo", "rank": 2.0},
                {"answer": "I don't know.", "model": "dolly-v2-12b", "rank": 4.0}],
    "turns": 1, "num_responses": 4, "source": ["lmsys-chat-1m"], "good_natured": True,
}
USER = (("user", "What is 2+2?"),)

# stanfordnlp/SHP: two Reddit comments, the label and their vote counts.
SHP = {
    "post_id": "himc90", "domain": "askscience_train", "upvote_ratio": 0.99,
    "history": "Why is the sky blue?",
    "c_root_id_A": "fv7pbd5", "c_root_id_B": "fv7m3z0",
    "created_at_utc_A": 1593475000, "created_at_utc_B": 1593470000,
    "score_A": 52, "score_B": 12,
    "human_ref_A": "Rayleigh scattering: air scatters short (blue) wavelengths most.",
    "human_ref_B": "Because it reflects the ocean.",
    "labels": 1, "seconds_difference": 5000.0, "score_ratio": 4.333333333333333,
}
SHP_A, SHP_B = SHP["human_ref_A"], SHP["human_ref_B"]


def messages(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# HuggingFaceH4/ultrafeedback_binarized and argilla's dpo sets: ordinary pairs carrying their scores.
UF_BINARIZED = {
    "prompt": "What is 2 + 3?", "prompt_id": "abc123",
    "chosen": messages(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.")),
    "rejected": messages(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 6.")),
    "messages": messages(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.")),
    "score_chosen": 8.0, "score_rejected": 3.0,
}
ARGILLA = {
    "dataset": "distilabel-math-preference-dpo", "prompt": "What is 2 + 3?",
    "chosen": messages(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.")),
    "chosen_rating": 5, "chosen_model": "gpt-4",
    "rejected": messages(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 6.")),
    "rejected_rating": 2, "rejected_model": "llama-2",
}
RATED_PAIR = PreferencePair((("user", "What is 2 + 3?"),), (("assistant", "2 + 3 = 5."),),
                            (("assistant", "2 + 3 = 6."),))


def triples(pairs: list[PreferencePair]) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def replies(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    """(chosen, rejected) texts of string or single-assistant-message pairs."""
    text = lambda t: t if isinstance(t, str) else t[0][1]  # noqa: E731
    return [(text(p.chosen), text(p.rejected)) for p in pairs]


def run(row: dict, fmt: str | None = None, **options) -> tuple[list[PreferencePair], str | None]:
    return scored_pairs(row, WHERE, fmt or detect_scored(row), ScoreOptions(**options))


def error(row: dict, fmt: str, **options) -> str:
    with pytest.raises(DataError) as err:
        run(row, fmt, **options)
    message = str(err.value)
    assert "\n" not in message and message.startswith(WHERE + ": ")
    assert not any(name in message for name in ("Error", "Exception", "NoneType", "Traceback"))
    return message


# --- detection ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [
    (ULTRAFEEDBACK, "scored"),
    ({"prompt": "Hi", "completions": ["a", "b"], "ratings": [1, 2]}, "scored"),
    (NECTAR, "ranked"),
    (SHP, "labelled"),
    ({k: v for k, v in SHP.items() if k != "labels"}, "labelled"),
    (UF_BINARIZED, "rated"),
    (ARGILLA, "rated"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}, None),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "completions": ["a", "b"]}, None),  # already a pair
    ({"prompt": "p", "answers": [{"answer": "a"}, {"answer": "b"}]}, None),             # no ranks
    ({"prompt": "p", "answers": ["a", "b"]}, None),
    ("not an object", None),
])
def test_detection(row, expected):
    assert detect_scored(row) == expected
    assert expected is None or expected in SCORED_FORMATS


# --- scored: UltraFeedback and generic ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected", [
    ("best-worst", [(UF_11, UF_12)]),
    ("best-vs-each", [(UF_11, UF_13), (UF_11, UF_17), (UF_11, UF_12)]),
    ("adjacent", [(UF_11, UF_13), (UF_13, UF_17), (UF_17, UF_12)]),
    ("all", [(UF_11, UF_13), (UF_11, UF_17), (UF_11, UF_12), (UF_13, UF_17), (UF_13, UF_12), (UF_17, UF_12)]),
])
def test_ultrafeedback_pairings(mode, expected):
    pairs, reason = run(ULTRAFEEDBACK, pairs=mode)
    assert reason is None and replies(pairs) == expected
    assert all(p.prompt == UF_PROMPT and p.where == WHERE for p in pairs)
    assert isinstance(pairs[0].chosen, str)  # a string prompt gives an explicit pair


def test_ultrafeedback_min_score_gap():
    pairs, _ = run(ULTRAFEEDBACK, pairs="adjacent", min_score_gap=0.5)  # 13 (4.25) vs 17 (4.0) is 0.25 apart
    assert replies(pairs) == [(UF_11, UF_13), (UF_17, UF_12)]
    assert run(ULTRAFEEDBACK, min_score_gap=6.5)[0]  # best-worst gap is exactly 6.5
    assert run(ULTRAFEEDBACK, min_score_gap=6.6) == ([], "score gap below --min-score-gap")


def test_ultrafeedback_unscored_completions_are_left_out():
    row = copy.deepcopy(ULTRAFEEDBACK)
    row["completions"][0]["annotations"] = annotations("N/A", "N/A", "N/A", "N/A")
    del row["completions"][0]["overall_score"], row["completions"][0]["fine-grained_score"]
    assert replies(run(row)[0]) == [(UF_13, UF_12)]
    for completion in row["completions"][1:]:
        completion.pop("annotations"), completion.pop("overall_score", None), completion.pop("fine-grained_score", None)
    row["completions"][1]["overall_score"] = None
    assert run(row) == ([], "fewer than two scored completions")


def test_generic_scored_string_ratings_and_message_prompt():
    row = {"prompt": messages(("system", "Be brief."), ("user", "Capital of France?")),
           "completions": ["Paris.", "Lyon.", {"text": "Marseille."}, {"content": "I am not sure."}],
           "ratings": ["9", 2, 5.5, "1"]}
    pairs, reason = run(row, pairs="best-vs-each")
    assert reason is None
    assert triples(pairs) == [((("system", "Be brief."), ("user", "Capital of France?")), (("assistant", "Paris."),),
                               (("assistant", rejected),)) for rejected in ("Marseille.", "Lyon.", "I am not sure.")]


def test_scores_field_and_float_gaps():
    row = {"prompt": "p", "completions": ["a", "b"], "scores": ["4.5", "4.4"]}
    assert replies(run(row, min_score_gap=0.1)[0]) == [("a", "b")]  # 4.5 - 4.4 rounds below 0.1 in floats
    assert run(row, min_score_gap=0.11)[1] == "score gap below --min-score-gap"


def test_ties_choose_the_first_and_never_pair():
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "ratings": [5, 1, 5, 1]}
    assert replies(run(row)[0]) == [("a", "b")]                    # first of the tied best, first of the tied worst
    assert replies(run(row, pairs="best-vs-each")[0]) == [("a", "b"), ("a", "d")]
    assert replies(run(row, pairs="adjacent")[0]) == [("a", "b"), ("a", "d"), ("c", "b"), ("c", "d")]
    assert replies(run(row, pairs="all")[0]) == [("a", "b"), ("a", "d"), ("c", "b"), ("c", "d")]
    for mode in PAIRINGS:
        assert run({**row, "ratings": [3, 3, "3", 3.0]}, pairs=mode) == ([], "all completions tie")


def test_adjacent_levels_with_a_tie_in_the_middle():
    row = {"prompt": "p", "completions": ["top", "mid1", "mid2", "low"], "ratings": [4, 3, 3, 1]}
    assert replies(run(row, pairs="adjacent")[0]) == [("top", "mid1"), ("top", "mid2"), ("mid1", "low"), ("mid2", "low")]


def test_duplicate_texts_never_pair_with_themselves():
    row = {"prompt": "p", "completions": ["A", "A", "B"], "ratings": [5, 4, 1]}
    assert replies(run(row, pairs="all")[0]) == [("A", "B")]      # (A, A) skipped, (A, B) kept once
    assert replies(run(row, pairs="adjacent")[0]) == [("A", "B")]
    same = {"prompt": "p", "completions": ["A", "B", "A"], "ratings": [5, 5, 1]}
    assert run(same) == ([], "completions that differ in score have the same text")


# --- ranked: Nectar -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected", [
    ("best-worst", [("2 + 2 = 4.", "I don't know.")]),
    ("best-vs-each", [("2 + 2 = 4.", "It is 4."), ("2 + 2 = 4.", "2 + 2 = 5."), ("2 + 2 = 4.", "I don't know.")]),
    ("adjacent", [("2 + 2 = 4.", "It is 4."), ("It is 4.", "2 + 2 = 5."), ("2 + 2 = 5.", "I don't know.")]),
    ("all", [("2 + 2 = 4.", "It is 4."), ("2 + 2 = 4.", "2 + 2 = 5."), ("2 + 2 = 4.", "I don't know."),
             ("It is 4.", "2 + 2 = 5."), ("It is 4.", "I don't know."), ("2 + 2 = 5.", "I don't know.")]),
])
def test_nectar_pairings(mode, expected):
    pairs, reason = run(NECTAR, pairs=mode)
    assert reason is None and replies(pairs) == expected
    assert all(p.prompt == USER and p.chosen[0][0] == "assistant" and p.where == WHERE for p in pairs)


def test_nectar_multi_turn_prompt_and_rank_gaps():
    row = {**NECTAR, "prompt": "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2+2?\n\nAssistant:"}
    pairs, _ = run(row)
    assert pairs[0].prompt == (("user", "Hi!"), ("assistant", "Hello, how can I help?"), ("user", "What is 2+2?"))
    assert replies(run(NECTAR, pairs="all", min_score_gap=2)[0]) == [
        ("2 + 2 = 4.", "2 + 2 = 5."), ("2 + 2 = 4.", "I don't know."), ("It is 4.", "I don't know.")]
    assert run(NECTAR, pairs="adjacent", min_score_gap=2) == ([], "score gap below --min-score-gap")


def test_nectar_tied_ranks():
    row = {**NECTAR, "answers": [{**answer, "rank": 1.0} for answer in NECTAR["answers"]]}
    assert run(row) == ([], "all completions tie")


@pytest.mark.parametrize("rank", [0, -1])
def test_nectar_ranks_below_one_are_refused(rank):
    row = {**NECTAR, "answers": [{**NECTAR["answers"][0], "rank": rank}, *NECTAR["answers"][1:]]}
    with pytest.raises(DataError, match=rf"field 'answers': item 1: 'rank' must be 1 or more \(1 is best\), got {rank}"):
        run(row)


# --- labelled: SHP ------------------------------------------------------------------------------------------------

def test_shp_labels_choose():
    assert triples(run(SHP)[0]) == [("Why is the sky blue?", SHP_A, SHP_B)]
    flipped = {**SHP, "labels": 0, "score_A": 12, "score_B": 52}
    assert triples(run(flipped)[0]) == [("Why is the sky blue?", SHP_B, SHP_A)]
    assert run(SHP)[0][0].where == WHERE


@pytest.mark.parametrize("label", [0, 1])
def test_an_shp_label_that_contradicts_its_votes_is_refused(label):
    row = {**SHP, "labels": label, "score_A": 10, "score_B": 2} if label == 0 else {**SHP, "score_A": 2, "score_B": 10}
    with pytest.raises(DataError, match=r"field 'labels': [01] prefers human_ref_[AB], but its votes prefer the other"):
        run(row)


def test_shp_min_score_ratio_uses_the_given_ratio_else_the_scores():
    assert run(SHP, min_score_ratio=4.3)[0]
    assert run(SHP, min_score_ratio=4.5) == ([], "score ratio below --min-score-ratio")
    computed = {k: v for k, v in SHP.items() if k != "score_ratio"}
    assert run(computed, min_score_ratio=52 / 12)[0]
    assert run(computed, min_score_ratio=5) == ([], "score ratio below --min-score-ratio")
    zero = {**computed, "score_B": 0}
    assert run(zero, min_score_ratio=1000)[0]   # 52 / 0: infinite, kept


def test_shp_without_labels_the_higher_score_wins_and_equal_is_a_tie():
    row = {k: v for k, v in SHP.items() if k not in ("labels", "score_ratio")}
    assert replies(run({**row, "score_A": 3, "score_B": "7"})[0]) == [(SHP_B, SHP_A)]
    assert run({**row, "score_A": 7, "score_B": 7}) == ([], "tie")
    assert run({**SHP, "score_A": 7, "score_B": 7}) == ([], "tie")       # a label does not break a tie
    assert run(SHP, min_score_gap=40)[0]                              # 52 - 12 votes
    assert run(SHP, min_score_gap=40.5) == ([], "score gap below --min-score-gap")


def test_shp_prompt_field_wins_over_history():
    pairs, _ = run({**SHP, "prompt": messages(("user", "Explain the sky's colour."))})
    assert triples(pairs) == [((("user", "Explain the sky's colour."),), (("assistant", SHP_A),), (("assistant", SHP_B),))]


# --- rated: ultrafeedback_binarized and argilla -------------------------------------------------------------------

def test_rated_pairs_kept_and_dropped():
    for row, names in ((UF_BINARIZED, ("score_chosen", "score_rejected")), (ARGILLA, ("chosen_rating", "rejected_rating"))):
        chosen, rejected = names
        assert run(row) == ([RATED_PAIR], None) and run(row)[0][0].where == WHERE
        assert run({**row, rejected: row[chosen]}) == ([], "tie")
        assert run({**row, chosen: 1, rejected: "4"}) == ([], "rejected is rated above chosen")
        assert run({**row, chosen: "5", rejected: 4.5}, min_score_gap=1) == ([], "score gap below --min-score-gap")
        assert run({**row, chosen: None}) == ([], "chosen or rejected has no rating")


def test_rated_explicit_strings():
    row = {"prompt": "p", "chosen": "good", "rejected": "bad", "chosen-rating": 4, "rejected-rating": 2}
    assert run(row) == ([PreferencePair("p", "good", "bad")], None)


# --- errors: one line, naming the field ---------------------------------------------------------------------------

@pytest.mark.parametrize("row, fmt, field, problem", [
    ({"prompt": "p", "completions": ["a", "b", "c"], "ratings": [1, 2, "high"]}, "scored", "ratings",
     "item 3 is not a number"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ratings": [1, 2]}, "scored", "ratings",
     "has 2 items but 'completions' has 3"),
    ({"prompt": "p", "completions": ["a", "b"]}, "scored", "ratings", "missing"),
    ({"prompt": "p", "completions": ["a", 3], "ratings": [1, 2]}, "scored", "completions", "item 2: expected a string"),
    ({"prompt": "p", "completions": ["a", {"model": "x"}], "ratings": [1, 2]}, "scored", "completions",
     "item 2: expected an object with 'text' or 'response' or 'content'"),
    ({"prompt": "p", "completions": ["a", "  "], "ratings": [1, 2]}, "scored", "completions", "item 2: empty"),
    ({"completions": ["a", "b"], "ratings": [1, 2]}, "scored", "prompt", "missing (or 'instruction')"),
    ({"prompt": "p", "completions": "a", "ratings": [1]}, "scored", "completions", "expected a list"),
    ({**ULTRAFEEDBACK, "completions": [{"response": "a", "overall_score": "high"}, {"response": "b", "overall_score": 1}]},
     "scored", "completions", "item 1: 'overall_score' is not a number"),
    ({**ULTRAFEEDBACK, "completions": [{"response": "a", "annotations": annotations("5", "five", "4", "4")},
                                       {"response": "b", "overall_score": 1}]},
     "scored", "completions", "item 1: annotations 'honesty' 'Rating' is not a number"),
    ({"prompt": "p", "completions": ["a", "b"], "ratings": [1, float("nan")]}, "scored", "ratings",
     "item 2 is not a finite number"),
    ({"prompt": messages(("user", "q"), ("assistant", "a")), "completions": ["a", "b"], "ratings": [2, 1]},
     "scored", "prompt", "must end with a user"),
    ({"prompt": [{"role": "narrator", "content": "q"}], "completions": ["a", "b"], "ratings": [2, 1]},
     "scored", "prompt", "unknown role"),
    ({**NECTAR, "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": "first"}]}, "ranked", "answers",
     "item 2: 'rank' is not a number"),
    ({**NECTAR, "prompt": "Assistant: hi"}, "ranked", "prompt", "transcript does not start"),
    ({"prompt": "p"}, "ranked", "answers", "missing"),
    ({**SHP, "labels": 2}, "labelled", "labels", "expected 1 (human_ref_A preferred) or 0"),
    ({**SHP, "score_A": "many"}, "labelled", "score_A", "not a number (got 'many')"),
    ({k: v for k, v in SHP.items() if k != "score_B"}, "labelled", "score_B", "missing (the row has 'score_A')"),
    ({k: v for k, v in SHP.items() if k not in ("labels", "score_A", "score_B")}, "labelled", "labels", "missing"),
    ({k: v for k, v in SHP.items() if k != "history"}, "labelled", "history", "missing (or 'prompt')"),
    ({**SHP, "human_ref_B": SHP_A}, "labelled", "human_ref_B", "identical to 'human_ref_A'"),
    ({**SHP, "human_ref_A": ""}, "labelled", "human_ref_A", "empty"),
    ({**SHP, "score_B": -3, "score_ratio": None}, "labelled", "score_B", "negative"),
    ({**UF_BINARIZED, "score_rejected": "bad"}, "rated", "score_rejected", "not a number"),
    ({k: v for k, v in ARGILLA.items() if k != "rejected_rating"}, "rated", "rejected_rating", "missing"),
    ({**ARGILLA, "rejected": ARGILLA["chosen"]}, "rated", "rejected", "identical to 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "rated", "chosen_rating", "missing"),
])
def test_malformed_rows_are_one_line_naming_the_field(row, fmt, field, problem):
    message = error(row, fmt, min_score_ratio=2)
    assert f"field '{field}'" in message and problem in message, message


def test_bad_options_and_formats_are_config_errors():
    with pytest.raises(ConfigError, match="unknown pairing 'best'; use one of best-worst, best-vs-each, adjacent, all"):
        ScoreOptions(pairs="best")
    with pytest.raises(ConfigError, match="--min-score-gap must be a finite number >= 0"):
        ScoreOptions(min_score_gap=-1)
    with pytest.raises(ConfigError, match="--min-score-ratio"):
        ScoreOptions(min_score_ratio=float("nan"))
    with pytest.raises(ConfigError, match="unknown scored format 'explicit'"):
        scored_pairs(SHP, WHERE, "explicit", ScoreOptions())
