"""The stable library surface: preference pairs from any sampler, and the DPO loss, for your own loop.

    import pilaf_jax as pj

    sample = pj.make_pair_sampler(policy, ref, sampler='pilaf', beta=0.1, max_new_tokens=64, eos_ids=2)
    pairs = sample(policy_params, ref_params, prompts, rng)            # a PairBatch, [B, 2, R]
    batch = pj.PreferenceBatch(pairs, a_preferred)                      # your labeller's answers, [B]
    loss, metrics = pj.dpo_batch_loss(policy, params, batch, beta=0.1)  # differentiable in params

Everything here is a pure function of (params, prompts, rng): the same arguments give the same pairs,
and all of it can be called inside your own `jax.jit` / `jax.grad`. The *settings* (sampler name,
beta, decode settings, allowed tokens) are Python values fixed when the function is built:
`make_pair_sampler` returns a function jitted with them baked in (compiled once per prompt shape),
and `sample_pairs` is the one-call form that keeps such functions in a small cache keyed by those
settings, so calling it in a loop does not recompile.

Models are `pilaf_jax.Llama` modules (a Llama-family decoder whose parameter names follow Hugging
Face's; load checkpoints with `pilaf_jax.model.checkpoints.load_checkpoint` or initialise with
`init_params`). Policy and reference must share one vocabulary (PILAF mixes them token by token).

Stability (semantic versioning from 0.2.0): the names in `pilaf_jax.__all__`, their documented
arguments and return types, and the documented fields of PromptBatch, PairBatch and
PreferenceBatch change only with a major version; additions (a new keyword argument with a default,
a new sampler name, a new field with a default) come in minor versions. Everything else in the
package (experiment, loops, the config fields) may change in any release.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch
from pilaf_jax.labelling.oracles import bradley_terry as _bradley_terry
from pilaf_jax.learning.dpo import dpo_loss, preference_loss  # noqa: F401  (dpo_loss: the public name)
from pilaf_jax.model.llama import Llama
from pilaf_jax.model.scoring import response_logprobs  # noqa: F401  (the public name)
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SAMPLERS, SamplerContext, build_sampler

PairSampler = Callable[..., PairBatch]  # fn(policy_params, ref_params, prompts, rng) -> PairBatch


def available_samplers() -> list[str]:
  """The registered sampler names: 'best_of_n', 'hybrid', 'pilaf', 't_pilaf', 't_pilaf_half', 'vanilla'."""
  return sorted(SAMPLERS)


def _check_settings(policy, ref, sampler: str, beta: float, max_new_tokens: int, eos_ids, pad_id: int,
                    allowed_tokens, temperature: float, top_k: int, top_p: float) -> None:
  """Clear, early errors for settings that would otherwise fail deep inside the decode loop."""
  if not isinstance(sampler, str) or sampler not in SAMPLERS:
    raise ValueError(f'sampler={sampler!r} is unknown; allowed: {available_samplers()}.')
  for name, model in (('policy', policy), ('ref', ref)):
    if not isinstance(model, Llama):
      raise TypeError(f'{name} must be a pilaf_jax.Llama module, not {type(model).__name__}.')
  if not (isinstance(beta, (int, float)) and beta > 0):
    raise ValueError(f'beta={beta!r} must be a number > 0 (the KL weight of DPO and of the PILAF mixture).')
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f'max_new_tokens={max_new_tokens!r} must be an integer >= 1.')
  vocab = policy.cfg.vocab_size
  ids = (eos_ids,) if isinstance(eos_ids, (int, np.integer)) else tuple(eos_ids)
  if not ids or not all(isinstance(i, (int, np.integer)) and 0 <= i < vocab for i in ids):
    raise ValueError(f'eos_ids={eos_ids!r} must be one token id or a non-empty sequence of ids in '
                     f'[0, {vocab}).')
  if not (isinstance(pad_id, (int, np.integer)) and 0 <= pad_id < vocab):
    raise ValueError(f'pad_id={pad_id!r} must be a token id in [0, {vocab}).')
  if not temperature >= 0:
    raise ValueError(f'temperature={temperature!r} must be >= 0 (0: greedy, the first arg-max).')
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise ValueError(f'top_k={top_k!r} must be an integer >= 0 (0: no top-k filter).')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p!r} must lie in (0, 1] (1: no nucleus filter).')
  if allowed_tokens is not None:
    allowed = np.asarray(allowed_tokens)
    if allowed.shape != (vocab,) or allowed.dtype != bool:
      raise ValueError(f'allowed_tokens must be a boolean mask of shape ({vocab},) (the vocabulary); got '
                       f'{allowed.dtype} {allowed.shape}.')
    if not any(allowed[i] for i in ids):
      raise ValueError(f'allowed_tokens excludes every stop token {list(ids)}: no response could end.')


def _check_prompts(prompts) -> None:
  if not isinstance(prompts, PromptBatch):
    raise TypeError(f'prompts must be a pilaf_jax.PromptBatch(tokens [B, P], mask [B, P]), not '
                    f'{type(prompts).__name__}.')
  if jnp.ndim(prompts.tokens) != 2 or jnp.shape(prompts.mask) != jnp.shape(prompts.tokens):
    raise ValueError(f'prompts.tokens must be [B, P] and prompts.mask the same shape; got '
                     f'{jnp.shape(prompts.tokens)} and {jnp.shape(prompts.mask)}.')
  if jnp.shape(prompts.tokens)[0] < 1:
    raise ValueError('prompts holds no rows.')


def make_pair_sampler(policy: Llama, ref: Llama, *, sampler: str = 'pilaf', beta: float = 0.1,
                      max_new_tokens: int, eos_ids: Union[int, Sequence[int]], pad_id: int = 0,
                      allowed_tokens: Optional[np.ndarray] = None, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, vanilla_fraction: float = 0.5,
                      best_of_n: int = 8, max_enumerated_responses: int = 4096,
                      jit: bool = True) -> PairSampler:
  """A pair sampler with its settings fixed: fn(policy_params, ref_params, prompts, rng) -> PairBatch.

  sampler: one of available_samplers() (the paper's Table 1):
    'vanilla'    both responses from pi_theta;
    'pilaf'      a vanilla pair for a `vanilla_fraction` share of the prompts (exact, stratified),
                 otherwise y_a ~ pi_plus = softmax((1+beta) h_theta - beta h_ref) and
                 y_b ~ pi_minus = softmax((1-beta) h_theta + beta h_ref), token by token;
    'hybrid'     y_a from pi_theta, y_b from pi_ref;
    'best_of_n'  the highest and lowest DPO implicit reward of `best_of_n` policy samples;
    't_pilaf'    the exact sequence-level PILAF; enumerates every response, so only for tiny tasks
                 (needs allowed_tokens; at most `max_enumerated_responses` responses per prompt);
    't_pilaf_half'  t_pilaf's pi_plus x pi_minus with the practical coin (`vanilla_fraction`).
  beta: the PILAF mixing strength (use your DPO beta). max_new_tokens: R, the response length;
  responses stop at any of eos_ids (EOS is kept in the mask) and are padded with pad_id.
  allowed_tokens: optional [V] bool numpy mask of the tokens a response may contain (applied when
  sampling and in the log-probs alike). temperature / top_k / top_p are applied after mixing;
  temperature=0 decodes greedily (the first arg-max, no noise).

  prompts: a PromptBatch of left-padded tokens [B, P] and mask [B, P]; rng: a jax PRNG key. The
  result is a PairBatch: responses, response_mask, policy_logprobs, ref_logprobs [B, 2, R] (per-token
  log-probs of both models, temperature 1, no filters; policy_logprobs are 0 for hybrid's reference
  response, which the policy did not decode), source [B, 2] (which distribution drew each
  response: pilaf_jax.batches.SOURCE_NAMES), prompts (reordered by 'pilaf': read them from the
  result) and cost (a SamplingCost counted from what ran). The same arguments give the same pairs.
  jit=False returns the plain traceable function (to jit it yourself with your own shardings).
  """
  _check_settings(policy, ref, sampler, beta, max_new_tokens, eos_ids, pad_id, allowed_tokens,
                  temperature, top_k, top_p)
  settings = DecodeSettings(max_new_tokens=int(max_new_tokens),
                            eos_ids=eos_ids if isinstance(eos_ids, (int, np.integer)) else tuple(eos_ids),
                            pad_id=int(pad_id), temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p))
  ctx = SamplerContext(policy=policy, ref=ref, settings=settings, beta=float(beta),
                       allowed_tokens=None if allowed_tokens is None else np.asarray(allowed_tokens, bool),
                       vanilla_fraction=float(vanilla_fraction), best_of_n=int(best_of_n),
                       max_enumerated_responses=int(max_enumerated_responses))
  fn = build_sampler(sampler, ctx)  # Sampler-specific checks (best_of_n >= 2, t_pilaf's size, ...).

  def pairs(policy_params, ref_params, prompts: PromptBatch, rng: jax.Array) -> PairBatch:
    return fn(ctx, policy_params, ref_params, prompts, rng)
  compiled = jax.jit(pairs) if jit else pairs

  @functools.wraps(pairs)
  def sample(policy_params, ref_params, prompts: PromptBatch, rng: jax.Array) -> PairBatch:
    _check_prompts(prompts)  # Shapes only: works under an outer jit too.
    return compiled(policy_params, ref_params, prompts, rng)
  sample.__doc__ = (f'{sampler} pairs (beta={beta}, R={max_new_tokens}): '
                    'fn(policy_params, ref_params, prompts, rng) -> PairBatch.')
  return sample


@functools.lru_cache(maxsize=32)
def _cached_sampler(policy: Llama, ref: Llama, allowed: Optional[tuple], **settings) -> PairSampler:
  allowed_tokens = None if allowed is None else np.asarray(allowed, bool)
  return make_pair_sampler(policy, ref, allowed_tokens=allowed_tokens, **settings)


def sample_pairs(policy: Llama, ref: Llama, policy_params, ref_params, prompts: PromptBatch, rng: jax.Array,
                 *, sampler: str = 'pilaf', beta: float = 0.1, max_new_tokens: int,
                 eos_ids: Union[int, Sequence[int]], pad_id: int = 0,
                 allowed_tokens: Optional[np.ndarray] = None, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, vanilla_fraction: float = 0.5, best_of_n: int = 8,
                 max_enumerated_responses: int = 4096) -> PairBatch:
  """Two responses per prompt from the named sampler, as a PairBatch (see make_pair_sampler).

  The one-call form of make_pair_sampler(...)(policy_params, ref_params, prompts, rng): the jitted
  sampler is cached per (models, settings), so repeated calls with the same settings and prompt
  shape compile once. Settings must be Python values (and allowed_tokens a concrete mask); params,
  prompts and rng may be traced, so this also works inside your own jax.jit.
  """
  _check_settings(policy, ref, sampler, beta, max_new_tokens, eos_ids, pad_id, allowed_tokens,
                  temperature, top_k, top_p)
  allowed = None if allowed_tokens is None else tuple(bool(x) for x in np.asarray(allowed_tokens))
  eos = int(eos_ids) if isinstance(eos_ids, (int, np.integer)) else tuple(int(i) for i in eos_ids)
  fn = _cached_sampler(policy, ref, allowed, sampler=sampler, beta=float(beta),
                       max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=int(pad_id),
                       temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                       vanilla_fraction=float(vanilla_fraction), best_of_n=int(best_of_n),
                       max_enumerated_responses=int(max_enumerated_responses))
  return fn(policy_params, ref_params, prompts, rng)


def dpo_batch_loss(policy: Llama, params, batch: PreferenceBatch, *, beta: float = 0.1,
                   allowed_tokens: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The DPO loss of labelled pairs under `params`, and its metrics; differentiate it in params.

  Policy log-probs are recomputed (teacher-forced, with gradients) for both responses of every pair
  in one forward pass; reference log-probs come from the batch (the sampler filled them), so the
  reference never runs here. Pass the allowed_tokens the pairs were sampled with. Metrics: dpo_loss,
  implicit_margin, implicit_accuracy, chosen_reward, rejected_reward (means over the batch).
  """
  if not isinstance(batch, PreferenceBatch):
    raise TypeError(f'batch must be a pilaf_jax.PreferenceBatch(pairs, a_preferred), '
                    f'not {type(batch).__name__}.')
  pairs = batch.pairs
  b, _, r = pairs.responses.shape
  if jnp.shape(batch.a_preferred) != (b,):
    raise ValueError(f'a_preferred must be [B] = ({b},) booleans; got shape {jnp.shape(batch.a_preferred)}.')
  return preference_loss(policy, params, batch, beta,
                         None if allowed_tokens is None else jnp.asarray(allowed_tokens))


def bradley_terry_labels(rewards: jax.Array, rng: jax.Array) -> jax.Array:
  """Sampled Bradley-Terry labels: a_preferred[i] ~ Bernoulli(sigmoid(rewards[i, 0] - rewards[i, 1])).

  rewards: [B, 2], the reward of each pair's two responses. Returns [B] bool.
  """
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 2 or rewards.shape[1] != 2:
    raise ValueError(f'rewards must be [B, 2]; got shape {rewards.shape}.')
  return _bradley_terry(rewards, rng)


# --- a ready-made problem to try the API on -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticProblem:
  """The embedded synthetic task with a small Llama and a reference fine-tuned on its behaviour data.

  A hidden world (topics, styles, a per-topic utility of each token) stands in for your prompts and
  your labeller: `label` answers Bradley-Terry preferences from the hidden reward, which a learner
  never sees; `rewards` reads it for evaluation.
  """
  task: object  # pilaf_jax.tasks.SyntheticTask
  model: Llama
  ref_params: dict

  @property
  def sampling(self) -> dict:
    """This task's keyword arguments for make_pair_sampler / sample_pairs: max_new_tokens, eos_ids,
    pad_id, allowed_tokens."""
    return dict(max_new_tokens=self.task.response_len, eos_ids=self.task.eos_ids, pad_id=self.task.pad_id,
                allowed_tokens=self.task.allowed_tokens)

  def prompts(self, index: int, n: int, split: str = 'train') -> PromptBatch:
    """Batch `index` of n prompts of 'train' (follows the seed) or 'eval' (held out, fixed by the world)."""
    return jax.tree.map(jnp.asarray, self.task.prompts(split, index, n))

  def rewards(self, pairs: PairBatch) -> np.ndarray:
    """The hidden reward of both responses of every pair, [B, 2] (numpy)."""
    responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
    prompts = jax.tree.map(np.asarray, pairs.prompts)
    return np.stack([self.task.rewards('train', prompts, responses[:, i], mask[:, i]) for i in (0, 1)], 1)

  def label(self, pairs: PairBatch, rng: jax.Array) -> PreferenceBatch:
    """The labeller: Bradley-Terry labels from the hidden reward."""
    return PreferenceBatch(pairs, bradley_terry_labels(self.rewards(pairs), rng))


def synthetic_problem(seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2, response_len: int = 8,
                      sft_steps: int = 150, world_seed: int = 1234) -> SyntheticProblem:
  """The synthetic task at configs/tiny.py's size, a Llama and its SFT reference (seconds on a CPU).

  seed: the model's initialisation, the SFT data and the training-prompt stream; world_seed: the
  hidden world (and the held-out prompts). The reference imitates the task's behaviour policy
  (sft_steps of AdamW, 32 demonstrations a step).
  """
  from pilaf_jax import default_config
  from pilaf_jax.learning.sft import train_reference
  from pilaf_jax.model.llama import LlamaConfig
  from pilaf_jax.streams import INIT_STREAM, SFT_STREAM
  from pilaf_jax.tasks.synthetic import SyntheticTask, SyntheticTaskConfig
  if hidden_size < 2 or hidden_size % 2 or num_layers < 1 or response_len < 3 or sft_steps < 0:
    raise ValueError(f'hidden_size={hidden_size} (even, >= 2), num_layers={num_layers} (>= 1), '
                     f'response_len={response_len} (>= 3), sft_steps={sft_steps} (>= 0).')
  c = default_config.get_config()
  c.task.synthetic.world_seed, c.task.response_len = world_seed, response_len
  task = SyntheticTask(SyntheticTaskConfig.from_config(c.task), jax.random.key(seed))
  model = Llama(LlamaConfig(vocab_size=c.task.vocab_size, hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, num_layers=num_layers, num_heads=2,
                            num_kv_heads=1))
  key = jax.random.key(seed)
  substream = {INIT_STREAM: 0, SFT_STREAM: 1}  # This problem's own key layout (its results predate streams.py).
  sft = types.SimpleNamespace(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0, batch_size=32,
                              steps=sft_steps)
  params = train_reference(task, model, None, sft, lambda stream, i: jax.random.fold_in(
      jax.random.fold_in(key, substream[stream]), i), log=lambda _: None)
  return SyntheticProblem(task=task, model=model, ref_params=params)
