"""Evaluation: oracle reward, KL to the reference and J = reward - beta * KL on held-out prompts."""
from pilaf_jax.evaluation.evaluate import Evaluator
