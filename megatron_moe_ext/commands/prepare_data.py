"""`megatron-moe-ext prepare-data`: text -> SentencePiece tokenizer + Megatron indexed datasets
(the library is `training/data.py`)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from megatron_moe_ext.training import data

    p = subparsers.add_parser(
        "prepare-data", help="Train a SentencePiece tokenizer and write Megatron indexed datasets.",
        description=data.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="Text files (.txt, .txt.gz) or folders of them (default: the shipped corpus).")
    p.add_argument("--output-dir", required=True)
    d = data.PrepareDataConfig()
    p.add_argument("--encoding", default=d.encoding,
                   help="Encoding of the input files (default %(default)s; e.g. latin-1, cp1252).")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--doc-chars", type=int, default=d.doc_chars,
                   help="Approximate document length in characters (documents end at paragraph breaks).")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a dataset in --output-dir that was made from other inputs or parameters.")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.training.data import PrepareDataConfig, prepare_data

    # The library checks every value (finite, in range) and names the flag.
    cfg = PrepareDataConfig(vocab_size=ns.vocab_size, doc_chars=ns.doc_chars,
                            valid_fraction=ns.valid_fraction, test_fraction=ns.test_fraction,
                            seed=ns.seed, encoding=ns.encoding)
    try:
        result = prepare_data(ns.output_dir, ns.input, cfg, overwrite=ns.overwrite)
    except (KeyboardInterrupt, ImportError) as e:
        # An interrupt while a C extension initialises arrives as ImportError caused by it.
        if not isinstance(e, KeyboardInterrupt) and not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        # prepare_data has removed its partial folder; the output is as it was.
        print(f"megatron-moe-ext prepare-data: error: interrupted; {ns.output_dir} is as it was before.",
              file=sys.stderr, flush=True)
        return 130
    print(result)
    print("Megatron flags: " + " ".join(result.megatron_args()))
    return 0
