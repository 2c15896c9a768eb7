"""Tokenizers: SentencePiece `tokenizer.model` (as ERNIE ships it) or a `tokenizer.json`."""

from __future__ import annotations

import json
import os

from ernie_jax.errors import DataError
from ernie_jax.paths import as_path, join

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "embedded")


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text, with ERNIE's special ids."""

    def __init__(self, path: str = "embedded"):
        directory = EMBEDDED_DIR if path == "embedded" else path
        sp_path = join(directory, "tokenizer.model")
        json_path = join(directory, "tokenizer.json")
        self.path = directory
        if as_path(sp_path).is_file():
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_proto=as_path(sp_path).read_bytes())
            except (RuntimeError, OSError) as e:
                raise DataError(
                    f"{sp_path} is not a SentencePiece model ({e}); point data.tokenizer elsewhere"
                ) from None
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.pad_id = max(self._sp.pad_id(), 0)
            self._encode = lambda s: self._sp.encode(s)
            self._decode = lambda ids: self._sp.decode(ids)
            unk = self._sp.unk_id()
            self._piece = lambda p: (lambda i: None if i == unk else i)(self._sp.piece_to_id(p))
            self._id_piece = self._sp.id_to_piece
        elif as_path(json_path).is_file():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise DataError(
                    f"{json_path} needs the `tokenizers` package: pip install tokenizers"
                ) from None
            try:
                tok = HFTokenizer.from_str(as_path(json_path).read_text())
            except Exception as e:  # noqa: BLE001 - the Rust loader raises a bare Exception on bad JSON
                raise DataError(
                    f"{json_path} is not a tokenizers JSON file ({e}); point data.tokenizer at a "
                    f"directory with a valid tokenizer.json or tokenizer.model"
                ) from None
            self.vocab_size = tok.get_vocab_size()
            special = _special_ids(directory, tok)
            self.bos_id, self.eos_id, self.pad_id = special
            self._encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids)
            self._piece = tok.token_to_id
            self._id_piece = tok.id_to_token
        else:
            raise DataError(f"data.tokenizer={path}: no tokenizer.model or tokenizer.json in {directory}")

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        """Text of `ids`; ids past the vocabulary (rows a model adds, e.g. a VL model's vision markers
        on a text tokenizer) spell nothing, so a sample holding them still decodes."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (e.g. `</s>` for a special token)."""
        return self._id_piece(int(i))

    def text_bytes(self, ids) -> int:
        """UTF-8 bytes of the text `ids` spell (special tokens spell nothing). Decoded as one run, so
        SentencePiece's word-initial space on the run's first token is not counted, as in the text."""
        return len(self.decode(ids).encode("utf-8"))

    def piece_id(self, piece: str) -> int | None:
        """The id of `piece` if it is one vocabulary entry (a special token), else None."""
        return self._piece(piece)


def _special_ids(directory: str, tok) -> tuple[int, int, int]:
    names = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
    cfg_path = join(directory, "tokenizer_config.json")
    if as_path(cfg_path).is_file():
        try:
            cfg = json.loads(as_path(cfg_path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(cfg, dict):
            raise DataError(
                f"{cfg_path} must hold a JSON object (bos_token, eos_token, ...); fix or remove it"
            )
        for k in names:
            v = cfg.get(f"{k}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if v:
                names[k] = v
    ids = [tok.token_to_id(names[k]) for k in ("bos", "eos", "pad")]
    return tuple(i if i is not None else d for i, d in zip(ids, (1, 2, 0)))
