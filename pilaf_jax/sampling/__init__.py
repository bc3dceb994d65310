"""Sampling: which two responses the labeller compares.

mix_logits is the PILAF primitive; decode runs policy and reference together with two KV caches;
samplers.py holds the registry of pair samplers (vanilla, pilaf, best_of_n, hybrid, t_pilaf).
"""
from pilaf_jax.sampling.decode import DecodeSettings, Rollout, RowLayout, decode
from pilaf_jax.sampling.mixing import filter_logits, mix_logits, sample_tokens
from pilaf_jax.sampling.samplers import SAMPLERS, SamplerContext, make_sampler, register_sampler
