"""Megatron GPT-MoE <-> HuggingFace checkpoints for the stock architectures (plain top-k routing):
Qwen3-MoE, Qwen2-MoE (gated shared expert) and Mixtral.

  export.export_hf(load, out, ...)       torch_dist checkpoint -> HF folder (streams layer by layer)
  import_hf.import_hf(hf, out, ...)      HF folder -> torch_dist checkpoint + megatron_flags.txt

Modules: dist_reader (torch_dist chunks, saved args), arch (architecture choice, config fields,
refusals), mapping (tensor names and fused layouts), safetensors_out / hf_reader (HF files),
megatron_model (Megatron's own model and dist checkpointing on one CPU rank), outdir (outputs
that appear whole or not at all). No argparse here: the verbs live in commands/.
"""
