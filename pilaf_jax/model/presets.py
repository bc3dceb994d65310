"""Architectures of public checkpoints, as `config.model` fields (HF config.json values)."""

LLAMA3_8B = dict(
    vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=0, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_embeddings=False,
    attention_bias=False)

# Llama 3.1 differs from 3 only by its rope scaling (128K context).
LLAMA3_1_8B = dict(
    LLAMA3_8B, rope_scaling='llama3', rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_position=8192)

SMOLLM2_135M = dict(
    vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=0, rope_theta=100_000.0, rms_norm_eps=1e-5, tie_embeddings=True,
    attention_bias=False)

QWEN2_5_0_5B = dict(
    vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
    num_kv_heads=2, head_dim=0, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True,
    attention_bias=True)
