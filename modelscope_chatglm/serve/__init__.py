"""HTTP serving (extra `[serve]`): an OpenAI-compatible API and the classic ChatGLM API over one model.
Imported only by `modelscope-chatglm serve`; `import modelscope_chatglm` never loads it."""
