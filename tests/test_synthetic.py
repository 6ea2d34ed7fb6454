"""Tests for the embedded synthetic SuperNI-format task suite (``itune.data.synthetic``)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from itune.data import synthetic
from itune.data.synthetic import TASK_KEYS, TASKS, VOCABULARY, build_task, task_names, write_task_suite

ID_RE = re.compile(r"^task[0-9]{3,4}_[a-z0-9_]+-[0-9a-f]{32}$")
NAME_RE = re.compile(r"^task[0-9]{3,4}_[a-z0-9_]+$")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The suite written once with the default arguments."""
    out = tmp_path_factory.mktemp("suite")
    return out, write_task_suite(out, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, name: str) -> dict:
    return json.loads((root / "tasks" / f"{name}.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry_counts_and_names() -> None:
    assert len(TASKS) == 36
    assert len(task_names("train")) == 28
    assert len(task_names("test")) == 8
    assert task_names() == list(TASKS) == sorted(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name
        assert NAME_RE.match(name), name
        assert spec.split in ("train", "test")
    with pytest.raises(ValueError):
        task_names("validation")


def test_categories() -> None:
    train_categories = {TASKS[n].category for n in task_names("train")}
    test_categories = {TASKS[n].category for n in task_names("test")}
    assert train_categories == {
        "Word Reordering",
        "Case Conversion",
        "Copying",
        "Selection",
        "Deletion",
        "Counting",
        "Classification",
        "Arithmetic",
    }
    assert test_categories <= train_categories
    assert len(test_categories) == 8


def test_definitions_are_superni_style_and_short() -> None:
    for spec in TASKS.values():
        assert spec.definition.startswith("In this task, you are given "), spec.name
        assert "Your task is to " in spec.definition, spec.name
        assert spec.definition.endswith("."), spec.name
        assert len(spec.definition.split()) <= 45, spec.name
    assert len({spec.definition for spec in TASKS.values()}) == len(TASKS)


def test_generator_returns_input_and_solved_outputs() -> None:
    for spec in TASKS.values():
        rng = random.Random(f"probe:{spec.name}")
        text, outputs = spec.generator(rng)
        assert isinstance(text, str) and text
        assert outputs == spec.solve(text)
        assert isinstance(outputs, list) and outputs and all(isinstance(o, str) and o for o in outputs)


# ----------------------------------------------------------------------------------------------------------------
# Golden checks of the transformations
# ----------------------------------------------------------------------------------------------------------------

GOLDEN = [
    ("task9001_reverse_words", "the dog sees my red ball", ["ball red my sees dog the"]),
    ("task9002_sort_words", "river lazy warm bird", ["bird lazy river warm"]),
    ("task9003_swap_first_and_last_word", "her kite falls today", ["today kite falls her"]),
    ("task9004_uppercase_words", "our river swims", ["OUR RIVER SWIMS"]),
    ("task9005_title_case_words", "this kite buys the lazy boy", ["This Kite Buys The Lazy Boy"]),
    ("task9006_lowercase_words", "YOUR Small HAT rests", ["your small hat rests"]),
    ("task9007_uppercase_last_word", "the singer smiles", ["the singer SMILES"]),
    ("task9008_copy_sentence", "our map sleeps", ["our map sleeps"]),
    ("task9009_repeat_sentence_twice", "that cow falls", ["that cow falls that cow falls"]),
    ("task9010_join_words_with_hyphens", "my friend sleeps", ["my-friend-sleeps"]),
    ("task9011_first_word", "my clean horse waits again", ["my"]),
    ("task9012_last_word", "our car sees the doctor", ["doctor"]),
    ("task9013_first_two_words", "that ship waits there", ["that ship"]),
    ("task9014_longest_word", "hill singer book map", ["singer"]),
    ("task9015_longer_of_two_words", "here songs", ["songs"]),
    ("task9016_alphabetically_first_word", "cold calm book little", ["book"]),
    ("task9017_drop_first_word", "your clean pen rests slowly", ["clean pen rests slowly"]),
    ("task9018_remove_duplicate_words", "cat boy shoe flower shoe cat old", ["cat boy shoe flower old"]),
    ("task9019_remove_color_words", "this red tree keeps your brown kite", ["this tree keeps your kite"]),
    ("task9020_count_words", "your soft cup likes that good book", ["7"]),
    ("task9021_count_vowels", "apples", ["2"]),
    ("task9022_count_color_words", "the brown farm moves her blue singer", ["2"]),
    ("task9023_contains_color_word", "that brown apple waits", ["yes"]),
    ("task9023_contains_color_word", "our sad kite likes your map", ["no"]),
    ("task9024_is_alphabetically_sorted", "bird egg kite lazy", ["yes"]),
    ("task9024_is_alphabetically_sorted", "cow bed loud", ["no"]),
    ("task9025_has_repeated_word", "good cake good lake", ["yes"]),
    ("task9025_has_repeated_word", "chair farm busy pen", ["no"]),
    ("task9026_add_two_numbers", "16, 18", ["34"]),
    ("task9027_subtract_two_numbers", "20, 11", ["9"]),
    ("task9028_largest_number", "32, 20, 49, 8, 21", ["49"]),
    ("task9029_last_two_words", "that flower rests early", ["rests early"]),
    ("task9030_uppercase_first_word", "our coat opens our doctor", ["OUR coat opens our doctor"]),
    ("task9031_drop_last_word", "our ball laughs outside", ["our ball laughs"]),
    ("task9032_join_words_with_underscores", "this lake smiles", ["this_lake_smiles"]),
    ("task9033_sort_words_reverse_alphabetical", "bird road happy ball", ["road happy bird ball"]),
    ("task9034_count_letters", "teachers", ["8"]),
    ("task9035_contains_number_word", "the book paints ten kings", ["yes"]),
    ("task9035_contains_number_word", "my shoe likes few shoes", ["no"]),
    ("task9036_add_three_numbers", "10, 9, 6", ["25"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), GOLDEN, ids=[f"{n}:{t}" for n, t, _ in GOLDEN])
def test_golden_transformation(name: str, text: str, expected: list[str]) -> None:
    assert TASKS[name].solve(text) == expected


def test_golden_covers_every_task() -> None:
    assert {name for name, _, _ in GOLDEN} == set(TASKS)


def test_golden_positive_examples_seed0(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    task = _load(root, "task9024_is_alphabetically_sorted")
    assert [(e["input"], e["output"]) for e in task["Positive Examples"]] == [
        ("bird egg kite lazy long road", "yes"),
        ("cow bed loud coat egg book", "no"),
    ]
    task = _load(root, "task9021_count_vowels")
    assert task["Positive Examples"][0] == {
        "input": "girls",
        "output": "1",
        "explanation": "The word 'girls' contains 1 vowel.",
    }


# ----------------------------------------------------------------------------------------------------------------
# Written files
# ----------------------------------------------------------------------------------------------------------------


def test_summary(suite: tuple[Path, dict]) -> None:
    root, summary = suite
    assert summary == {
        "out_dir": str(root),
        "seed": 0,
        "num_tasks": 36,
        "num_instances": 36 * 60,
        "splits": {
            "train": {"num_tasks": 28, "num_instances": 28 * 60},
            "test": {"num_tasks": 8, "num_instances": 8 * 60},
        },
    }


def test_determinism_byte_identical(tmp_path: Path, suite: tuple[Path, dict]) -> None:
    root, _ = suite
    again = tmp_path / "again"
    write_task_suite(again, seed=0)
    first, second = _files(root), _files(again)
    assert len(first) == 36 + 2
    assert first == second


def test_rewrite_in_place_is_identical(tmp_path: Path) -> None:
    write_task_suite(tmp_path, seed=3, instances_per_task=5)
    before = _files(tmp_path)
    write_task_suite(tmp_path, seed=3, instances_per_task=5)
    assert _files(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_different_seed_differs(tmp_path: Path, suite: tuple[Path, dict]) -> None:
    root, _ = suite
    write_task_suite(tmp_path, seed=1)
    first, other = _files(root), _files(tmp_path)
    assert first.keys() == other.keys()
    for name in TASKS:
        key = str(Path("tasks") / f"{name}.json")
        assert first[key] != other[key], name
    assert first[str(Path("splits") / "train_tasks.txt")] == other[str(Path("splits") / "train_tasks.txt")]


def test_per_task_seeding_matches_build_task(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    for name, spec in TASKS.items():
        assert _load(root, name) == build_task(spec, seed=0)


def test_file_layout_matches_upstream_serialisation(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    for name in TASKS:
        raw = (root / "tasks" / f"{name}.json").read_text(encoding="utf-8")
        assert raw == json.dumps(json.loads(raw), indent=4, ensure_ascii=False) + "\n"


def test_schema_and_key_order(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    assert TASK_KEYS == (
        "Contributors",
        "Source",
        "URL",
        "Categories",
        "Reasoning",
        "Definition",
        "Input_language",
        "Output_language",
        "Instruction_language",
        "Domains",
        "Positive Examples",
        "Negative Examples",
        "Instances",
        "Instance License",
    )
    for name, spec in TASKS.items():
        task = _load(root, name)
        assert tuple(task) == TASK_KEYS, name
        assert task["Source"] == ["itune-synthetic"]
        assert task["Instance License"] == ["Apache 2.0"]
        assert task["Definition"] == [spec.definition]
        assert task["Categories"] == [spec.category]
        for key in ("Input_language", "Output_language", "Instruction_language"):
            assert task[key] == ["English"]
        for key in ("Contributors", "URL", "Reasoning", "Domains"):
            assert isinstance(task[key], list)
        assert isinstance(task["Negative Examples"], list)
        assert len(task["Positive Examples"]) == 2
        for ex in task["Positive Examples"]:
            assert list(ex) == ["input", "output", "explanation"]
            assert all(isinstance(v, str) and v for v in ex.values())
            assert spec.solve(ex["input"])[0] == ex["output"]
        assert len(task["Instances"]) == 60
        for inst in task["Instances"]:
            assert list(inst) == ["id", "input", "output"]
            assert isinstance(inst["input"], str)
            assert isinstance(inst["output"], list) and inst["output"]
            assert all(isinstance(o, str) and o.strip() for o in inst["output"])
            assert inst["output"] == spec.solve(inst["input"])


def test_instance_ids(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    all_ids: list[str] = []
    for name in TASKS:
        for inst in _load(root, name)["Instances"]:
            assert ID_RE.match(inst["id"]), inst["id"]
            assert inst["id"].startswith(f"{name}-")
            all_ids.append(inst["id"])
    assert len(set(all_ids)) == len(all_ids)
    assert synthetic.instance_id("task9001_reverse_words", 0, 0) == (
        "task9001_reverse_words-" + hashlib.md5(b"0:task9001_reverse_words:0").hexdigest()
    )


def test_instances_unique_and_disjoint_from_positive_examples(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    for name in TASKS:
        task = _load(root, name)
        inputs = [inst["input"] for inst in task["Instances"]]
        assert len(set(inputs)) == len(inputs), name
        positives = [ex["input"] for ex in task["Positive Examples"]]
        assert len(set(positives)) == len(positives), name
        assert not set(positives) & set(inputs), name


def test_split_files(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    train = (root / "splits" / "train_tasks.txt").read_text(encoding="utf-8")
    test = (root / "splits" / "test_tasks.txt").read_text(encoding="utf-8")
    assert train.endswith("\n") and test.endswith("\n")
    train_names, test_names = train.splitlines(), test.splitlines()
    assert train_names == task_names("train")
    assert test_names == task_names("test")
    assert not set(train_names) & set(test_names)
    written = sorted(p.stem for p in (root / "tasks").glob("*.json"))
    assert sorted(train_names + test_names) == written == sorted(TASKS)
    for name in train_names:
        assert TASKS[name].split == "train"
    for name in test_names:
        assert TASKS[name].split == "test"


def test_test_task_categories_appear_in_train_files(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    split = lambda s: (root / "splits" / f"{s}_tasks.txt").read_text(encoding="utf-8").split()  # noqa: E731
    train_cats = {_load(root, n)["Categories"][0] for n in split("train")}
    for name in split("test"):
        assert _load(root, name)["Categories"][0] in train_cats, name


def test_instances_per_task_and_positive_examples_respected(tmp_path: Path) -> None:
    summary = write_task_suite(tmp_path, seed=5, instances_per_task=7, num_positive_examples=1)
    assert summary["num_instances"] == 36 * 7
    assert summary["splits"]["train"] == {"num_tasks": 28, "num_instances": 28 * 7}
    assert summary["splits"]["test"] == {"num_tasks": 8, "num_instances": 8 * 7}
    for name in TASKS:
        task = _load(tmp_path, name)
        assert len(task["Instances"]) == 7
        assert len(task["Positive Examples"]) == 1


def test_zero_positive_examples() -> None:
    task = build_task(TASKS["task9001_reverse_words"], seed=0, instances_per_task=3, num_positive_examples=0)
    assert task["Positive Examples"] == []
    assert len(task["Instances"]) == 3


def test_bad_counts_raise() -> None:
    spec = TASKS["task9001_reverse_words"]
    with pytest.raises(ValueError):
        build_task(spec, instances_per_task=-1)
    with pytest.raises(ValueError):
        build_task(spec, num_positive_examples=-1)
    # A single-word task cannot have more distinct inputs than the vocabulary has words.
    with pytest.raises(ValueError, match="distinct inputs"):
        build_task(TASKS["task9021_count_vowels"], instances_per_task=1000)


def test_instance_prefix_independent_of_count() -> None:
    spec = TASKS["task9012_last_word"]
    small = build_task(spec, seed=2, instances_per_task=10)
    large = build_task(spec, seed=2, instances_per_task=40)
    assert large["Instances"][:10] == small["Instances"]
    assert large["Positive Examples"] == small["Positive Examples"]


# ----------------------------------------------------------------------------------------------------------------
# Content properties
# ----------------------------------------------------------------------------------------------------------------


def test_lengths_vocabulary_and_prompt_size(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    for name in TASKS:
        task = _load(root, name)
        pairs = [(e["input"], [e["output"]]) for e in task["Positive Examples"]]
        pairs += [(i["input"], i["output"]) for i in task["Instances"]]
        for text, outputs in pairs:
            assert 1 <= len(text.split()) <= 8, (name, text)
            for out in outputs:
                assert 1 <= len(out.split()) <= 8, (name, out)
            for token in re.findall(r"[A-Za-z]+", " ".join([text, *outputs])):
                assert token.lower() in VOCABULARY, (name, token)
        # Tk-Instruct style prompt: definition + 2 positive examples + the longest instance input.
        words = len(task["Definition"][0].split()) + 20
        words += sum(len(e["input"].split()) + len(e["output"].split()) for e in task["Positive Examples"])
        words += max(len(i["input"].split()) for i in task["Instances"])
        assert words < 150, name


def test_vocabulary_is_small() -> None:
    base = VOCABULARY - set(synthetic.PLURAL_NOUNS)
    assert 130 <= len(base) <= 170
    assert all(w.isalpha() and w.islower() for w in VOCABULARY)
    assert not set(synthetic.COLORS) & set(synthetic.ADJECTIVES)


def test_yes_no_tasks_are_balanced(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    for name in ("task9023_contains_color_word", "task9024_is_alphabetically_sorted",
                 "task9025_has_repeated_word", "task9035_contains_number_word"):  # fmt: skip
        task = _load(root, name)
        labels = [i["output"][0] for i in task["Instances"]]
        assert set(labels) == {"yes", "no"}
        assert 0.3 <= labels.count("yes") / len(labels) <= 0.7, name
        assert {e["output"] for e in task["Positive Examples"]} == {"yes", "no"}, name


def test_held_out_tasks_differ_from_every_training_task(suite: tuple[Path, dict]) -> None:
    root, _ = suite
    train_specs = [TASKS[n] for n in task_names("train")]
    for name in task_names("test"):
        instances = _load(root, name)["Instances"]
        for spec in train_specs:
            agree = 0
            for inst in instances:
                try:
                    agree += spec.solve(inst["input"]) == inst["output"]
                except (ValueError, IndexError):
                    pass
            assert agree < len(instances), (name, spec.name)


def test_held_out_tasks_have_a_close_training_task() -> None:
    close = {
        "task9029_last_two_words": ("task9012_last_word", "task9013_first_two_words"),
        "task9030_uppercase_first_word": ("task9004_uppercase_words", "task9007_uppercase_last_word"),
        "task9031_drop_last_word": ("task9017_drop_first_word",),
        "task9032_join_words_with_underscores": ("task9010_join_words_with_hyphens",),
        "task9033_sort_words_reverse_alphabetical": ("task9002_sort_words", "task9001_reverse_words"),
        "task9034_count_letters": ("task9021_count_vowels",),
        "task9035_contains_number_word": ("task9023_contains_color_word",),
        "task9036_add_three_numbers": ("task9026_add_two_numbers",),
    }
    assert set(close) == set(task_names("test"))
    for test_name, train_names in close.items():
        assert all(TASKS[n].split == "train" for n in train_names)
        assert TASKS[test_name].category in {TASKS[n].category for n in train_names}, test_name


# ----------------------------------------------------------------------------------------------------------------
# Integration
# ----------------------------------------------------------------------------------------------------------------


def test_module_imports_no_torch_or_numpy() -> None:
    code = (
        "import sys, itune.data.synthetic as s; "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "assert not bad, bad; print(len(s.TASKS))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "36"


def test_cli_writes_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic.main([str(tmp_path / "cli"), "--seed", "4", "--instances-per-task", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_instances"] == 36 * 3
    write_task_suite(tmp_path / "ref", seed=4, instances_per_task=3)
    assert _files(tmp_path / "cli") == _files(tmp_path / "ref")


def test_project_superni_loader_reads_suite(suite: tuple[Path, dict]) -> None:
    sources = pytest.importorskip("itune.data.sources")
    root, _ = suite
    names = sources.read_split_file(root / "splits" / "test_tasks.txt")
    assert names == task_names("test")
    path = sources.superni_task_path(root / "tasks", names[0])
    rows = list(sources.read_superni_task(path, num_pos_examples=2))
    assert len(rows) == 60
    example, reason, _ = rows[0]
    assert reason is None
    assert example.task == names[0]
    assert example.category == TASKS[names[0]].category
    assert ID_RE.match(example.id)
