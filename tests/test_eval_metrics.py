"""Official SuperNI scoring (itune.eval.metrics) against hand-computed values.

ROUGE-L arithmetic in the comments: tokens are those of rouge_score's default tokenizer (lowercase, characters
outside [a-z0-9] become spaces, Porter stem for tokens longer than 3 characters) unless stated otherwise;
P = LCS / len(prediction tokens), R = LCS / len(reference tokens), F = 2PR / (P + R).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from itune.errors import ConfigError, DataFormatError
from itune.eval.metrics import (
    SuperNIResults,
    XlingualTokenizer,
    category_key,
    compute_grouped_metrics,
    compute_metrics,
    exact_match,
    metric_max_over_ground_truths,
    normalize_answer,
    rouge_l,
    score_superni,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
TASK1159 = SHARED / "data" / "superni" / "tasks" / "task1159_bard_analogical_reasoning_containers.json"


# ------------------------------------------------------------------------------------------------- exact match


def test_normalize_answer_lowercases_strips_ascii_punctuation_and_collapses_whitespace():
    assert normalize_answer("  The  Cat, sat!\n") == "the cat sat"
    assert normalize_answer("(A) 3.5%") == "a 35"


def test_exact_match_removes_ascii_punctuation():
    assert exact_match("Yes.", "yes") is True
    assert exact_match("don't", "dont") is True
    assert exact_match("(A) 3.5%", "a 35") is True


def test_exact_match_keeps_non_ascii_characters():
    # Unicode quotes are not in string.punctuation, so they survive normalisation.
    assert normalize_answer("“Yes”") == "“yes”"
    assert exact_match("“Yes”", "yes") is False
    # é is kept (only lowercased): "khloé" != "khloe".
    assert normalize_answer("Khloé") == "khloé"
    assert exact_match("Khloé", "Khloe") is False
    assert exact_match("KHLOÉ", "khloé") is True


def test_exact_match_keeps_articles():
    assert exact_match("the cat", "cat") is False
    assert exact_match("A cat", "a cat") is True


def test_exact_match_collapses_whitespace_but_does_not_join_words():
    assert exact_match("new\t york \n", "new york") is True
    assert exact_match("newyork", "new york") is False


def test_exact_match_of_empty_strings():
    assert exact_match("", "") is True
    assert exact_match("", "bottle") is False
    # "!!!" normalises to "" as well.
    assert exact_match("!!!", "") is True


# ----------------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_stems_with_porter():
    # running -> run, runs -> run: LCS 1, P = R = 1/1 -> F = 1.
    assert rouge_l("running", "runs") == 1.0
    # bottles -> bottl, bottle -> bottl.
    assert rouge_l("bottles", "bottle") == 1.0
    # Irregular forms are not stemmed together: ran vs run (3 chars, not stemmed anyway) -> LCS 0 -> F = 0.
    assert rouge_l("ran", "run") == 0.0


def test_rouge_l_partial_overlap():
    # pred [the, cat, sat, on, the, mat], ref [the, cat]: LCS 2, P = 2/6, R = 2/2,
    # F = 2 * (1/3) * 1 / (1/3 + 1) = (2/3) / (4/3) = 1/2.
    assert rouge_l("the cat sat on the mat", "the cat") == pytest.approx(0.5, rel=1e-12)
    # pred [the, dog, ran], ref [a, dog, ran]: LCS 2, P = R = 2/3, F = 2/3.
    assert rouge_l("the dog ran", "a dog ran") == pytest.approx(2 / 3, rel=1e-12)


def test_rouge_l_ignores_punctuation_and_case():
    # "Bottle!" -> [bottl], "bottle" -> [bottl]: F = 1.
    assert rouge_l("Bottle!", "bottle") == 1.0


def test_rouge_l_default_tokenizer_drops_non_ascii():
    # "Khloé Kardashian" -> [khlo, kardashian] (é becomes a space), "Khloe Kardashian" -> [khloe, kardashian]:
    # LCS 1, P = R = 1/2, F = 1/2.
    assert rouge_l("Khloé Kardashian", "Khloe Kardashian") == 0.5
    # Chinese text has no [a-z0-9] characters: no tokens on either side -> F = 0, although EM says equal.
    assert rouge_l("你好", "你好") == 0.0
    assert exact_match("你好", "你好") is True


def test_rouge_l_empty_sides_score_zero():
    assert rouge_l("", "bottle") == 0.0
    assert rouge_l("bottle", "") == 0.0
    # Both empty: rouge_score returns 0 when either side has no tokens.
    assert rouge_l("", "") == 0.0
    assert rouge_l("!!!", "?") == 0.0


# ------------------------------------------------------------------------------------------ multiple references


def test_metric_max_over_ground_truths_takes_the_best_reference():
    # ref 1 [the, cat, sat]: LCS 1 ("the"), F = 1/3; ref 2 [a, dog, ran]: LCS 2, F = 2/3 -> max 2/3.
    refs = ["the cat sat", "a dog ran"]
    assert metric_max_over_ground_truths(rouge_l, "the dog ran", refs) == pytest.approx(2 / 3, rel=1e-12)
    assert metric_max_over_ground_truths(rouge_l, "the dog ran", refs[::-1]) == pytest.approx(2 / 3, rel=1e-12)
    # EM: "jug" no, "bottle" yes -> True.
    assert metric_max_over_ground_truths(exact_match, "Bottle.", ["jug", "bottle"]) is True
    assert metric_max_over_ground_truths(exact_match, "can", ["jug", "bottle"]) is False


def test_metric_max_over_ground_truths_rejects_no_references():
    with pytest.raises(ValueError, match="no references"):
        metric_max_over_ground_truths(exact_match, "x", [])


# ----------------------------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_micro_average_rounded_to_4_decimals():
    preds = ["the dog ran", "xyz", "sack"]
    refs = [["the cat sat", "a dog ran"], ["jar"], ["sack"]]
    # EM per instance [0, 0, 1]: 100 * 1/3 = 33.333333... -> 33.3333.
    # RL per instance [2/3 (second reference), 0, 1]: 100 * (5/3) / 3 = 55.555555... -> 55.5556 (rounds up).
    assert compute_metrics(preds, refs) == {"exact_match": 33.3333, "rougeL": 55.5556}


def test_compute_metrics_empty_prediction_and_both_empty():
    # Instance 1: "" vs "bottle": EM 0, RL 0. Instance 2: "" vs "": EM 1 (both normalise to ""), RL 0.
    # EM = 100 * 1/2 = 50.0; RL = 0.0.
    assert compute_metrics(["", ""], [["bottle"], [""]]) == {"exact_match": 50.0, "rougeL": 0.0}


def test_compute_metrics_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], [["a"]])


def test_compute_metrics_reference_not_a_list_names_the_index():
    with pytest.raises(DataFormatError, match=r"references\[1\] is str 'b', not a list"):
        compute_metrics(["a", "b"], [["a"], "b"])
    with pytest.raises(ValueError, match=r"references\[0\] is tuple"):
        compute_metrics(["a"], [("a",)])
    with pytest.raises(ValueError, match=r"references\[0\] = \[\] must be a non-empty list"):
        compute_metrics(["a"], [[]])


def test_compute_metrics_rejects_non_string_prediction_and_no_instances():
    with pytest.raises(ValueError, match=r"predictions\[0\] is NoneType"):
        compute_metrics([None], [["a"]])
    with pytest.raises(ValueError, match="no instances"):
        compute_metrics([], [])


def test_compute_grouped_metrics_keys_in_first_appearance_order():
    preds = ["sack", "xyz", "a bag"]
    refs = [["sack"], ["jar"], ["bag"]]
    # t1: EM [1, 0] -> 50.0; RL [1, 2/3] ("a bag" vs "bag": LCS 1, P 1/2, R 1, F 2/3) -> 100 * (5/3)/2 = 83.3333.
    # t2: EM 0, RL 0.
    result = compute_grouped_metrics(preds, refs, ["t1", "t2", "t1"])
    assert list(result.items()) == [
        ("exact_match_for_t1", 50.0),
        ("rougeL_for_t1", 83.3333),
        ("exact_match_for_t2", 0.0),
        ("rougeL_for_t2", 0.0),
    ]
    with pytest.raises(ValueError, match="3 predictions, 3 references and 2 groups"):
        compute_grouped_metrics(preds, refs, ["t1", "t2"])


# ------------------------------------------------------------------------------------------------ score_superni


def _ref(record_id: str, references: list[str], task_id: str, category: str, **extra) -> dict:
    return {"id": record_id, "references": references, "task_id": task_id, "task_category": category, **extra}


def test_category_key_formation():
    assert category_key("Textual Entailment") == "textual_entailment"
    assert category_key("  Cause   Effect\tClassification ") == "cause_effect_classification"
    assert category_key("Question-Answering") == "question-answering"


def test_score_superni_micro_average_with_unequal_task_sizes():
    refs = [
        _ref("a1", ["yes"], "task001_small", "Textual Entailment", track="default"),
        _ref("b1", ["no"], "task002_large", "Textual Entailment", track="default"),
        _ref("b2", ["no"], "task002_large", "Textual Entailment", track="default"),
        _ref("b3", ["no"], "task002_large", "Textual Entailment", track="default"),
    ]
    preds = {"a1": "yes", "b1": "maybe", "b2": "maybe", "b3": "maybe"}
    results = score_superni(preds, refs)
    # Micro over 4 instances: 100 * 1/4 = 25.0 (a macro mean over tasks would give (100 + 0)/2 = 50.0).
    assert list(results.items()) == [
        ("exact_match_default_track", 25.0),
        ("rougeL_default_track", 25.0),
        ("exact_match_for_textual_entailment_default_track", 25.0),
        ("rougeL_for_textual_entailment_default_track", 25.0),
        ("exact_match_for_task001_small_default_track", 100.0),
        ("rougeL_for_task001_small_default_track", 100.0),
        ("exact_match_for_task002_large_default_track", 0.0),
        ("rougeL_for_task002_large_default_track", 0.0),
    ]
    assert results.missing_prediction_ids == ()


def test_score_superni_missing_prediction_is_scored_as_empty_and_reported_apart(caplog):
    refs = [_ref("a", ["sack"], "task1", "Word Analogy"), _ref("b", ["bag"], "task1", "Word Analogy")]
    with caplog.at_level(logging.WARNING, logger="itune.eval.metrics"):
        results = score_superni({"a": "sack", "unused": "x"}, refs)
    # a: EM 1, RL 1; b: "" -> EM 0, RL 0. 100 * 1/2 = 50.0 for both metrics.
    assert dict(results) == {
        "exact_match_default_track": 50.0,
        "rougeL_default_track": 50.0,
        "exact_match_for_word_analogy_default_track": 50.0,
        "rougeL_for_word_analogy_default_track": 50.0,
        "exact_match_for_task1_default_track": 50.0,
        "rougeL_for_task1_default_track": 50.0,
    }
    assert isinstance(results, SuperNIResults) and isinstance(results, dict)
    assert results.missing_prediction_ids == ("b",)
    assert results.num_missing_predictions == 1
    assert "No prediction for 1 instances of the default track" in caplog.text
    # The missing ids never leak into the official keys or the JSON dump.
    assert json.loads(json.dumps(results)) == dict(results)


def test_score_superni_record_without_track_is_default_and_empty_xlingual_is_skipped():
    refs = [{"id": "a", "references": ["jar"]}]
    expected = {"exact_match_default_track": 100.0, "rougeL_default_track": 100.0}
    assert dict(score_superni({"a": "Jar."}, refs)) == expected


def test_score_superni_without_task_fields_has_overall_keys_only():
    refs = [{"id": "a", "references": ["jar"], "track": "default"}, {"id": "b", "references": ["box"]}]
    # a: EM 1, RL 1; b: "crate" vs "box": EM 0, RL 0 -> 50.0 each.
    assert dict(score_superni({"a": "jar", "b": "crate"}, refs)) == {
        "exact_match_default_track": 50.0,
        "rougeL_default_track": 50.0,
    }


def test_score_superni_rejects_malformed_records_naming_the_id():
    with pytest.raises(DataFormatError, match="'a' appears more than once"):
        score_superni({}, [{"id": "a", "references": ["x"]}, {"id": "a", "references": ["y"]}])
    with pytest.raises(DataFormatError, match="'a': track 'english'"):
        score_superni({}, [{"id": "a", "references": ["x"], "track": "english"}])
    with pytest.raises(DataFormatError, match="'a': 'references' = 'x'"):
        score_superni({}, [{"id": "a", "references": "x"}])
    with pytest.raises(DataFormatError, match="prediction for record 'a' is NoneType"):
        score_superni({"a": None}, [{"id": "a", "references": ["x"]}])
    with pytest.raises(DataFormatError, match="'b' has no 'task_category'"):
        score_superni({}, [_ref("a", ["x"], "t1", "C"), {"id": "b", "references": ["y"], "task_id": "t1"}])


def test_xlingual_record_without_tokenizer_path_raises():
    refs = [_ref("d", ["sack"], "task1", "Word Analogy"), _ref("x", ["你好"], "task2", "Misc", track="xlingual")]
    with pytest.raises(ConfigError, match="'x' is on the xlingual track.*pass xlingual_tokenizer=") as info:
        score_superni({"d": "sack", "x": "你好"}, refs)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="GPT-2-style tokenizer"):
        compute_metrics(["你好"], [["你好"]], xlingual=True)


# ------------------------------------------------------------------------------------------- xlingual tokenizer


@pytest.fixture
def tiny_byte_level_tokenizer(tmp_path: Path) -> Path:
    """A GPT-2-style tokenizer directory: byte-level pre-tokenizer, one vocabulary entry per pre-token.

    With a WordLevel model whose vocabulary holds every pre-token of the corpus, the tokens of a corpus text are
    exactly its byte-level pieces, e.g. "Hello world" -> ["Hello", "Ġworld"], "你好 世界" -> ["ä½łå¥½", "Ġä¸ĸçķĮ"].
    A post-processor adds "<s>", which add_special_tokens=False must keep out.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["Hello world", "hello world", "你好 世界", "你好 朋友"]
    vocab = {"[UNK]": 0, "<s>": 1}
    for text in corpus:
        for piece, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory = tmp_path / "tiny-gpt2"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_xlingual_tokenizer_strips_leading_space_marker_and_adds_no_special_tokens(tiny_byte_level_tokenizer):
    tokenizer = XlingualTokenizer(tiny_byte_level_tokenizer)
    assert tokenizer.tokenize("Hello world") == ["Hello", "world"]
    assert tokenizer.tokenize("你好 世界") == ["ä½łå¥½", "ä¸ĸçķĮ"]


