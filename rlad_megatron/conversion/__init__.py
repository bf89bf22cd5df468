"""HF <-> Megatron-Core conversion: one name table plus named transforms (Llama, Qwen2, Qwen3).

Offline: `convert.hf_to_megatron(hf_dir, out_dir)` and `convert.megatron_to_hf(ckpt_dir, out_dir,
hf_config_dir=...)` (also `rlad convert`), streaming tensor by tensor. Live export from the
sharded trainer lives in `rlad_megatron.backends.megatron.weight_export`. Nothing here imports
Megatron or transformers. See docs/conversion.md.
"""
