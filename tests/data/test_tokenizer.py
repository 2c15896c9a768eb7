import pytest

from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.errors import DataError


def test_embedded_sentencepiece_round_trip():
    tok = Tokenizer("embedded")
    text = "And God said, Let there be light: and there was light."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4096, 0, 1, 2)
    assert len(ids) < len(text) / 2.5  # a trained BPE, not characters


def test_tokenizer_json_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(
        ["in the beginning was the word"] * 20,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]),
    )
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(str(tmp_path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode(tok.encode("the word")).replace(" ", "") == "theword"
    for text, fragment in (("{", "is not valid JSON"), ("[1]", "must hold a JSON object")):
        (tmp_path / "tokenizer_config.json").write_text(text)
        with pytest.raises(DataError, match=fragment):
            Tokenizer(str(tmp_path))


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        Tokenizer(str(tmp_path))


def test_garbage_tokenizer_json_and_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{garbage")
    with pytest.raises(DataError, match="is not a tokenizers JSON file"):
        Tokenizer(str(tmp_path))