def test_rouge_l_xlingual_track(tiny_byte_level_tokenizer):
    path = str(tiny_byte_level_tokenizer)
    # No lowercasing: [Hello, world] vs [hello, world]: LCS 1, P = R = 1/2, F = 1/2 (default track: 1.0).
    assert rouge_l("Hello world", "hello world", xlingual_tokenizer=path) == 0.5
    assert rouge_l("Hello world", "hello world") == 1.0
    # Chinese is kept: [你好, 世界] vs [你好, 朋友] (as byte-level strings): LCS 1, F = 1/2 (default track: 0.0).
    assert rouge_l("你好 世界", "你好 朋友", xlingual_tokenizer=tiny_byte_level_tokenizer) == 0.5
    assert rouge_l("你好 世界", "你好 朋友") == 0.0
    assert rouge_l("", "你好", xlingual_tokenizer=path) == 0.0


def test_score_superni_both_tracks(tiny_byte_level_tokenizer):
    refs = [
        _ref("d1", ["sack"], "task1159_bard", "Word Analogy"),
        _ref("x1", ["你好 朋友"], "task9001_zh", "Dialogue Generation", track="xlingual"),
        _ref("x2", ["Hello world"], "task9001_zh", "Dialogue Generation", track="xlingual"),
    ]
    preds = {"d1": "sack", "x1": "你好 世界", "x2": "Hello world"}
    results = score_superni(preds, refs, xlingual_tokenizer=tiny_byte_level_tokenizer)
    # xlingual: x1 EM 0, RL 1/2; x2 EM 1, RL 1 -> EM 100 * 1/2 = 50.0, RL 100 * 1.5/2 = 75.0.
    assert list(results.items()) == [
        ("exact_match_default_track", 100.0),
        ("rougeL_default_track", 100.0),
        ("exact_match_for_word_analogy_default_track", 100.0),
        ("rougeL_for_word_analogy_default_track", 100.0),
        ("exact_match_for_task1159_bard_default_track", 100.0),
        ("rougeL_for_task1159_bard_default_track", 100.0),
        ("exact_match_xlingual_track", 50.0),
        ("rougeL_xlingual_track", 75.0),
        ("exact_match_for_dialogue_generation_xlingual_track", 50.0),
        ("rougeL_for_dialogue_generation_xlingual_track", 75.0),
        ("exact_match_for_task9001_zh_xlingual_track", 50.0),
        ("rougeL_for_task9001_zh_xlingual_track", 75.0),
    ]


