"""`megatron-moe-ext prepare-data`: text -> SentencePiece tokenizer + Megatron indexed datasets.

Text files (.txt, .txt.gz, or folders of them; default: the shipped corpus, see data/CORPUS.md)
are cut into documents at paragraph breaks, split deterministically into train/valid/test,
a SentencePiece BPE tokenizer is trained on the training documents, and each split is written with
Megatron-Core's own `IndexedDatasetBuilder` (one document per item, end-of-document token
appended, as Megatron-LM's `tools/preprocess_data.py --append-eod` does).

Input must be valid text in --encoding (default utf-8); anything else is refused, naming the file
and byte offset. The inputs are only read.

The dataset is built in a hidden folder next to --output-dir (.NAME.partial-HOST-PID-XXXX) and
renamed into place only when complete, so an interrupted run leaves the output as it was. A
partial folder is deleted when the build fails or is interrupted; one left by a killed process is
deleted by the next run on the same host once that process is gone; it is never read.

The manifest records the inputs (sha256), the parameters, and each output file's size and sha256.
The same call with the same inputs returns the cached result after checking every file against
the manifest; a damaged file (truncated, altered, missing) makes it rebuild the dataset instead.
A folder holding a dataset made from other inputs or parameters is refused, naming what differs,
unless --overwrite.
"""

from __future__ import annotations

import codecs
import dataclasses
import errno
import gzip
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from megatron_moe_ext.errors import UserError

SHIPPED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus_en.txt.gz"
MANIFEST = "manifest.json"
SENTENCEPIECE_THREADS = 4  # fixed, so that tokenizer.model is byte-identical on every machine
SCHEMA = "megatron-moe-ext/prepared-data"
SCHEMA_VERSION = 2  # 2: output files' sizes and sha256 in "files"; strict decoding ("encoding")
SPLITS = ("train", "valid", "test")
TOKENIZER = "tokenizer.model"
# Every name prepare-data writes into --output-dir; a folder holding others is not ours to replace.
OWN_FILES = frozenset([TOKENIZER, "tokenizer.vocab", MANIFEST] +
                      [f"{s}_text_document{e}" for s in SPLITS for e in (".bin", ".idx")])


class PrepareDataError(UserError):
    """Bad input to prepare-data; the message is one sentence naming the input."""


@dataclass(frozen=True)
class PrepareDataConfig:
    """Parameters that decide the output (any change means a rebuild)."""

    vocab_size: int = 4096
    doc_chars: int = 2000
    valid_fraction: float = 0.02
    test_fraction: float = 0.02
    seed: int = 1234
    tokenizer_sample_chars: int = 20_000_000  # train SentencePiece on at most this much text
    encoding: str = "utf-8"  # of the input files


@dataclass(frozen=True)
class PreparedData:
    """Where prepare-data put things, and how much it wrote."""

    output_dir: str
    tokenizer_model: str
    prefixes: dict  # split -> path prefix of <prefix>.bin/.idx
    documents: dict  # split -> number of documents
    tokens: dict  # split -> number of tokens (end-of-document tokens included)

    def megatron_args(self) -> List[str]:
        """The Megatron flags that train on these datasets with this tokenizer."""
        return ["--tokenizer-type", "GPTSentencePieceTokenizer",
                "--tokenizer-model", self.tokenizer_model,
                "--train-data-path", self.prefixes["train"],
                "--valid-data-path", self.prefixes["valid"],
                "--test-data-path", self.prefixes["test"]]

    def __str__(self) -> str:
        counts = ", ".join(f"{s} {self.tokens[s]:,} tokens/{self.documents[s]:,} docs" for s in SPLITS)
        return f"{self.output_dir} ({counts})"


