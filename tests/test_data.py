"""prepare-data: Megatron reads back exactly what was written, with our tokenizer, and caching."""

import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_moe_ext.cli import main
from megatron_moe_ext.training.data import (
    SHIPPED_CORPUS,
    PrepareDataConfig,
    PrepareDataError,
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
    (["--valid-fraction", "nan"], "--valid-fraction"),
    (["--test-fraction", "inf"], "--test-fraction"),
    (["--doc-chars", "0"], "--doc-chars"),
    (["--encoding", "no-such-codec"], "--encoding"),
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


# ---------------------------------------------------------------------------------------------
# Safety against bad input and interruption. Each test hashes its input files before and after:
# prepare-data only ever reads them.

SMALL_ARGS = ["--vocab-size", "400", "--doc-chars", "1500", "--valid-fraction", "0.1",
              "--test-fraction", "0.1"]
REPO = Path(__file__).resolve().parents[1]


def _hashes(*paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _folder_hashes(folder):
    return _hashes(*sorted(p for p in Path(folder).iterdir() if p.is_file()))


def _prepare(capsys, out, *argv):
    """`megatron-moe-ext prepare-data` in this process: (exit code, stdout, stderr)."""
    rc = main(["prepare-data", "--output-dir", str(out), *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_sentence(err):
    err = err.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and "error: " in err, err
    return err


def _assert_round_trip(out, source_text):
    """Megatron's reader gives back, for every document, tokens that decode to text of the input."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = Path(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    source = " ".join(source_text.split())
    decoded = []
    for split in ("train", "valid", "test"):
        ds = IndexedDataset(str(out / f"{split}_text_document"))
        for i in range(len(ds)):
            ids = ds[i].tolist()
            assert ids[-1] == sp.eos_id() and sp.eos_id() not in ids[:-1]
            decoded.append(sp.decode(ids[:-1]))
    assert decoded and all(d.strip() and " ".join(d.split()) in source for d in decoded)
    return decoded


def _interrupt(argv, parent, sig):
    """Run the real CLI in a subprocess and send it `sig` as soon as it creates anything in
    `parent` (the folder the output goes in), i.e. while it is writing; (exit code, stderr)."""
    before = set(os.listdir(parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # SIGINT as a terminal delivers it: a parent that ignores SIGINT (an ignored signal is
    # inherited across exec) would otherwise keep Python from turning it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moe_ext.cli", "prepare-data", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # generous: a fresh venv's first imports on a loaded 2-core machine can take minutes, and a
    # signal during the imports would test Python's start-up, not prepare-data
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and set(os.listdir(parent)) == before:
        time.sleep(0.002)
    if set(os.listdir(parent)) == before:
        proc.kill()
        pytest.fail(f"prepare-data wrote nothing in {parent} before it ended or 600 s passed: "
                    f"{proc.communicate()[1][-2000:]}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("replacing", [False, True], ids=["fresh", "replacing"])
def test_interrupted_run_leaves_the_output_as_it_was(tmp_path, capsys, sample_text, replacing):
    """SIGINT while a build writes: no partial dataset anywhere, an earlier dataset intact, and the
    next run serves (or builds) a dataset that decodes; today's code wrote into the live folder."""
    inputs = _hashes(sample_text)
    out = tmp_path / "out"
    if replacing:
        assert _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)[0] == 0
        before = _folder_hashes(out)
    argv = ["--input", str(sample_text), "--output-dir", str(out), *SMALL_ARGS]
    if replacing:  # a rebuild with other parameters, allowed to replace the dataset
        argv += ["--vocab-size", "420", "--overwrite"]
    rc, err = _interrupt(argv, tmp_path, signal.SIGINT)
    if replacing:
        assert sorted(os.listdir(tmp_path)) == ["out"] and _folder_hashes(out) == before
    else:
        assert os.listdir(tmp_path) == []
    # (a subprocess's stderr also holds Megatron's import-time warnings: our sentence is last)
    assert rc == 130 and "Traceback" not in err, err
    assert "interrupted" in _one_sentence(err.strip().splitlines()[-1])
    if replacing:
        rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)
        assert rc == 0 and err == "" and _folder_hashes(out) == before  # a verified cache hit
    else:
        assert _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)[0] == 0
    _assert_round_trip(out, sample_text.read_text())
    assert _hashes(sample_text) == inputs


def test_killed_run_leaves_a_partial_folder_that_the_next_run_removes(tmp_path, capsys, sample_text):
    """SIGKILL cannot be caught: the partial folder stays, beside the output and never read, until
    the next run (same host, the killed process gone) deletes it."""
    inputs = _hashes(sample_text)
    out = tmp_path / "out"
    rc, _ = _interrupt(["--input", str(sample_text), "--output-dir", str(out), *SMALL_ARGS],
                       tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith(".out.partial-")
    assert _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)[0] == 0
    assert os.listdir(tmp_path) == ["out"]
    _assert_round_trip(out, sample_text.read_text())
    assert _hashes(sample_text) == inputs


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "delete", "version-1-manifest"])
def test_damaged_dataset_is_rebuilt_not_served(tmp_path, capsys, sample_text, damage):
    """A cache hit checks every file's size and sha256 against the manifest; a damaged file makes
    prepare-data say so and rebuild (today's code served a truncated .bin as "cached")."""
    inputs = _hashes(sample_text)
    out = tmp_path / "out"
    assert _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)[0] == 0
    good = _folder_hashes(out)
    victim = out / "train_text_document.bin"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip-byte":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        victim.unlink()
    else:  # as the previous prepare-data wrote it: nothing to verify the files by
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["files"]
        (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)
    named = "older prepare-data" if damage == "version-1-manifest" else "train_text_document.bin"
    assert rc == 0 and named in err and "rebuilding" in err
    assert _folder_hashes(out).keys() == good.keys()
    assert victim.stat().st_size == len(data)
    _assert_round_trip(out, sample_text.read_text())
    rebuilt = _folder_hashes(out)
    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)
    assert rc == 0 and err == "" and _folder_hashes(out) == rebuilt  # a verified cache hit again
    assert _hashes(sample_text) == inputs