def test_xlingual_tokenizer_is_loaded_lazily_and_missing_file_is_a_clear_error(tmp_path):
    missing_dir = tmp_path / "no-tokenizer"
    tokenizer = XlingualTokenizer(missing_dir)  # nothing is read yet
    # Default-track records never touch the xlingual tokenizer.
    refs = [{"id": "a", "references": ["jar"]}]
    assert score_superni({"a": "jar"}, refs, xlingual_tokenizer=missing_dir)["rougeL_default_track"] == 100.0
    with pytest.raises(ConfigError, match="tokenizer.json does not exist.*GPT-2-style tokenizer directory"):
        tokenizer.tokenize("Hello")


# ------------------------------------------------------------------------------------------------ real SuperNI


def test_score_superni_on_real_task1159_instances():
    if not TASK1159.is_file():
        pytest.skip(f"{TASK1159} not available")
    task = json.loads(TASK1159.read_text(encoding="utf-8"))
    instances = task["Instances"][:7]
    refs = [
        {
            "id": inst["id"],
            "references": inst["output"],
            "task_id": TASK1159.stem,
            "task_category": task["Categories"][0],
            "track": "default",
        }
        for inst in instances
    ]
    assert [r["references"] for r in refs] == [
        ["sack"], ["bag"], ["jar"], ["bottle"], ["jug", "bottle"], ["can", "bottle"], ["box"]
    ]
    predictions = dict(
        zip(
            [inst["id"] for inst in instances[:6]],
            [
                "sack",  # EM 1, RL 1
                "a bag",  # EM 0 (articles kept); [a, bag] vs [bag]: LCS 1, P 1/2, R 1, F 2/3
                "Jar.",  # EM 1, RL 1
                "bottles",  # EM 0; bottles -> bottl, bottle -> bottl: RL 1
                "bottle",  # EM 1 via the second reference; RL max(0 for jug, 1 for bottle) = 1
                "can of soda",  # EM 0; vs "can": LCS 1, P 1/3, R 1, F 1/2; vs "bottle": 0 -> 1/2
            ],
        )
    )
    # Instance 7 ("box") has no prediction: scored as "" -> EM 0, RL 0.
    results = score_superni(predictions, refs)
    # EM = 100 * 3/7 = 42.857142... -> 42.8571.
    # RL = 100 * (1 + 2/3 + 1 + 1 + 1 + 1/2 + 0) / 7 = 100 * (31/6) / 7 = 100 * 31/42 = 73.809523... -> 73.8095.
    expected = {"exact_match": 42.8571, "rougeL": 73.8095}
    assert dict(results) == {
        "exact_match_default_track": expected["exact_match"],
        "rougeL_default_track": expected["rougeL"],
        "exact_match_for_word_analogy_default_track": expected["exact_match"],
        "rougeL_for_word_analogy_default_track": expected["rougeL"],
        f"exact_match_for_{TASK1159.stem}_default_track": expected["exact_match"],
        f"rougeL_for_{TASK1159.stem}_default_track": expected["rougeL"],
    }
    assert results.missing_prediction_ids == (instances[6]["id"],)


