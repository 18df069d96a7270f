"""The run's SentencePiece model (prepare-data's, Megatron's GPTSentencePieceTokenizer) as a
tokenizer transformers loads with AutoTokenizer, giving the same ids.

transformers converts `tokenizer.model` into a `tokenizers` BPE with a Metaspace pre-tokenizer,
but without SentencePiece's default normaliser (nmt_nfkc: NFKC, control characters to spaces;
remove_extra_whitespaces: runs of spaces collapsed, ends stripped), so text with newlines or
double spaces would tokenise differently. We add that normaliser, write tokenizer.json, and
check the result against SentencePiece itself on probe strings before keeping it. The
conversion needs `protobuf` (at export time only; loading tokenizer.json does not).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

_PROBES = [
    "Hello world, this is 2026!",
    "  leading spaces and\nnewlines\ttabs  ",
    "a\n\nb  c",
    "ünïcödé 漢字 🙂 ﬁ ①",
    "The quick brown fox jumps over the lazy dog. " * 4,
]


def write_sentencepiece_tokenizer(model: Path, out: Path) -> Tuple[Optional[str], str]:
    """(description, '') when out/ got a tokenizer matching `model`, else (None, the reason)."""
    import sentencepiece as spm
    from tokenizers import Regex, normalizers
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(model, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "add_bos_token": False,
                    "add_eos_token": False,
                    "legacy": True,
                }
            )
        )
        try:
            tok = AutoTokenizer.from_pretrained(tmp)
        except Exception as e:  # e.g. protobuf missing
            return None, f"transformers could not convert it ({type(e).__name__})"
    tok.backend_tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"[\t\n\r\f\v]"), " "),
            normalizers.Replace(Regex(r" {2,}"), " "),
            normalizers.Strip(),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        # the Llama class rebuilds its own pipeline on load and would drop the normaliser
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        loaded = AutoTokenizer.from_pretrained(tmp)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        for text in _PROBES:
            if sp.encode(text) != loaded.encode(text, add_special_tokens=False):
                return None, f"the converted tokenizer encodes {text[:30]!r} differently"
        for f in Path(tmp).iterdir():
            shutil.copy2(f, out / f.name)
    shutil.copy2(model, out / "tokenizer.model")
    return "tokenizer.json (PreTrainedTokenizerFast, checked against SentencePiece)", ""