def prepare_data(output_dir: os.PathLike | str, inputs: Optional[Sequence[os.PathLike | str]] = None,
                 config: PrepareDataConfig = PrepareDataConfig(), *, verbose: bool = True,
                 overwrite: bool = False) -> PreparedData:
    """Tokenizer and indexed datasets for `inputs` (default: the shipped corpus) in `output_dir`.

    Returns the cached result when `output_dir/manifest.json` records the same inputs (by sha256)
    and parameters and every output file still matches it. Raises PrepareDataError on unusable
    input, or on a folder holding a dataset made otherwise (unless `overwrite`), before writing
    anything; a failed or interrupted build leaves `output_dir` as it was.
    """
    check_config(config)
    out = _output_dir(output_dir)
    files = _input_files(inputs)
    _check_apart(out, [Path(i).resolve() for i in inputs or []] + files)
    fingerprint = {"schema": SCHEMA, "version": SCHEMA_VERSION,
                   "inputs": [{"path": str(f), "sha256": _sha256(f)} for f in files],
                   "config": {**dataclasses.asdict(config), "encoding": _codec(config.encoding)}}
    _remove_stale_temp(out)
    cached = _reuse(out, fingerprint, overwrite)
    if cached is not None:
        return cached

    t0 = time.time()
    docs = [d for f in files for d in _documents(_read_text(f, config.encoding), config.doc_chars)]
    if not docs:
        raise PrepareDataError(f"the input ({', '.join(map(str, files))}) holds no text.")
    split_docs = _split(docs, config)
    if not split_docs["train"] or not split_docs["valid"]:
        raise PrepareDataError(f"the input has {len(docs)} documents of ~{config.doc_chars} characters; "
                               "that is too little text for separate train and validation splits.")
    _log(verbose, f"[prepare-data] {len(docs):,} documents from {len(files)} file(s); "
                  f"training a {config.vocab_size}-token SentencePiece model ...")
    manifest = _build(out, split_docs, config, fingerprint)
    result = _result(out, manifest)
    _log(verbose, f"[prepare-data] wrote {result} in {time.time() - t0:.0f}s")
    return result


# ---------------------------------------------------------------------------------------------
# Checks of the parameters and the output folder (before anything is read or written)

