from setuptools import find_packages, setup

setup(
    name="kerasdiffusion",
    version="0.1.0",
    description="Stable Diffusion in Keras 3 on TensorFlow, with an XLA-compiled denoising loop.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kerasdiffusion", "kerasdiffusion.*", "weights_conversion", "weights_conversion.*"]),
    # The built-in model kerasdiffusion/shapes ships as a converted folder (sources.BUILTIN_MODELS).
    package_data={"kerasdiffusion": ["data/*", "models/README.md", "models/shapes/*", "models/shapes/tokenizer/*"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "safetensors>=0.8",  # safe_open(..., backend="pread")
        "huggingface_hub",
        "tqdm",
    ],
    extras_require={
        # Keras' JAX backend, the second backend every call runs on (TensorFlow stays the default).
        "jax": ["jax>=0.4.30"],
        # PyTorch, diffusers, transformers and peft are the reference implementation the tests compare against
        # (diffusers' LMS scheduler needs scipy, the callback tests tensorboard); jax runs the same tests on
        # Keras' JAX backend.
        "test": ["pytest", "torch>=2.1", "diffusers>=0.30", "transformers>=4.40", "peft>=0.10", "scipy",
                 "jax>=0.4.30", "hypothesis", "tensorboard", "nbclient", "nbformat", "ipykernel"],
        # The peers the benchmarks compare against (never needed to use kerasdiffusion).
        "bench": ["keras-cv==0.9.0", "torch>=2.1", "diffusers>=0.30", "transformers>=4.40", "psutil"],
        # Only needed to read legacy .ckpt files through torch.load(weights_only=True); our own
        # restricted unpickler reads them without it.
        "torch": ["torch>=2.1"],
    },
    entry_points={"console_scripts": ["kerasdiffusion=kerasdiffusion.cli:main"]},
)
