"""modelscope-chatglm: ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B chat models for ModelScope."""
from setuptools import find_packages, setup

setup(
    name='modelscope-chatglm',
    version='0.1.0',
    description='ChatGLM chat models (ChatGLM2/3, ChatGLM-6B) as a ModelScope Tasks.chat pipeline',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',   # what CI runs (3.11); ModelScope 1.40 needs 3.10
    packages=find_packages(include=['modelscope_chatglm', 'modelscope_chatglm.*']) +
    ['modelscope_chatglm.configuration'],
    # The YAML configurations live at the top of the repository and ship inside the package.
    package_dir={'modelscope_chatglm.configuration': 'configuration'},
    # Every file the code opens at run time (tests/test_install.py checks the wheel against the tree).
    package_data={'modelscope_chatglm.configuration': ['*.yaml'],
                  'modelscope_chatglm.modelscope_plugin': ['configuration.json'],
                  'modelscope_chatglm.quantization': ['kernels/*.c', 'kernels/*.h']},
    install_requires=[
        'torch>=2.5',            # SDPA with grouped K/V (enable_gqa)
        'sentencepiece>=0.1.99',
        'safetensors>=0.4',
        'pyyaml>=6',
        # ModelScope and what its pipeline modules import (the bare wheel does not declare them); the
        # plugin patches ModelScope's chat pipeline as 1.40 has it, the version CI tests
        'modelscope>=1.40,<2',
        'addict', 'datasets', 'pillow', 'simplejson', 'sortedcontainers',
    ],
    extras_require={
        # structured output (response_format, forced tool calls): llguidance's grammars, no dependencies of its own
        'structured': ['llguidance>=1.9,<2'],
        'serve': ['fastapi>=0.110', 'uvicorn>=0.29', 'sse-starlette>=2', 'pydantic>=2', 'llguidance>=1.9,<2',
                  'prometheus_client>=0.20'],   # /metrics (imported only by the server's app)
        # gradio 6: ChatInterface hands the history as role messages (5.x gave tuples unless told)
        'web': ['gradio>=6,<7'],
        # Ray Serve: replicas behind one endpoint (serve --ray); 2.60 for late-bound ingress apps and
        # the public request-router API
        'ray': ['ray[serve]>=2.60'],
        # export --gguf: llama.cpp's GGUF writer, its tensor names and quantization (imported only by it)
        'export': ['gguf>=0.19'],
        # triton: the GPU kernels' tests run it on CPU as an interpreter (CUDA builds of torch ship it)
        'test': ['pytest>=7', 'httpx', 'openai>=1', 'pexpect', 'playwright', 'numpy', 'jsonschema',
                 'triton; platform_system == "Linux"'],
    },
    entry_points={'console_scripts': ['modelscope-chatglm=modelscope_chatglm.cli:main']},
    license='Apache-2.0',
    classifiers=['Programming Language :: Python :: 3', 'License :: OSI Approved :: Apache Software License'],
)