# ------------------------------------------------------------------------------------------------------ imports


def test_metrics_and_report_import_no_gpu_stack():
    code = (
        "import sys, itune.eval.metrics, itune.eval.report; "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    repo_root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert out.stdout.strip() == "[]"


def test_chrf_and_bleu_beside_the_official_scores():
    from itune.eval.extra_metrics import extra_metrics

    recs = [{"id": "a", "task_id": "t1", "references": ["the cat sat on the mat"]},
            {"id": "b", "task_id": "t1", "references": ["hello world", "hi world"]},
            {"id": "c", "task_id": "t2", "references": ["Das ist gut ."]}]
    # sacrebleu 2.6.0 corpus chrF2 / BLEU-4 (13a), multiple references padded with the first one
    assert extra_metrics({"a": "the cat sat on a mat", "b": "hi world", "c": "Das ist gut ."}, recs) == {
        "chrF": 80.8424, "BLEU": 69.8211, "chrF_for_t1": 73.3313, "BLEU_for_t1": 55.8395, "chrF_for_t2": 100.0,
        "BLEU_for_t2": 100.0}
    got = extra_metrics({"a": "the cat sat on a mat"}, recs)  # missing predictions count as empty strings
    assert (got["chrF_for_t2"], got["BLEU_for_t2"], got["BLEU"]) == (0.0, 0.0, 19.7656)
