"""Architectures of public checkpoints, as `config.model` fields (HF config.json values)."""

LLAMA3_8B = dict(
    vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=0, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_embeddings=False,
    attention_bias=False)
