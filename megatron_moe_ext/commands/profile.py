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
    if os.path.exists(ns.output) and not os.path.isdir(ns.output):
        raise UserError(f"--output {ns.output} is an existing file; give a folder.")
    if ns.nproc < 1:
        raise UserError(f"--nproc must be a positive number of ranks, got {ns.nproc}.")
    extra = [a for a in ns.pretrain_args if a != "--"]
    _check_checkpoint(_flag_value(extra, "--load"))
    # --standalone: a free rendezvous port, so that profiles (or a training run) side by side on
    # one machine do not collide on torchrun's fixed default port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ns.nproc),
           "-m", "megatron_moe_ext.training.pretrain_gpt", *(["--cpu"] if ns.cpu else []),
           *extra, "--skip-train", "--no-load-optim", "--no-load-rng",
           "--moe-profile-collaboration", ns.output]
    return subprocess.call(cmd)


def _flag_value(argv, flag: str):
    """The value of `flag` in `argv` (`--flag V` or `--flag=V`; the last one wins, as in argparse)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def _check_checkpoint(load) -> None:
    """Megatron starts from a random init when --load holds no checkpoint; a profile of that is
    meaningless, so it is refused before anything is launched."""
    if load is None:
        raise UserError("pass the checkpoint to profile after `--`, e.g. `-- --load CKPT ...`.")
    if not os.path.isdir(load):
        raise UserError(f"--load {load} does not exist; give the folder of a trained checkpoint.")
    if not os.path.exists(os.path.join(load, "latest_checkpointed_iteration.txt")):
        raise UserError(f"--load {load} holds no Megatron checkpoint (no latest_checkpointed_iteration.txt); "
                        "give the folder a training run saved into.")
