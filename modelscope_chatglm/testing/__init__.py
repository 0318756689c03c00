"""What tests, benchmarks and the offline demo build: tiny random checkpoints in the exact hub layout.

`python -m modelscope_chatglm.testing.tiny OUT` writes one (`--help` for the options).
"""
