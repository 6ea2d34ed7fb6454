"""Evaluation refuses a model whose tokenizer is not the one the eval data was prepared with."""

import shutil

import pytest

from itune.data.prepare import PrepareOptions, prepare_superni
from itune.data.tokenizer import train_sentencepiece
from itune.errors import ManifestError
from itune.eval.run import check_tokenizer
from tests.conftest import MISTRAL, SUPERNI


def test_tokenizer_mismatch_is_refused(tmp_path):
    data = tmp_path / "data"
    prepare_superni(PrepareOptions(SUPERNI, MISTRAL, data, seq_len=1024))
    same = tmp_path / "model_same"
    shutil.copytree(MISTRAL, same)
    check_tokenizer(same, data)  # the same tokenizer files: accepted
    other = train_sentencepiece([f"the cat sat on the mat {i}" for i in range(200)], tmp_path / "model_other",
                                vocab_size=400)
    with pytest.raises(ManifestError, match="is not the one .* was prepared with"):
        check_tokenizer(other, data)
