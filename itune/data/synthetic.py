"""Embedded default instruction task suite in the Super-NaturalInstructions on-disk format.

The suite lets the project's demo run offline with no data given: :func:`write_task_suite` writes a few dozen
small programmatic instruction tasks (reverse the words, uppercase the last word, count the vowels, add two
numbers, ...) as ``tasks/<name>.json`` files in the upstream SuperNI schema, plus the split files
``splits/train_tasks.txt`` and ``splits/test_tasks.txt``. The result can be read by the regular SuperNI loader
(:func:`itune.data.sources.read_superni_task`) exactly like the real data.

Design points:

* Every task is a :class:`TaskSpec`: an input sampler (``make_input``) and a pure transformation (``solve``) that
  maps an input string to its reference outputs. ``spec.generator(rng)`` returns ``(input, outputs)``.
* The held-out (``"test"``) tasks are different tasks from every training task, but of kinds close to training
  ones (train has "last word" and "first two words", test has "last two words"), and every test category also
  appears among the training categories, so a small model trained on the train tasks can partially generalise.
* Inputs are 1-8 words drawn from a small embedded vocabulary (:data:`VOCABULARY`, about 150 common lowercase
  English words plus plural nouns, digits and numbers), outputs are 1-8 words, so a prompt with the definition,
  two positive examples and the input stays well under 150 words, and a SentencePiece tokenizer of about 1000
  pieces can be trained on the suite.
* Output files are deterministic: each task draws from its own ``random.Random(f"{seed}:{name}")``, so the same
  seed gives byte-identical files and adding a task never changes the others. Files are written atomically.

Only the standard library is used (no torch, no numpy).

Example::

    from itune.data.synthetic import TASKS, write_task_suite

    summary = write_task_suite("runs/synthetic_superni", seed=0)
    TASKS["task9001_reverse_words"].solve("the dog sees my cat")  # ["cat my sees dog the"]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from itune.fileio import atomic_write_text

__all__ = [
    "ADJECTIVES",
    "ADVERBS",
    "ANSWER_WORDS",
    "COLORS",
    "DETERMINERS",
    "INTRANSITIVE_VERBS",
    "NOUNS",
    "NUMBER_WORDS",
    "PLURAL_NOUNS",
    "QUANTIFIERS",
    "SOURCE",
    "SPLITS",
    "TASKS",
    "TASK_KEYS",
    "TRANSITIVE_VERBS",
    "VOCABULARY",
    "TaskSpec",
    "build_task",
    "instance_id",
    "main",
    "task_names",
    "write_task_suite",
]

# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

#: Determiners that start a noun phrase ("a"/"an" are left out so that removing an adjective never breaks
#: the article agreement).
DETERMINERS: tuple[str, ...] = ("the", "my", "your", "his", "her", "our", "this", "that")

#: Adjectives that are not colors.
ADJECTIVES: tuple[str, ...] = (
    "big", "small", "old", "new", "good", "happy", "sad", "little", "tall", "short", "hot", "cold", "warm",
    "soft", "loud", "quiet", "young", "long", "clean", "kind", "funny", "busy", "heavy", "bright", "dark",
    "sweet", "lazy", "brave", "calm",
)  # fmt: skip

#: Color words (the color tasks look for exactly these).
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")

#: Countable nouns whose plural is the noun plus "s".
NOUNS: tuple[str, ...] = (
    "dog", "cat", "bird", "horse", "cow", "frog", "duck", "tree", "flower", "book", "car", "boat", "ship",
    "house", "door", "window", "table", "chair", "cup", "apple", "cake", "egg", "ball", "hat", "coat", "shoe",
    "bed", "lamp", "river", "lake", "hill", "road", "garden", "farm", "friend", "teacher", "doctor", "farmer",
    "girl", "boy", "king", "queen", "student", "singer", "pen", "map", "song", "game", "bell", "kite", "drum",
)  # fmt: skip

#: Plural forms of :data:`NOUNS` (used after a number word or a quantifier).
PLURAL_NOUNS: tuple[str, ...] = tuple(noun + "s" for noun in NOUNS)

#: Transitive verbs in the third person singular.
TRANSITIVE_VERBS: tuple[str, ...] = (
    "sees", "likes", "finds", "takes", "wants", "makes", "holds", "moves", "opens", "paints", "cleans", "needs",
    "buys", "sells", "reads", "draws", "helps", "loves", "keeps", "brings", "visits", "follows",
)  # fmt: skip

#: Intransitive verbs in the third person singular.
INTRANSITIVE_VERBS: tuple[str, ...] = (
    "runs", "sleeps", "sings", "walks", "jumps", "swims", "waits", "laughs", "smiles", "dances", "falls", "rests",
)  # fmt: skip

#: Adverbs that may end a sentence.
ADVERBS: tuple[str, ...] = ("today", "now", "again", "here", "there", "slowly", "quickly", "often", "outside", "early")

#: Number words from one to ten.
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: Quantity words that are not numbers (the negative cases of the number-word task use them).
QUANTIFIERS: tuple[str, ...] = ("some", "many", "few")

#: Answers of the yes/no (classification) tasks.
ANSWER_WORDS: tuple[str, ...] = ("yes", "no")

#: Content words used for word lists (sorting, longest word, duplicates, ...).
_LIST_WORDS: tuple[str, ...] = NOUNS + ADJECTIVES

#: Words used by the single-word tasks (vowel and letter counting): every content word of the vocabulary.
_SINGLE_WORDS: tuple[str, ...] = (
    NOUNS + PLURAL_NOUNS + ADJECTIVES + COLORS + TRANSITIVE_VERBS + INTRANSITIVE_VERBS + ADVERBS
)

#: Every lowercase word that can appear in an input or an output (outputs may be upper- or title-cased).
VOCABULARY: frozenset[str] = frozenset(
    DETERMINERS
    + ADJECTIVES
    + COLORS
    + NOUNS
    + PLURAL_NOUNS
    + TRANSITIVE_VERBS
    + INTRANSITIVE_VERBS
    + ADVERBS
    + NUMBER_WORDS
    + QUANTIFIERS
    + ANSWER_WORDS
)

_VOWELS = frozenset("aeiou")

# --------------------------------------------------------------------------------------------------------------
# Task file schema
# --------------------------------------------------------------------------------------------------------------

#: Keys of an upstream SuperNI task file, in upstream order.
TASK_KEYS: tuple[str, ...] = (
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

#: Value of the ``Source`` field of every generated task.
SOURCE = "itune-synthetic"

#: Split names, in the order the split files are written.
SPLITS: tuple[str, ...] = ("train", "test")

#: Extra draws allowed per task to give the positive examples different outputs.
_POSITIVE_RETRIES = 50

_NAME_RE = re.compile(r"^task[0-9]{3,4}_[a-z0-9_]+$")


@dataclass(frozen=True)
class TaskSpec:
    """One programmatic instruction task.

    Attributes:
        name: SuperNI-style task name, e.g. ``"task9001_reverse_words"``.
        category: task category (the ``Categories`` field), e.g. ``"Word Reordering"``.
        split: ``"train"`` or ``"test"`` (held out).
        definition: natural-language task definition (the ``Definition`` field).
        make_input: samples one input string from a ``random.Random``.
        solve: maps an input string to its reference outputs (a non-empty list; the first one is the target).
        explain: ``(input, output) -> explanation`` of a positive example.
    """

    name: str
    category: str
    split: str
    definition: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], list[str]]
    explain: Callable[[str, str], str]

    def generator(self, rng: random.Random) -> tuple[str, list[str]]:
        """Samples one instance.

        Args:
            rng: source of randomness.

        Returns:
            ``(input, outputs)``, with ``outputs == self.solve(input)``.
        """
        text = self.make_input(rng)
        return text, self.solve(text)


# --------------------------------------------------------------------------------------------------------------
# Input samplers
# --------------------------------------------------------------------------------------------------------------


def _noun_phrase(rng: random.Random, adjective: str | None) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if adjective is not None:
        words.append(adjective)
    words.append(rng.choice(NOUNS))
    return words


def _sentence_words(rng: random.Random, n_colors: int = 0, quantity: str | None = None) -> list[str]:
    """Samples a simple sentence of 3-8 words, e.g. ``the old dog sees my red ball today``.

    Args:
        rng: source of randomness.
        n_colors: exactly this many color adjectives (0-2); other adjectives are never colors.
        quantity: when given, the sentence is transitive and its object is ``quantity [adjective] noun(s)``
            (singular after "one", plural otherwise).

    Returns:
        The words of the sentence.
    """
    if not 0 <= n_colors <= 2:
        raise ValueError(f"n_colors must be 0, 1 or 2, got {n_colors}")
    transitive = n_colors == 2 or quantity is not None or rng.random() < 0.6
    n_slots = 2 if transitive else 1
    color_slots = rng.sample(range(n_slots), n_colors)
    adjectives: list[str | None] = []
    for slot in range(n_slots):
        if slot in color_slots:
            adjectives.append(rng.choice(COLORS))
        elif rng.random() < 0.35:
            adjectives.append(rng.choice(ADJECTIVES))
        else:
            adjectives.append(None)
    words = _noun_phrase(rng, adjectives[0])
    if transitive:
        words.append(rng.choice(TRANSITIVE_VERBS))
        if quantity is not None:
            words.append(quantity)
            if adjectives[1] is not None:
                words.append(adjectives[1])
            words.append(rng.choice(NOUNS if quantity == "one" else PLURAL_NOUNS))
        else:
            words += _noun_phrase(rng, adjectives[1])
    else:
        words.append(rng.choice(INTRANSITIVE_VERBS))
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    return words


def _sentence(max_words: int = 8) -> Callable[[random.Random], str]:
    """Returns a sampler of plain sentences (no colors, no numbers) of at most ``max_words`` words."""

    def make(rng: random.Random) -> str:
        while True:
            words = _sentence_words(rng)
            if len(words) <= max_words:
                return " ".join(words)

    return make


def _sentence_distinct_ends(rng: random.Random) -> str:
    while True:
        words = _sentence_words(rng)
        if words[0] != words[-1]:
            return " ".join(words)


def _mixed_case_sentence(rng: random.Random) -> str:
    words = _sentence_words(rng)
    styles = [rng.choice(("lower", "upper", "title")) for _ in words]
    if all(s == "lower" for s in styles):
        styles[rng.randrange(len(styles))] = rng.choice(("upper", "title"))
    out = []
    for word, style in zip(words, styles):
        out.append(word.upper() if style == "upper" else word.capitalize() if style == "title" else word)
    return " ".join(out)


def _sentence_with_colors(min_colors: int, max_colors: int) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        return " ".join(_sentence_words(rng, n_colors=rng.randint(min_colors, max_colors)))

    return make


def _color_yes_no(rng: random.Random) -> str:
    return " ".join(_sentence_words(rng, n_colors=1 if rng.random() < 0.5 else 0))


def _number_yes_no(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(_sentence_words(rng, quantity=rng.choice(NUMBER_WORDS)))
    if rng.random() < 0.5:
        return " ".join(_sentence_words(rng, quantity=rng.choice(QUANTIFIERS)))
    return " ".join(_sentence_words(rng))


def _word_list(min_n: int, max_n: int) -> Callable[[random.Random], str]:
    """Returns a sampler of ``min_n``-``max_n`` distinct content words."""

    def make(rng: random.Random) -> str:
        return " ".join(rng.sample(_LIST_WORDS, rng.randint(min_n, max_n)))

    return make


def _single_word(rng: random.Random) -> str:
    return rng.choice(_SINGLE_WORDS)


def _two_words_different_lengths(rng: random.Random) -> str:
    while True:
        a, b = rng.sample(_SINGLE_WORDS, 2)
        if len(a) != len(b):
            return f"{a} {b}"


def _list_with_unique_longest(rng: random.Random) -> str:
    while True:
        words = rng.sample(_LIST_WORDS, rng.randint(3, 6))
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] != lengths[1]:
            return " ".join(words)


def _sorted_yes_no(rng: random.Random) -> str:
    words = rng.sample(_LIST_WORDS, rng.randint(3, 6))
    if rng.random() < 0.5:
        return " ".join(sorted(words))
    while words == sorted(words):
        rng.shuffle(words)
    return " ".join(words)


def _with_repeats(rng: random.Random, n_repeats: int) -> list[str]:
    words = rng.sample(_LIST_WORDS, rng.randint(3, 5))
    for _ in range(n_repeats):
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    return words


def _list_with_duplicates(rng: random.Random) -> str:
    return " ".join(_with_repeats(rng, rng.randint(1, 2)))


def _repeat_yes_no(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(_with_repeats(rng, 1))
    return " ".join(rng.sample(_LIST_WORDS, rng.randint(4, 6)))


def _numbers(
    count: int, low: int, high: int, ordered: bool = False, distinct: bool = False
) -> Callable[[random.Random], str]:
    """Returns a sampler of ``count`` comma-separated integers in ``[low, high]``.

    Args:
        count: how many numbers.
        low: smallest value.
        high: largest value.
        ordered: sort in non-increasing order (so that subtraction stays non-negative).
        distinct: draw without replacement.
    """

    def make(rng: random.Random) -> str:
        if distinct:
            values = rng.sample(range(low, high + 1), count)
        else:
            values = [rng.randint(low, high) for _ in range(count)]
        if ordered:
            values.sort(reverse=True)
        return ", ".join(str(v) for v in values)

    return make


def _number_list(rng: random.Random) -> str:
    return _numbers(rng.randint(3, 5), 0, 50, distinct=True)(rng)


# --------------------------------------------------------------------------------------------------------------
# Transformations (pure functions of the input string)
# --------------------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.replace(",", " ").split()]


def _yes_no(flag: bool) -> list[str]:
    return ["yes" if flag else "no"]


def _first_occurrences(words: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _longest(words: Sequence[str]) -> str:
    """The longest word; the first one on a tie."""
    best = words[0]
    for w in words[1:]:
        if len(w) > len(best):
            best = w
    return best


def _swap_ends(words: list[str]) -> list[str]:
    if len(words) < 2:
        return list(words)
    return [words[-1]] + words[1:-1] + [words[0]]


def _upper_at(words: list[str], index: int) -> list[str]:
    out = list(words)
    out[index] = out[index].upper()
    return out


def _text(fn: Callable[[list[str]], Sequence[str] | str]) -> Callable[[str], list[str]]:
    """Lifts a word-list function into a ``solve`` that returns one space-joined output."""

    def solve(text: str) -> list[str]:
        result = fn(_words(text))
        return [result if isinstance(result, str) else " ".join(result)]

    return solve


def _count_vowels(word: str) -> int:
    return sum(ch in _VOWELS for ch in word.lower())


def _q(s: str) -> str:
    return f"'{s}'"


def _explain(template: str) -> Callable[[str, str], str]:
    """Returns an explainer that fills ``{input}`` and ``{output}`` into ``template``."""

    def explain(text: str, output: str) -> str:
        return template.format(input=text, output=output)

    return explain


def _explain_count(template: str, noun: str) -> Callable[[str, str], str]:
    """Returns an explainer that fills ``{input}``, ``{n}`` (the output) and ``{noun}`` (plural unless 1)."""

    def explain(text: str, output: str) -> str:
        return template.format(input=text, n=output, noun=noun if output == "1" else noun + "s")

    return explain


def _explain_contains(kind: str, vocabulary: Sequence[str]) -> Callable[[str, str], str]:
    """Returns an explainer of a yes/no answer about whether a word of ``vocabulary`` occurs."""

    def explain(text: str, output: str) -> str:
        found = [w for w in _words(text) if w in vocabulary]
        if found:
            return f"The word {_q(found[0])} is a {kind}, so the answer is {_q(output)}."
        return f"None of the words is a {kind}, so the answer is {_q(output)}."

    return explain


def _explain_sorted(text: str, output: str) -> str:
    if output == "yes":
        return "Each word comes after the previous one in alphabetical order, so the answer is 'yes'."
    words = _words(text)
    for a, b in zip(words, words[1:]):
        if a > b:
            return f"The word {_q(b)} should come before {_q(a)}, so the answer is 'no'."
    return "The words are not in alphabetical order, so the answer is 'no'."


def _explain_repeat(text: str, output: str) -> str:
    words = _words(text)
    for w in words:
        if words.count(w) > 1:
            return f"The word {_q(w)} appears more than once, so the answer is 'yes'."
    return "Every word appears only once, so the answer is 'no'."


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------

_GIVEN_SENTENCE = "In this task, you are given a sentence. "
_GIVEN_LIST = "In this task, you are given a list of words separated by spaces. "

_SPECS: tuple[TaskSpec, ...] = (
    # ----- train: Word Reordering
    TaskSpec(
        name="task9001_reverse_words",
        category="Word Reordering",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to reverse the order of the words in the sentence. Keep every "
        "word unchanged and separate the words with single spaces.",
        make_input=_sentence(),
        solve=_text(lambda w: w[::-1]),
        explain=_explain("Reading the words from the last one to the first one gives '{output}'."),
    ),
    TaskSpec(
        name="task9002_sort_words",
        category="Word Reordering",
        split="train",
        definition=_GIVEN_LIST + "Your task is to sort the words in alphabetical order and return the sorted "
        "list, with the words separated by single spaces.",
        make_input=_word_list(3, 6),
        solve=_text(sorted),
        explain=_explain("In alphabetical order the words are '{output}'."),
    ),
    TaskSpec(
        name="task9003_swap_first_and_last_word",
        category="Word Reordering",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to swap the first word and the last word of the sentence. "
        "All the other words must stay in their places.",
        make_input=_sentence_distinct_ends,
        solve=_text(_swap_ends),
        explain=_explain("The first word and the last word trade places, which gives '{output}'."),
    ),
    # ----- train: Case Conversion
    TaskSpec(
        name="task9004_uppercase_words",
        category="Case Conversion",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to convert every word of the sentence to uppercase letters. "
        "Do not change the order of the words.",
        make_input=_sentence(),
        solve=lambda text: [text.upper()],
        explain=_explain("Writing every letter as a capital letter gives '{output}'."),
    ),
    TaskSpec(
        name="task9005_title_case_words",
        category="Case Conversion",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to capitalize the first letter of every word in the sentence. "
        "The other letters of each word stay lowercase.",
        make_input=_sentence(),
        solve=_text(lambda w: [x.capitalize() for x in w]),
        explain=_explain("Each word starts with a capital letter in '{output}'."),
    ),
    TaskSpec(
        name="task9006_lowercase_words",
        category="Case Conversion",
        split="train",
        definition="In this task, you are given a sentence in which some words contain uppercase letters. Your "
        "task is to convert the whole sentence to lowercase letters.",
        make_input=_mixed_case_sentence,
        solve=lambda text: [text.lower()],
        explain=_explain("Writing every capital letter as a small letter gives '{output}'."),
    ),
    TaskSpec(
        name="task9007_uppercase_last_word",
        category="Case Conversion",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to convert the last word of the sentence to uppercase "
        "letters. All the other words must stay unchanged.",
        make_input=_sentence(),
        solve=_text(lambda w: _upper_at(w, -1)),
        explain=_explain("Only the last word is written in capital letters: '{output}'."),
    ),
    # ----- train: Copying
    TaskSpec(
        name="task9008_copy_sentence",
        category="Copying",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to copy the sentence exactly as it is, without adding, "
        "removing or changing any word.",
        make_input=_sentence(),
        solve=lambda text: [text],
        explain=_explain("The output is the same sentence, word for word."),
    ),
    TaskSpec(
        name="task9009_repeat_sentence_twice",
        category="Copying",
        split="train",
        definition="In this task, you are given a short sentence. Your task is to write the sentence two times "
        "in a row, separated by a single space.",
        make_input=_sentence(max_words=4),
        solve=lambda text: [f"{text} {text}"],
        explain=_explain("The sentence '{input}' is written once and then once more."),
    ),
    TaskSpec(
        name="task9010_join_words_with_hyphens",
        category="Copying",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to join all the words of the sentence into one string by "
        "replacing every space with a hyphen ('-').",
        make_input=_sentence(),
        solve=_text(lambda w: "-".join(w)),
        explain=_explain("Putting a hyphen between each pair of words gives '{output}'."),
    ),
    # ----- train: Selection
    TaskSpec(
        name="task9011_first_word",
        category="Selection",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to return the first word of the sentence.",
        make_input=_sentence(),
        solve=_text(lambda w: w[0]),
        explain=_explain("The sentence starts with the word '{output}'."),
    ),
    TaskSpec(
        name="task9012_last_word",
        category="Selection",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to return the last word of the sentence.",
        make_input=_sentence(),
        solve=_text(lambda w: w[-1]),
        explain=_explain("The sentence ends with the word '{output}'."),
    ),
    TaskSpec(
        name="task9013_first_two_words",
        category="Selection",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to return the first two words of the sentence, in their "
        "original order.",
        make_input=_sentence(),
        solve=_text(lambda w: w[:2]),
        explain=_explain("The sentence starts with the two words '{output}'."),
    ),
    TaskSpec(
        name="task9014_longest_word",
        category="Selection",
        split="train",
        definition=_GIVEN_LIST + "Your task is to find the longest word in the list, that is, the word with the "
        "most letters, and return it.",
        make_input=_list_with_unique_longest,
        solve=_text(_longest),
        explain=_explain("No other word in the list has as many letters as '{output}'."),
    ),
    TaskSpec(
        name="task9015_longer_of_two_words",
        category="Selection",
        split="train",
        definition="In this task, you are given two words separated by a space. Your task is to return the word "
        "that has more letters.",
        make_input=_two_words_different_lengths,
        solve=_text(_longest),
        explain=_explain("The word '{output}' has more letters than the other word."),
    ),
    TaskSpec(
        name="task9016_alphabetically_first_word",
        category="Selection",
        split="train",
        definition=_GIVEN_LIST + "Your task is to return the word that comes first in alphabetical order.",
        make_input=_word_list(3, 6),
        solve=_text(min),
        explain=_explain("In alphabetical order, '{output}' comes before all the other words."),
    ),
    # ----- train: Deletion
    TaskSpec(
        name="task9017_drop_first_word",
        category="Deletion",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to remove the first word of the sentence and return the "
        "remaining words in their original order.",
        make_input=_sentence(),
        solve=_text(lambda w: w[1:]),
        explain=_explain("Without its first word the sentence reads '{output}'."),
    ),
    TaskSpec(
        name="task9018_remove_duplicate_words",
        category="Deletion",
        split="train",
        definition="In this task, you are given a list of words in which some words appear more than once. Your "
        "task is to keep only the first occurrence of each word and return the remaining words in order.",
        make_input=_list_with_duplicates,
        solve=_text(_first_occurrences),
        explain=_explain("Removing the repeated words leaves '{output}'."),
    ),
    TaskSpec(
        name="task9019_remove_color_words",
        category="Deletion",
        split="train",
        definition="In this task, you are given a sentence that contains one or more color words, such as 'red' "
        "or 'blue'. Your task is to remove every color word and return the rest of the sentence.",
        make_input=_sentence_with_colors(1, 2),
        solve=_text(lambda w: [x for x in w if x not in COLORS]),
        explain=_explain("Taking the color words out of the sentence leaves '{output}'."),
    ),
    # ----- train: Counting
    TaskSpec(
        name="task9020_count_words",
        category="Counting",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to count the number of words in the sentence and answer "
        "with a number written in digits.",
        make_input=_sentence(),
        solve=lambda text: [str(len(_words(text)))],
        explain=_explain_count("The sentence is made of {n} {noun}.", "word"),
    ),
    TaskSpec(
        name="task9021_count_vowels",
        category="Counting",
        split="train",
        definition="In this task, you are given a single word. Your task is to count how many vowels (the "
        "letters a, e, i, o and u) the word contains and answer with a number written in digits.",
        make_input=_single_word,
        solve=lambda text: [str(_count_vowels(text.strip()))],
        explain=_explain_count("The word '{input}' contains {n} {noun}.", "vowel"),
    ),
    TaskSpec(
        name="task9022_count_color_words",
        category="Counting",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to count how many color words, such as 'red', 'green' or "
        "'white', appear in the sentence. Answer with a number written in digits.",
        make_input=_sentence_with_colors(0, 2),
        solve=lambda text: [str(sum(w in COLORS for w in _words(text)))],
        explain=_explain_count("The sentence contains {n} color {noun}.", "word"),
    ),
    # ----- train: Classification
    TaskSpec(
        name="task9023_contains_color_word",
        category="Classification",
        split="train",
        definition=_GIVEN_SENTENCE + "Your task is to answer 'yes' if the sentence contains a color word, such "
        "as 'red' or 'blue', and 'no' otherwise.",
        make_input=_color_yes_no,
        solve=lambda text: _yes_no(any(w in COLORS for w in _words(text))),
        explain=_explain_contains("color word", COLORS),
    ),
    TaskSpec(
        name="task9024_is_alphabetically_sorted",
        category="Classification",
        split="train",
        definition=_GIVEN_LIST + "Your task is to answer 'yes' if the words are in alphabetical order and 'no' "
        "otherwise.",
        make_input=_sorted_yes_no,
        solve=lambda text: _yes_no(_words(text) == sorted(_words(text))),
        explain=_explain_sorted,
    ),
    TaskSpec(
        name="task9025_has_repeated_word",
        category="Classification",
        split="train",
        definition=_GIVEN_LIST + "Your task is to answer 'yes' if some word appears more than once in the list "
        "and 'no' otherwise.",
        make_input=_repeat_yes_no,
        solve=lambda text: _yes_no(len(set(_words(text))) < len(_words(text))),
        explain=_explain_repeat,
    ),
    # ----- train: Arithmetic
    TaskSpec(
        name="task9026_add_two_numbers",
        category="Arithmetic",
        split="train",
        definition="In this task, you are given two numbers separated by a comma. Your task is to add the two "
        "numbers and return their sum written in digits.",
        make_input=_numbers(2, 0, 20),
        solve=lambda text: [str(_ints(text)[0] + _ints(text)[1])],
        explain=_explain("Adding the numbers {input} gives {output}."),
    ),
    TaskSpec(
        name="task9027_subtract_two_numbers",
        category="Arithmetic",
        split="train",
        definition="In this task, you are given two numbers separated by a comma. Your task is to subtract the "
        "second number from the first number and return the result written in digits.",
        make_input=_numbers(2, 0, 20, ordered=True),
        solve=lambda text: [str(_ints(text)[0] - _ints(text)[1])],
        explain=_explain("The first number minus the second number of {input} is {output}."),
    ),
    TaskSpec(
        name="task9028_largest_number",
        category="Arithmetic",
        split="train",
        definition="In this task, you are given a list of numbers separated by commas. Your task is to return "
        "the largest number in the list.",
        make_input=_number_list,
        solve=lambda text: [str(max(_ints(text)))],
        explain=_explain("No number in the list is larger than {output}."),
    ),
    # ----- test (held out): close to training kinds, but different tasks
    TaskSpec(
        name="task9029_last_two_words",
        category="Selection",
        split="test",
        definition=_GIVEN_SENTENCE + "Your task is to return the last two words of the sentence, in their "
        "original order.",
        make_input=_sentence(),
        solve=_text(lambda w: w[-2:]),
        explain=_explain("The sentence ends with the two words '{output}'."),
    ),
    TaskSpec(
        name="task9030_uppercase_first_word",
        category="Case Conversion",
        split="test",
        definition=_GIVEN_SENTENCE + "Your task is to convert the first word of the sentence to uppercase "
        "letters. All the other words must stay unchanged.",
        make_input=_sentence(),
        solve=_text(lambda w: _upper_at(w, 0)),
        explain=_explain("Only the first word is written in capital letters: '{output}'."),
    ),
    TaskSpec(
        name="task9031_drop_last_word",
        category="Deletion",
        split="test",
        definition=_GIVEN_SENTENCE + "Your task is to remove the last word of the sentence and return the "
        "remaining words in their original order.",
        make_input=_sentence(),
        solve=_text(lambda w: w[:-1]),
        explain=_explain("Without its last word the sentence reads '{output}'."),
    ),
    TaskSpec(
        name="task9032_join_words_with_underscores",
        category="Copying",
        split="test",
        definition=_GIVEN_SENTENCE + "Your task is to join all the words of the sentence into one string by "
        "replacing every space with an underscore ('_').",
        make_input=_sentence(),
        solve=_text(lambda w: "_".join(w)),
        explain=_explain("Putting an underscore between each pair of words gives '{output}'."),
    ),
    TaskSpec(
        name="task9033_sort_words_reverse_alphabetical",
        category="Word Reordering",
        split="test",
        definition=_GIVEN_LIST + "Your task is to sort the words in reverse alphabetical order, from z to a, "
        "and return the sorted list.",
        make_input=_word_list(3, 6),
        solve=_text(lambda w: sorted(w, reverse=True)),
        explain=_explain("In reverse alphabetical order the words are '{output}'."),
    ),
    TaskSpec(
        name="task9034_count_letters",
        category="Counting",
        split="test",
        definition="In this task, you are given a single word. Your task is to count how many letters the word "
        "contains and answer with a number written in digits.",
        make_input=_single_word,
        solve=lambda text: [str(len(text.strip()))],
        explain=_explain_count("The word '{input}' is made of {n} {noun}.", "letter"),
    ),
    TaskSpec(
        name="task9035_contains_number_word",
        category="Classification",
        split="test",
        definition=_GIVEN_SENTENCE + "Your task is to answer 'yes' if the sentence contains a number word, such "
        "as 'two' or 'five', and 'no' otherwise.",
        make_input=_number_yes_no,
        solve=lambda text: _yes_no(any(w in NUMBER_WORDS for w in _words(text))),
        explain=_explain_contains("number word", NUMBER_WORDS),
    ),
    TaskSpec(
        name="task9036_add_three_numbers",
        category="Arithmetic",
        split="test",
        definition="In this task, you are given three numbers separated by commas. Your task is to add the three "
        "numbers and return their sum written in digits.",
        make_input=_numbers(3, 0, 10),
        solve=lambda text: [str(sum(_ints(text)))],
        explain=_explain("Adding the numbers {input} gives {output}."),
    ),
)


def _check_registry(specs: Sequence[TaskSpec]) -> Mapping[str, TaskSpec]:
    registry: dict[str, TaskSpec] = {}
    for spec in specs:
        if not _NAME_RE.match(spec.name):
            raise ValueError(f"task name {spec.name!r} does not look like 'taskNNNN_snake_case'")
        if spec.name in registry:
            raise ValueError(f"task name {spec.name!r} is defined twice")
        if spec.split not in SPLITS:
            raise ValueError(f"task {spec.name!r}: split must be one of {SPLITS}, got {spec.split!r}")
        registry[spec.name] = spec
    return MappingProxyType(registry)


#: Read-only registry of every task, keyed by task name, in task-number order (iterating yields names).
TASKS: Mapping[str, TaskSpec] = _check_registry(_SPECS)


def task_names(split: str | None = None) -> list[str]:
    """Names of the registered tasks, in task-number order.

    Args:
        split: ``"train"`` or ``"test"`` to keep one split; ``None`` for all.

    Returns:
        The task names.

    Raises:
        ValueError: unknown split.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [name for name, spec in TASKS.items() if split is None or spec.split == split]


