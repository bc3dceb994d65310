"""The language model: a Llama-family decoder and teacher-forced scoring."""
from pilaf_jax.model.llama import KVCache, Llama, LlamaConfig, count_params, init_params
from pilaf_jax.model.scoring import masked_log_softmax, response_logprobs, sequence_inputs
