"""`megatron-moe-ext prepare-data`: text -> SentencePiece tokenizer + Megatron indexed datasets.

Text files (.txt, .txt.gz, or folders of them; default: the shipped corpus, see data/CORPUS.md)
are cut into documents at paragraph breaks, split deterministically into train/valid/test,
a SentencePiece BPE tokenizer is trained on the training documents, and each split is written with
Megatron-Core's own `IndexedDatasetBuilder` (one document per item, end-of-document token
appended, as Megatron-LM's `tools/preprocess_data.py --append-eod` does). A manifest records
inputs (sha256) and parameters; the same call with the same inputs returns the cached result.
The inputs are only read.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from megatron_moe_ext.errors import UserError

SHIPPED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus_en.txt.gz"
MANIFEST = "manifest.json"
SCHEMA = "megatron-moe-ext/prepared-data"
SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")


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
                 config: PrepareDataConfig = PrepareDataConfig(), *, verbose: bool = True
                 ) -> PreparedData:
    """Tokenizer and indexed datasets for `inputs` (default: the shipped corpus) in `output_dir`.

    Returns the cached result when `output_dir/manifest.json` records the same inputs (by sha256)
    and parameters. Raises PrepareDataError on unusable input before writing anything.
    """
    out = Path(output_dir).resolve()
    files = _input_files(inputs)
    roots = [Path(i).resolve() for i in inputs or []] + files
    for root in roots:
        if out == root or root in out.parents or out in root.parents:
            raise PrepareDataError(f"--output-dir {out} overlaps the input {root}; choose a folder "
                                   "apart from the inputs so that they are never touched.")
    fingerprint = {"schema": SCHEMA, "version": SCHEMA_VERSION,
                   "inputs": [{"path": str(f), "sha256": _sha256(f)} for f in files],
                   "config": dataclasses.asdict(config)}
    cached = _load_cached(out, fingerprint)
    if cached is not None:
        return cached

    t0 = time.time()
    docs = [d for f in files for d in _documents(_read_text(f), config.doc_chars)]
    if not docs:
        raise PrepareDataError(f"the input ({', '.join(map(str, files))}) holds no text.")
    split_docs = _split(docs, config)
    if not split_docs["train"] or not split_docs["valid"]:
        raise PrepareDataError(f"the input has {len(docs)} documents of ~{config.doc_chars} characters; "
                               "that is too little text for separate train and validation splits.")
    out.mkdir(parents=True, exist_ok=True)
    _log(verbose, f"[prepare-data] {len(docs):,} documents from {len(files)} file(s); "
                  f"training a {config.vocab_size}-token SentencePiece model ...")
    model_path = _train_tokenizer(split_docs["train"], out / "tokenizer", config)
    prefixes, documents, tokens = {}, {}, {}
    for split in SPLITS:
        prefix = out / f"{split}_text_document"
        documents[split], tokens[split] = _write_indexed(split_docs[split], model_path, prefix)
        prefixes[split] = str(prefix)
    result = PreparedData(str(out), str(model_path), prefixes, documents, tokens)
    (out / MANIFEST).write_text(json.dumps({**fingerprint, "result": dataclasses.asdict(result),
                                            "seconds": round(time.time() - t0, 1)}, indent=1))
    _log(verbose, f"[prepare-data] wrote {result} in {time.time() - t0:.0f}s")
    return result


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


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise PrepareDataError(f"--input {path} cannot be read as text ({e}).") from e


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


def _train_tokenizer(train_docs: List[str], model_prefix: Path, config: PrepareDataConfig) -> Path:
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as tmp:
        written = 0
        for doc in train_docs:
            for line in doc.splitlines():
                if line.strip():
                    tmp.write(line.strip() + "\n")
                    written += len(line)
            if written >= config.tokenizer_sample_chars:
                break
    try:
        spm.SentencePieceTrainer.train(
            input=tmp.name, model_prefix=str(model_prefix), vocab_size=config.vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=True,
            # ids: 0 pad, 1 <s>, 2 </s> (Megatron's end-of-document), 3 <unk>
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            split_digits=True, num_threads=max(1, min(4, os.cpu_count() or 1)),
            minloglevel=2)
    finally:
        os.unlink(tmp.name)
    return model_prefix.with_suffix(".model")


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


def _load_cached(out: Path, fingerprint: dict) -> Optional[PreparedData]:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in fingerprint.items()):
        return None
    result = PreparedData(**manifest["result"])
    needed = [result.tokenizer_model] + [p + ext for p in result.prefixes.values() for ext in (".bin", ".idx")]
    return result if all(Path(p).is_file() for p in needed) else None