# --------------------------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------------------------


def instance_id(name: str, seed: int, index: int) -> str:
    """Deterministic instance id ``f"{name}-{32 lowercase hex}"`` (md5 of seed, task name and index).

    Args:
        name: task name.
        seed: suite seed.
        index: 0-based instance index within the task.

    Returns:
        The id.
    """
    return f"{name}-{hashlib.md5(f'{seed}:{name}:{index}'.encode()).hexdigest()}"


def build_task(
    spec: TaskSpec, seed: int = 0, instances_per_task: int = 60, num_positive_examples: int = 2
) -> dict:
    """Builds the SuperNI task dict of one task.

    The positive examples are the first ``num_positive_examples`` distinct inputs drawn from
    ``random.Random(f"{seed}:{spec.name}")`` (preferring inputs whose outputs differ, so that a yes/no task
    shows both answers); the instances are the next ``instances_per_task`` distinct inputs, so no instance
    repeats another or a positive example.

    Args:
        spec: the task.
        seed: suite seed.
        instances_per_task: number of instances.
        num_positive_examples: number of positive examples.

    Returns:
        A dict with exactly the keys :data:`TASK_KEYS`, in that order.

    Raises:
        ValueError: negative counts, or the task cannot produce that many distinct inputs (the single-word tasks
            are limited by the vocabulary to about 200).
    """
    if instances_per_task < 0 or num_positive_examples < 0:
        raise ValueError(
            f"instances_per_task and num_positive_examples must be >= 0, got {instances_per_task} "
            f"and {num_positive_examples}"
        )
    rng = random.Random(f"{seed}:{spec.name}")
    needed = num_positive_examples + instances_per_task
    max_attempts = max(2000, 50 * needed)
    seen: set[str] = set()
    drawn: list[tuple[str, list[str]]] = []
    attempts = 0
    retries = 0  # draws skipped so that the positive examples show different outputs (both yes and no)
    while len(drawn) < needed:
        if attempts >= max_attempts:
            raise ValueError(
                f"task {spec.name!r}: found only {len(drawn)} distinct inputs in {attempts} draws, but "
                f"{needed} are needed ({num_positive_examples} positive examples + {instances_per_task} "
                "instances); ask for fewer instances per task"
            )
        attempts += 1
        text, outputs = spec.generator(rng)
        if text in seen:
            continue
        if len(drawn) < num_positive_examples and retries < _POSITIVE_RETRIES:
            if any(outputs[0] == out[0] for _, out in drawn):
                retries += 1
                continue
        seen.add(text)
        drawn.append((text, outputs))
    positives = [
        {"input": text, "output": outputs[0], "explanation": spec.explain(text, outputs[0])}
        for text, outputs in drawn[:num_positive_examples]
    ]
    instances = [
        {"id": instance_id(spec.name, seed, i), "input": text, "output": list(outputs)}
        for i, (text, outputs) in enumerate(drawn[num_positive_examples:])
    ]
    values = {
        "Contributors": ["itune"],
        "Source": [SOURCE],
        "URL": [],
        "Categories": [spec.category],
        "Reasoning": [],
        "Definition": [spec.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": positives,
        "Negative Examples": [],
        "Instances": instances,
        "Instance License": ["Apache 2.0"],
    }
    return {key: values[key] for key in TASK_KEYS}


def write_task_suite(
    out_dir: str | Path, seed: int = 0, instances_per_task: int = 60, num_positive_examples: int = 2
) -> dict:
    """Writes the whole suite in the SuperNI layout.

    Writes ``out_dir/tasks/<name>.json`` for every task in :data:`TASKS` (``json`` with ``indent=4``,
    ``ensure_ascii=False`` and a final newline, like the upstream files) and ``out_dir/splits/train_tasks.txt`` /
    ``out_dir/splits/test_tasks.txt`` (one task name per line). Every file is written atomically. Other files
    already in ``out_dir`` are left alone. The same arguments always give byte-identical files.

    Args:
        out_dir: output folder (created if missing).
        seed: suite seed; each task draws from ``random.Random(f"{seed}:{name}")``.
        instances_per_task: instances per task.
        num_positive_examples: positive examples per task.

    Returns:
        Summary: ``{"out_dir": str, "seed": int, "num_tasks": int, "num_instances": int,
        "splits": {"train": {"num_tasks": int, "num_instances": int}, "test": {...}}}``.

    Raises:
        ValueError: bad counts (see :func:`build_task`).
    """
    out = Path(out_dir)
    tasks_dir = out / "tasks"
    splits_dir = out / "splits"
    splits: dict[str, dict[str, int]] = {split: {"num_tasks": 0, "num_instances": 0} for split in SPLITS}
    for name, spec in TASKS.items():
        task = build_task(spec, seed, instances_per_task, num_positive_examples)
        atomic_write_text(tasks_dir / f"{name}.json", json.dumps(task, indent=4, ensure_ascii=False) + "\n")
        splits[spec.split]["num_tasks"] += 1
        splits[spec.split]["num_instances"] += len(task["Instances"])
    for split in SPLITS:
        names = task_names(split)
        atomic_write_text(splits_dir / f"{split}_tasks.txt", "".join(f"{n}\n" for n in names))
    return {
        "out_dir": str(out),
        "seed": seed,
        "num_tasks": sum(s["num_tasks"] for s in splits.values()),
        "num_instances": sum(s["num_instances"] for s in splits.values()),
        "splits": splits,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m itune.data.synthetic OUT_DIR [--seed N] [--instances-per-task N]``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status 0.
    """
    parser = argparse.ArgumentParser(description="Write the embedded synthetic SuperNI-format task suite.")
    parser.add_argument("out_dir", help="output folder; gets tasks/ and splits/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances-per-task", type=int, default=60)
    parser.add_argument("--num-positive-examples", type=int, default=2)
    args = parser.parse_args(argv)
    summary = write_task_suite(args.out_dir, args.seed, args.instances_per_task, args.num_positive_examples)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
