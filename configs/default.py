"""The embedded default: online DPO with PILAF on the synthetic task (what main runs without --config)."""
from pilaf_jax import default_config


def get_config():
  return default_config.get_config()