def test_dataset_made_otherwise_is_refused_unless_overwrite(tmp_path, capsys, sample_text):
    """Other parameters or inputs in the same folder: refused, naming the difference, files
    untouched; --overwrite replaces the dataset (today's code replaced it without a word)."""
    other_text = tmp_path / "other.txt"
    other_text.write_text(sample_text.read_text()[:120_000])
    inputs = _hashes(sample_text, other_text)
    out = tmp_path / "out"
    assert _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS)[0] == 0
    before = _folder_hashes(out)

    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS, "--vocab-size", "420")
    assert rc == 2 and "--vocab-size 400 (now 420)" in _one_sentence(err) and "--overwrite" in err
    rc, _, err = _prepare(capsys, out, "--input", str(other_text), *SMALL_ARGS)
    assert rc == 2 and "other inputs" in _one_sentence(err) and str(other_text) in err
    assert _folder_hashes(out) == before

    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS, "--vocab-size", "420",
                          "--overwrite")
    assert rc == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["vocab_size"] == 420
    assert _folder_hashes(out) != before
    _assert_round_trip(out, sample_text.read_text())

    # --overwrite never deletes what prepare-data did not write.
    (out / "notes.md").write_text("mine")
    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS, "--overwrite")
    assert rc == 2 and "notes.md" in _one_sentence(err)
    assert (out / "notes.md").read_text() == "mine"
    assert _hashes(sample_text, other_text) == inputs


def test_bytes_that_are_not_text_are_refused(tmp_path, capsys):
    """300 KB of random bytes: not UTF-8 (file and byte offset named), and with a one-byte
    --encoding, where every byte decodes, refused for its NUL characters."""
    noise = tmp_path / "noise.txt"
    # paragraph breaks every 1000 bytes, so that it splits into documents as text would
    rng = random.Random(0)
    noise.write_bytes(b"\n\n".join(rng.randbytes(1000) for _ in range(300)))
    inputs = _hashes(noise)
    out = tmp_path / "out"
    rc, _, err = _prepare(capsys, out, "--input", str(noise), *SMALL_ARGS)
    offset = _first_invalid_utf8(noise.read_bytes())
    assert rc == 2 and str(noise) in _one_sentence(err) and f"byte offset {offset} " in err
    rc, _, err = _prepare(capsys, out, "--input", str(noise), *SMALL_ARGS, "--encoding", "latin-1")
    assert rc == 2 and str(noise) in _one_sentence(err) and "NUL" in err
    assert sorted(os.listdir(tmp_path)) == ["noise.txt"] and _hashes(noise) == inputs


def _first_invalid_utf8(raw):
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return None


def test_latin1_is_refused_as_utf8_and_read_with_encoding(tmp_path, capsys, sample_text):
    """Latin-1 text: refused as UTF-8 at the first accented letter's byte; with --encoding latin-1
    the accented letters survive into the tokens (today's code turned them into U+FFFD)."""
    paragraphs = sample_text.read_text().encode("latin-1", errors="ignore").decode("latin-1").split("\n\n")
    for i in range(0, len(paragraphs), 4):
        paragraphs[i] += " Café, crème brûlée et façade naïve."
    text = "\n\n".join(paragraphs)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(text.encode("latin-1"))
    inputs = _hashes(latin)
    out = tmp_path / "out"

    rc, _, err = _prepare(capsys, out, "--input", str(latin), *SMALL_ARGS)
    offset = _first_invalid_utf8(latin.read_bytes())
    assert rc == 2 and f"byte offset {offset} " in _one_sentence(err) and "--encoding" in err
    assert not out.exists()

    assert _prepare(capsys, out, "--input", str(latin), *SMALL_ARGS, "--encoding", "latin-1")[0] == 0
    decoded = " ".join(_assert_round_trip(out, text))
    assert "Café, crème brûlée et façade naïve." in decoded and "\ufffd" not in decoded
    assert _hashes(latin) == inputs


