"""`megatron-moe-ext profile`: record per-layer expert co-activation of a checkpoint over data.

    megatron-moe-ext profile --output prof/ --nproc 8 -- <pretrain flags with --load CKPT>

Runs the pretrain entry with --skip-train (evaluation batches only) and
--moe-profile-collaboration OUTPUT; flags after `--` go to it unchanged. Next steps:
`plan-placement`, `apply-placement`, then training with `--moe-router-policy c2r --moe-c2r-plan`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_moe_ext.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="Record per-layer expert co-activation of a checkpoint over data.",
        description="Runs the pretrain entry with --skip-train (evaluation batches only) and "
                    "--moe-profile-collaboration OUTPUT; flags after `--` go to it unchanged "
                    "(model, data, --load CKPT, --eval-iters N).")
    p.add_argument("--output", required=True, help="folder for profile.json and the .npy matrices")
    p.add_argument("--nproc", type=int, default=1, help="ranks to launch (torchrun)")
    p.add_argument("--cpu", action="store_true", help="run on CPU through the compatibility layer")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(ns.output, "profile.json")):
        raise UserError(f"--output {ns.output} already holds a profile.json; choose an empty folder.")
    extra = [a for a in ns.pretrain_args if a != "--"]
    if "--load" not in extra:
        raise UserError("pass the checkpoint to profile after `--`, e.g. `-- --load CKPT ...`.")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ns.nproc),
           "-m", "megatron_moe_ext.training.pretrain_gpt", *(["--cpu"] if ns.cpu else []),
           *extra, "--skip-train", "--no-load-optim", "--no-load-rng",
           "--moe-profile-collaboration", ns.output]
    return subprocess.call(cmd)
