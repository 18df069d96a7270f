"""prepare-data: Megatron reads back exactly what was written, with our tokenizer, and caching."""

import gzip
import os

import pytest

from megatron_moe_ext.cli import main
from megatron_moe_ext.training.data import (
    SHIPPED_CORPUS,
    PrepareDataConfig,
    prepare_data,
)

SMALL = PrepareDataConfig(vocab_size=400, doc_chars=1500, valid_fraction=0.1, test_fraction=0.1)


@pytest.fixture(scope="module")
def sample_text(tmp_path_factory):
    text = gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8").read()[:150_000]
    path = tmp_path_factory.mktemp("in") / "sample.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def prepared(sample_text, tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("out"), [sample_text], SMALL, verbose=False)


def test_indexed_dataset_round_trip_with_megatron_tokenizer(prepared, sample_text):
    from types import SimpleNamespace

    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = SimpleNamespace(tokenizer_type="GPTSentencePieceTokenizer",
                           tokenizer_model=prepared.tokenizer_model, chat_template=None,
                           tokenizer_sentencepiece_ignore_extra_whitespaces=False,
                           tokenizer_sentencepiece_legacy=False, special_tokens=None,
                           metadata_path=None, pad_vocab_size=False)
    tok = build_tokenizer(args)
    sp = spm.SentencePieceProcessor(model_file=prepared.tokenizer_model)
    assert tok.eod == sp.eos_id() == 2

    total = 0
    decoded = []
    for split in ("train", "valid", "test"):
        ds = IndexedDataset(prepared.prefixes[split])
        assert len(ds) == prepared.documents[split] > 0
        for i in range(len(ds)):
            ids = ds[i].tolist()
            assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
            decoded.append(sp.decode(ids[:-1]))
            total += len(ids)
        assert sum(len(ds[i]) for i in range(len(ds))) == prepared.tokens[split]
    assert total == sum(prepared.tokens.values())
    # Every document decodes to text of the input (SentencePiece folds runs of whitespace).
    source = " ".join(sample_text.read_text().split())
    assert all(d.strip() and " ".join(d.split()) in source for d in decoded)


def test_second_call_is_cached_and_parameters_invalidate(prepared, sample_text):
    mtime = os.path.getmtime(prepared.tokenizer_model)
    again = prepare_data(prepared.output_dir, [sample_text], SMALL, verbose=False)
    assert again == prepared and os.path.getmtime(prepared.tokenizer_model) == mtime
    # Other parameters replace the dataset only when asked to (see test_made_otherwise_is_refused...).
    other = prepare_data(prepared.output_dir, [sample_text],
                         PrepareDataConfig(**{**SMALL.__dict__, "vocab_size": 420}), verbose=False,
                         overwrite=True)
    assert os.path.getmtime(other.tokenizer_model) > mtime or other != prepared


def test_megatron_flags_point_at_written_files(prepared):
    args = prepared.megatron_args()
    for flag in ("--tokenizer-model", "--train-data-path", "--valid-data-path"):
        path = args[args.index(flag) + 1]
        assert os.path.exists(path if flag == "--tokenizer-model" else path + ".bin")


@pytest.mark.parametrize("argv_tail, needle", [
    (["--input", "/nonexistent/x.txt"], "does not exist"),
    (["--vocab-size", "10"], "--vocab-size"),
    (["--valid-fraction", "0.9"], "--valid-fraction"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, argv_tail, needle):
    out = tmp_path / "out"
    assert main(["prepare-data", "--output-dir", str(out), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0
    assert not out.exists()


def test_empty_input_and_output_inside_input_folder(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert main(["prepare-data", "--input", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert main(["prepare-data", "--input", str(tmp_path), "--output-dir", str(tmp_path / "sub")]) == 2
    assert "never touched" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
