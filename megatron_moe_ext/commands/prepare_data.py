"""`megatron-moe-ext prepare-data`: text -> SentencePiece tokenizer + Megatron indexed datasets
(the library is `training/data.py`)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from megatron_moe_ext.training import data

    p = subparsers.add_parser(
        "prepare-data", help="Train a SentencePiece tokenizer and write Megatron indexed datasets.",
        description=data.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="Text files (.txt, .txt.gz) or folders of them (default: the shipped corpus).")
    p.add_argument("--output-dir", required=True)
    d = data.PrepareDataConfig()
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--doc-chars", type=int, default=d.doc_chars,
                   help="Approximate document length in characters (documents end at paragraph breaks).")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.training.data import (
        PrepareDataConfig,
        PrepareDataError,
        prepare_data,
    )

    if not 0 < ns.valid_fraction < 0.5 or not 0 <= ns.test_fraction < 0.5:
        raise PrepareDataError("--valid-fraction must be in (0, 0.5) and --test-fraction in [0, 0.5).")
    if ns.vocab_size < 300:
        raise PrepareDataError("--vocab-size must be at least 300 (256 byte-fallback pieces plus specials).")
    cfg = PrepareDataConfig(vocab_size=ns.vocab_size, doc_chars=ns.doc_chars,
                            valid_fraction=ns.valid_fraction, test_fraction=ns.test_fraction,
                            seed=ns.seed)
    result = prepare_data(ns.output_dir, ns.input, cfg)
    print(result)
    print("Megatron flags: " + " ".join(result.megatron_args()))
    return 0
