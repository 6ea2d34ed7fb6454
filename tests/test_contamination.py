"""Contamination guard: trained-on held-out tasks are refused; n-gram overlap is measured exactly."""

import pytest

from itune.data.prepare import PrepareOptions, prepare_superni
from itune.errors import ManifestError
from itune.eval.contamination import _ngrams, check_heldout_tasks, overlap_report, train_ngrams
from tests.conftest import MISTRAL, SUPERNI


def test_refuses_trained_heldout_task():
    with pytest.raises(ManifestError, match=r"held-out tasks \['task1'\] appear in the training data"):
        check_heldout_tasks(["task1", "task2"], ["task1", "task3"], "run")
    check_heldout_tasks(["task2"], ["task1"], "run")


def test_ngrams_and_overlap_report():
    assert _ngrams([1, 2, 3, 4], 3) == {(1, 2, 3), (2, 3, 4)}
    grams = _ngrams(list(range(20)), 13)  # 8 grams
    recs = [{"id": "a", "prompt_ids": list(range(10))}, {"id": "b", "prompt_ids": [99] * 10}]
    # a: prompt 0..9 + ref 10..14 -> 0..14: 3 grams, all in training -> 1.0; b: no shared gram -> 0.0
    rep = overlap_report(recs, [[10, 11, 12, 13, 14], [10, 11, 12]], grams, threshold=0.5)
    assert rep == {"ngram": 13, "threshold": 0.5, "instances": 2, "contaminated": 1, "fraction": 0.5, "ids": ["a"]}


def test_row_ngrams_never_cross_example_boundaries():
    from itune.eval.contamination import row_ngrams

    # two examples [1,2,3] and [4,5] then padding [0,0]
    assert row_ngrams([1, 2, 3, 4, 5, 0, 0], [3, 2], n=2) == {(1, 2), (2, 3), (4, 5)}


def test_real_heldout_instances_are_clean(tmp_path):
    import json

    out = tmp_path / "d"
    prepare_superni(PrepareOptions(SUPERNI, MISTRAL, out, seq_len=1024))
    grams = train_ngrams(out)
    assert len(grams) > 10000 and all(len(g) == 13 for g in grams)
    recs = [json.loads(x) for x in (out / "test_eval.jsonl").read_text().splitlines()]
    assert overlap_report(recs, [[] for _ in recs], grams)["contaminated"] == 0
    # a held-out set made of training prompts is flagged completely
    from itune.data.shards import open_split

    t = open_split(out, "train")
    fake = [{"id": str(i), "prompt_ids": t["input_ids"][i].as_py()[:t["example_lengths"][i].as_py()[0]]}
            for i in range(5)]
    assert overlap_report(fake, [[] for _ in fake], grams)["contaminated"] == 5