def check_config(config: PrepareDataConfig) -> None:
    """Refuse parameters SentencePiece or the split would misread (NaN compares false everywhere,
    so a NaN fraction would silently put every document in one split)."""
    _check_int("--vocab-size", config.vocab_size, 300,
               "256 byte-fallback pieces plus specials need at least 300")
    _check_int("--doc-chars", config.doc_chars, 1, "documents need at least one character")
    _check_int("--seed", config.seed, None, "")
    _check_int("tokenizer_sample_chars", config.tokenizer_sample_chars, 1,
               "SentencePiece needs some text")
    for flag, value, low_open in (("--valid-fraction", config.valid_fraction, True),
                                  ("--test-fraction", config.test_fraction, False)):
        if not _is_number(value) or not math.isfinite(value) or not (
                (0 < value if low_open else 0 <= value) and value < 0.5):
            raise PrepareDataError(f"{flag} is {value!r}; it must be a finite number in "
                                   f"{'(0' if low_open else '[0'}, 0.5).")
    _codec(config.encoding)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(flag: str, value, minimum: Optional[int], why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PrepareDataError(f"{flag} is {value!r}; it must be a whole number.")
    if minimum is not None and value < minimum:
        raise PrepareDataError(f"{flag} is {value!r}; it must be at least {minimum} ({why}).")


def _codec(encoding: str) -> str:
    """The codec's canonical name, so that "latin1" and "Latin-1" fingerprint alike."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise PrepareDataError(f"--encoding {encoding!r} is not an encoding Python knows "
                               "(e.g. utf-8, latin-1, cp1252).") from None


def _output_dir(output_dir: os.PathLike | str) -> Path:
    """`output_dir` resolved; refused when it, or a folder it would go in, is a file."""
    out = Path(output_dir).resolve()
    for p in (out, *out.parents):
        if p.exists():
            if p.is_dir():
                return out
            if p == out:
                raise PrepareDataError(f"--output-dir {out} is an existing file, not a folder; "
                                       "choose a new or empty folder.")
            raise PrepareDataError(f"--output-dir {out} cannot be made because {p} is a file.")
    return out


def _check_apart(out: Path, roots: Sequence[Path]) -> None:
    for root in roots:
        if out == root or root in out.parents or out in root.parents:
            raise PrepareDataError(f"--output-dir {out} overlaps the input {root}; choose a folder "
                                   "apart from the inputs so that they are never touched.")


# ---------------------------------------------------------------------------------------------
# Inputs

def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _input_files(inputs: Optional[Sequence[os.PathLike | str]]) -> List[Path]:
    if not inputs:
        return [SHIPPED_CORPUS]
    files: List[Path] = []
    for item in inputs:
        p = Path(item).resolve()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise PrepareDataError(f"--input {p} is a folder with no .txt or .txt.gz files.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise PrepareDataError(f"--input {p} does not exist.")
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_text(path: Path, encoding: str) -> str:
    """The file's text, decoded strictly: a byte that is not `encoding` is refused, not replaced
    (errors="replace" would quietly turn accented letters of Latin-1 text into U+FFFD)."""
    gz = path.name.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareDataError(f"--input {path} cannot be read ({e}).") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        where = f"byte offset {e.start}" + (" of its decompressed content" if gz else "")
        hint = ("pass --encoding with its encoding (e.g. --encoding latin-1) if it is text"
                if _codec(encoding) == "utf-8" else "check --encoding")
        raise PrepareDataError(f"--input {path} is not valid {encoding} text: byte 0x{raw[e.start]:02x} "
                               f"at {where} ({e.reason}); {hint}.") from None
    nul = text.find("\x00")
    if nul >= 0:  # binary data decoded by a one-byte encoding: every byte "decodes"
        raise PrepareDataError(f"--input {path} holds a NUL character (character {nul} after decoding "
                               f"as {encoding}), so it is not text.")
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the text


def _documents(text: str, doc_chars: int) -> Iterable[str]:
    """Group paragraphs (blank-line separated) into documents of about `doc_chars` characters."""
    buf: List[str] = []
    size = 0
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= doc_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _split(docs: List[str], config: PrepareDataConfig) -> dict:
    """Deterministic split by a keyed hash of each document, so adding text moves no old document."""
    out = {s: [] for s in SPLITS}
    for doc in docs:
        h = hashlib.blake2b(doc.encode(), digest_size=8, key=str(config.seed).encode()).digest()
        u = int.from_bytes(h, "little") / 2**64
        split = ("valid" if u < config.valid_fraction else
                 "test" if u < config.valid_fraction + config.test_fraction else "train")
        out[split].append(doc)
    return out


# ---------------------------------------------------------------------------------------------
# The cache: reuse a verified dataset, refuse one made otherwise

def _reuse(out: Path, fingerprint: dict, overwrite: bool) -> Optional[PreparedData]:
    """The cached result when `out` holds this very dataset, intact; None when `out` may be
    (re)built; PrepareDataError when it holds something that must not be replaced."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    manifest = _read_manifest(out)
    differences = None if manifest is None else _differences(manifest, fingerprint)
    damage = _damage(out, manifest) if differences == [] else None
    if differences == [] and damage is None:
        return _result(out, manifest)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    if foreign:  # even --overwrite must not delete what prepare-data did not write
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        why = f"its dataset must be rebuilt ({damage}), but it also " if damage else ""
        raise PrepareDataError(f"--output-dir {out}: {why}holds {foreign[0]}{more}, which prepare-data "
                               "did not write; move that away or choose a new or empty folder.")
    if damage:
        # Same inputs and parameters: the files are ours to remake, and serving them is wrong.
        print(f"[prepare-data] {out}: {damage}; rebuilding it.", file=sys.stderr, flush=True)
    if differences and not overwrite:
        raise PrepareDataError(f"--output-dir {out} holds a dataset made with {'; '.join(differences)}; "
                               "pass --overwrite to replace it, or choose another --output-dir.")
    if manifest is None and not overwrite:
        raise PrepareDataError(f"--output-dir {out} holds prepare-data files but no readable {MANIFEST} "
                               "(left by an older version?); pass --overwrite to replace them.")
    return None


def _read_manifest(out: Path) -> Optional[dict]:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        ok = (manifest["schema"] == SCHEMA and isinstance(manifest["config"], dict) and
              all(isinstance(i["path"], str) and isinstance(i["sha256"], str) for i in manifest["inputs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def _differences(manifest: dict, fingerprint: dict) -> List[str]:
    """What the dataset in `manifest` was made with that this call would not (empty: the same)."""
    diffs = []
    old, new = manifest["inputs"], fingerprint["inputs"]
    # The output depends on the inputs' content and order, not on where they lie (the shipped
    # corpus moves with the installation).
    if [i["sha256"] for i in old] != [i["sha256"] for i in new]:
        if [i["path"] for i in old] == [i["path"] for i in new]:
            changed = next(n for o, n in zip(old, new) if o["sha256"] != n["sha256"])
            diffs.append(f"the input {changed['path']} as it was before it changed (sha256 now "
                         f"{changed['sha256'][:12]}...)")
        else:
            diffs.append(f"other inputs ({_names(old)}; now {_names(new)})")
    # A parameter an older manifest lacks had its default value then.
    defaults = dataclasses.asdict(PrepareDataConfig())
    old_config = manifest["config"]
    for key, new in fingerprint["config"].items():
        old = old_config.get(key, defaults[key])
        if old != new:
            flag = "--" + key.replace("_", "-") if key != "tokenizer_sample_chars" else key
            diffs.append(f"{flag} {old} (now {new})")
    return diffs


def _names(inputs: List[dict]) -> str:
    paths = [i["path"] for i in inputs]
    return ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


def _damage(out: Path, manifest: dict) -> Optional[str]:
    """Why the files in `out` cannot be trusted as the manifest's dataset (None: they can)."""
    files = manifest.get("files")
    if manifest.get("version") != SCHEMA_VERSION or not isinstance(files, dict):
        return "it was written by an older prepare-data without checksums to verify it by"
    if not all(isinstance(manifest.get(k), dict) and manifest[k].keys() == set(SPLITS)
               for k in ("documents", "tokens")):
        return f"its {MANIFEST} lacks the document and token counts"
    missing = OWN_FILES - {MANIFEST, "tokenizer.vocab"} - files.keys()
    if missing:
        return f"its manifest lists no {sorted(missing)[0]}"
    for name, want in sorted(files.items()):
        path = out / name
        if not isinstance(want, dict) or name not in OWN_FILES:
            return f"its {MANIFEST} lists {name!r} oddly"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{name} is {size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path) != want.get("sha256"):
            return f"{name} differs from the manifest's sha256"
    return None


def _result(out: Path, manifest: dict) -> PreparedData:
    # Paths from `out`, not from the manifest, so a moved dataset points at itself.
    return PreparedData(str(out), str(out / TOKENIZER),
                        {s: str(out / f"{s}_text_document") for s in SPLITS},
                        dict(manifest["documents"]), dict(manifest["tokens"]))


# ---------------------------------------------------------------------------------------------
# Building: into a partial folder next to `out`, renamed into place when complete

def _build(out: Path, split_docs: dict, config: PrepareDataConfig, fingerprint: dict) -> dict:
    """Write the dataset and return its manifest; on any failure (KeyboardInterrupt included)
    the partial folder and the parent folders made for it are removed, and `out` is untouched."""
    t0 = time.time()
    # Imported before anything is written: an interrupt while a C extension initialises surfaces
    # as ImportError rather than KeyboardInterrupt.
    import sentencepiece  # noqa: F401
    from megatron.core.datasets import indexed_dataset  # noqa: F401

    made = _make_parents(out.parent)
    tmp, done = None, False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_owner()}-", dir=out.parent))
        model_path = _train_tokenizer(split_docs["train"], tmp / Path(TOKENIZER).stem, config)
        documents, tokens = {}, {}
        for split in SPLITS:
            documents[split], tokens[split] = _write_indexed(split_docs[split], model_path,
                                                             tmp / f"{split}_text_document")
        manifest = {**fingerprint, "documents": documents, "tokens": tokens,
                    "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in sorted(tmp.iterdir())},
                    "seconds": round(time.time() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)  # contents on disk before the rename makes them visible
        _swap_in(tmp, out)
        done = True
        return manifest
    except OSError as e:
        raise PrepareDataError(f"--output-dir {out} cannot be written ({e}).") from None
    finally:
        if not done:
            if tmp is None:
                # interrupted between mkdtemp creating the folder and `tmp` being set: find it
                # by this process's owner prefix
                prefix = f".{out.name}.partial-{_owner()}-"
                for p in out.parent.iterdir() if out.parent.is_dir() else ():
                    if p.name.startswith(prefix):
                        shutil.rmtree(p, ignore_errors=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(made):
                _rmdir_quietly(folder)


def _owner() -> str:
    """HOST-PID of this process, so a later run can tell whose partial folder it finds."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _make_parents(folder: Path) -> List[Path]:
    """mkdir -p `folder`; returns the folders it made, outermost first."""
    made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareDataError(f"the folder {folder} for --output-dir cannot be made ({e}).") from None
    return made


def _rmdir_quietly(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _remove_stale_temp(out: Path) -> None:
    """Delete partial folders of `out` left by killed runs on this host (their process is gone);
    others' partial folders are left alone, and none is ever read."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-z_]+")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and m["host"] == socket.gethostname() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete dataset `tmp` to `out`. One atomic rename when `out` is absent or
    empty; otherwise `out` is first renamed aside (.NAME.old-...), so that a crash in between
    leaves no mixed folder: `out` is then absent, and the next run rebuilds it."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        old = out.parent / f".{out.name}.old-{_owner()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _train_tokenizer(train_docs: List[str], model_prefix: Path, config: PrepareDataConfig) -> Path:
    import sentencepiece as spm

    # The sample goes in the partial folder, so an interruption leaves it nowhere else.
    sample = model_prefix.parent / "tokenizer-sample.txt"
    with open(sample, "w", encoding="utf-8") as f:
        written = 0
        for doc in train_docs:
            for line in doc.splitlines():
                if line.strip():
                    f.write(line.strip() + "\n")
                    written += len(line)
            if written >= config.tokenizer_sample_chars:
                break
    # The .model file records the trainer's input and model_prefix strings: relative names (the
    # trainer runs in the partial folder), so that the temporary folder's name (host, PID, random
    # suffix) is not in it and the tokenizer's bytes repeat from run to run and machine to machine.
    cwd = os.getcwd()
    try:
        os.chdir(model_prefix.parent)
        spm.SentencePieceTrainer.train(
            input=sample.name, model_prefix=model_prefix.name, vocab_size=config.vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=True,
            # ids: 0 pad, 1 <s>, 2 </s> (Megatron's end-of-document), 3 <unk>
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            # A fixed thread count, not the machine's: the pieces do not depend on it (checked
            # with 1, 2 and 4 threads, docs/reproducibility.md), but the .model file records it.
            split_digits=True, num_threads=SENTENCEPIECE_THREADS,
            minloglevel=2)
    except RuntimeError as e:
        raise _tokenizer_error(str(e), config.vocab_size) from None
    finally:
        os.chdir(cwd)
        sample.unlink()
    return model_prefix.with_suffix(".model")


def _tokenizer_error(message: str, vocab_size: int) -> PrepareDataError:
    """SentencePiece's complaint as one sentence naming the flag to change."""
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return PrepareDataError(f"--vocab-size {vocab_size} is more than this input supports (at most "
                                f"{too_high[1]}); lower --vocab-size or give more text.")
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        # (SentencePiece's count: every distinct character, plus the byte and special pieces)
        return PrepareDataError(f"--vocab-size {vocab_size} is too small for this input: its distinct "
                                f"characters and the 260 byte and special pieces need at least "
                                f"{too_low[1]}; raise --vocab-size.")
    detail = " ".join(message.split())
    return PrepareDataError(f"SentencePiece cannot train a {vocab_size}-token tokenizer on this input "
                            f"({detail}).")


def _write_indexed(docs: List[str], model_path: Path, prefix: Path):
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    eod = sp.eos_id()
    dtype = np.uint16 if sp.vocab_size() < 65500 else np.int32
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    n_tokens = 0
    for ids in sp.encode(docs):
        ids.append(eod)
        builder.add_document(ids, [len(ids)])
        n_tokens += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return len(docs), n_tokens