def test_vocabulary_too_large_is_a_sentence_and_leaves_nothing(tmp_path, capsys, sample_text):
    inputs = _hashes(sample_text)
    out = tmp_path / "deeper" / "out"
    rc, _, err = _prepare(capsys, out, "--input", str(sample_text), *SMALL_ARGS, "--vocab-size", "100000")
    err = _one_sentence(err)
    assert rc == 2 and "--vocab-size 100000" in err and "lower --vocab-size" in err
    largest = int(re.search(r"at most (\d+)", err)[1])
    assert 400 < largest < 100000
    assert os.listdir(tmp_path) == []  # neither the output nor the folder made for it
    assert _hashes(sample_text) == inputs


def test_vocabulary_too_small_for_the_characters_is_a_sentence(tmp_path, capsys):
    """1,500 distinct CJK characters need more than 400 pieces (SentencePiece's own check)."""
    rng = random.Random(0)
    cjk = tmp_path / "cjk.txt"
    cjk.write_text("\n\n".join(" ".join("".join(chr(0x4E00 + rng.randrange(1500)) for _ in range(8))
                                          for _ in range(30)) for _ in range(400)))
    inputs = _hashes(cjk)
    rc, _, err = _prepare(capsys, tmp_path / "out", "--input", str(cjk), *SMALL_ARGS)
    assert rc == 2 and "--vocab-size 400 is too small" in _one_sentence(err) and "raise --vocab-size" in err
    needed = int(re.search(r"at least (\d+)", err)[1])
    assert 1500 < needed < 1800
    assert os.listdir(tmp_path) == ["cjk.txt"] and _hashes(cjk) == inputs


def test_output_dir_that_is_a_file_is_a_sentence(tmp_path, capsys, sample_text):
    inputs = _hashes(sample_text)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    rc, _, err = _prepare(capsys, afile, "--input", str(sample_text), *SMALL_ARGS)
    assert rc == 2 and "is an existing file" in _one_sentence(err)
    rc, _, err = _prepare(capsys, afile / "out", "--input", str(sample_text), *SMALL_ARGS)
    assert rc == 2 and f"{afile} is a file" in _one_sentence(err)
    assert afile.read_text() == "keep me" and os.listdir(tmp_path) == ["afile"]
    assert _hashes(sample_text) == inputs


@pytest.mark.parametrize("change, needle", [
    ({"test_fraction": math.nan}, "--test-fraction"),
    ({"valid_fraction": math.nan}, "--valid-fraction"),
    ({"valid_fraction": math.inf}, "--valid-fraction"),
    ({"vocab_size": math.nan}, "--vocab-size"),
    ({"vocab_size": 400.5}, "--vocab-size"),
    ({"doc_chars": 0}, "--doc-chars"),
    ({"encoding": "no-such-codec"}, "--encoding"),
])
def test_library_refuses_values_that_are_not_finite_or_in_range(tmp_path, sample_text, change, needle):
    """The library checks what the verb passes (NaN compares false, so a NaN fraction used to put
    every document in one split without a word)."""
    inputs = _hashes(sample_text)
    with pytest.raises(PrepareDataError, match=re.escape(needle)):
        prepare_data(tmp_path / "out", [sample_text], dataclasses.replace(SMALL, **change), verbose=False)
    assert os.listdir(tmp_path) == [] and _hashes(sample_text) == inputs


def test_every_output_file_repeats_byte_for_byte(tmp_path, sample_text, monkeypatch):
    """The same input gives the same bytes in every file, whatever the folder and the machine's
    core count: SentencePiece's thread count is fixed, and the .model records no temporary path
    (docs/reproducibility.md)."""
    import megatron_moe_ext.training.data as data_mod

    cfg = SMALL
    digests = []
    for folder, cores in (("a", 1), ("deeper/b", 8)):
        monkeypatch.setattr(data_mod.os, "cpu_count", lambda c=cores: c)
        out = prepare_data(tmp_path / folder, [sample_text], cfg, verbose=False)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(Path(out.output_dir).iterdir()) if p.name != "manifest.json"})
    assert digests[0] == digests[1] and "tokenizer.model" in digests[0]
    assert str(tmp_path).encode() not in (tmp_path / "a" / "tokenizer.model").read_bytes()
