"""One process, one CPU gloo rank: Megatron's logits of a torch_dist checkpoint next to the HF
model's logits of an HF folder, on the same tokens.

    python hf_megatron_check.py OUT.json --flags-file F --ckpt ITER_DIR --hf HF_DIR [--resave DIR]
    python hf_megatron_check.py OUT.json --import-to CKPT --hf HF_DIR     (import-hf first, EP=2 flags)

The Megatron side is the real GPTModel built from the flags (TP=PP=EP=1) and filled by Megatron's
own dist-checkpoint loader (so an EP=2 checkpoint is resharded by Megatron, not by our reader);
`--resave` then saves it again through Megatron's save (an EP=1 layout of the same weights).
"""

import argparse
import json
import shlex

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--flags-file")
    p.add_argument("--ckpt")
    p.add_argument("--import-to")
    p.add_argument("--hf", required=True)
    p.add_argument("--resave")
    a = p.parse_args()

    from megatron_moe_ext.convert.hf.megatron_model import (
        build_gpt_model,
        load_model_tensors,
        megatron_logits,
        save_checkpoint,
    )

    if a.import_to:  # the library call the import-hf verb makes, in this process
        from megatron_moe_ext.convert.hf.import_hf import FLAGS_FILE, import_hf

        import_hf(a.hf, a.import_to, ep=2)
        a.flags_file, a.ckpt = f"{a.import_to}/{FLAGS_FILE}", f"{a.import_to}/release"
    flags = shlex.split(open(a.flags_file).read())
    model, args = build_gpt_model(flags)
    load_model_tensors(model, a.ckpt)
    vocab = model.embedding.word_embeddings.weight.shape[0]
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1234))
    mlog = megatron_logits(model, tokens)
    if a.resave:
        from pathlib import Path

        save_checkpoint(model, args, Path(a.resave), 1)

    from transformers import AutoModelForCausalLM

    # trust_remote_code: the plugin's own architectures ship modeling_moe_ext.py (written by us)
    hf = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        hlog = hf(tokens).logits.float()
    result = {
        "hf_class": type(hf).__name__,
        "shape": list(hlog.shape),
        "max_abs": (mlog - hlog).abs().max().item(),
        "rel_fro": ((mlog - hlog).norm() / hlog.norm()).item(),
        "logit_scale": hlog.abs().max().item(),
        "same_argmax": float((mlog.argmax(-1) == hlog.argmax(-1)).float().mean()),
    }
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
