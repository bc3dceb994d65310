"""pilaf_jax: PILAF preference sampling and DPO in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name='pilaf_jax',
    version='0.1.0',
    description='PILAF (Policy-Interpolated Learning for Aligned Feedback): preference sampling for '
                'RLHF, with DPO, in JAX/Flax.',
    packages=find_packages(include=['pilaf_jax', 'pilaf_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        # Ranges that the test suite has run against (APIs of these move quickly).
        'jax>=0.10,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12,<0.13',
        'ml-collections>=1.0,<2',
        'absl-py',
        'numpy',
        'scipy',
        'tqdm',
        'tensorboardX',  # TensorBoard event files without TensorFlow.
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist'],
        # Real checkpoints, tokenizers and datasets (not needed for the embedded task).
        'hf': ['transformers', 'safetensors', 'tensorflow-datasets', 'grain'],
    },
)
