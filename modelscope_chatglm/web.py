"""A chat page (extra `[web]`: gradio): streaming replies, history, clear, generation settings.

    modelscope-chatglm web --config chatglm3-6b --port 7860

Built on current gradio's ChatInterface (the official ChatGLM demos use gradio 3 APIs that were
removed since). Imported only by the `web` command.
"""
from __future__ import annotations

from .chat import ChatModel


def _text(content) -> str:
    """gradio message content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get('text', ''))
    if isinstance(content, (list, tuple)):
        return ''.join(_text(part) for part in content)
    return ''


def to_messages(history) -> list:
    """gradio's chat history -> the role messages ChatModel takes (text parts only)."""
    return [{'role': m['role'], 'content': _text(m.get('content'))} for m in history or []
            if m.get('role') in ('user', 'assistant')]


def build_app(chat: ChatModel, title: str = 'ChatGLM'):
    import gradio as gr
    from .engine.scheduler import DEFAULT_MAX_BATCH

    def respond(message, history, max_new_tokens, temperature, top_p):
        options = {'max_new_tokens': int(max_new_tokens), 'top_p': float(top_p)}
        if temperature > 0:
            options.update(do_sample=True, temperature=float(temperature))
        else:
            options['do_sample'] = False
        # Several visitors at once share the model's engine: their replies are generated side by side.
        turn = chat.turn(_text(message), to_messages(history), **options)
        text = ''
        for delta in turn:
            text += delta
            yield text
        yield turn.response if isinstance(turn.response, str) else str(turn.response)

    settings = [
        gr.Slider(1, min(4096, chat.context_length), value=min(512, chat.context_length), step=1,
                  label='max new tokens'),
        gr.Slider(0.0, 1.5, value=chat.defaults.temperature, step=0.05, label='temperature (0 = greedy)'),
        gr.Slider(0.05, 1.0, value=chat.defaults.top_p, step=0.05, label='top p'),
    ]
    return gr.ChatInterface(respond, additional_inputs=settings, title=title,
                            description=f'{chat.name} ({chat.family}, {chat.device}, {chat.dtype})',
                            concurrency_limit=DEFAULT_MAX_BATCH)   # a batch's worth of visitors at once


def serve_web(chat: ChatModel, host: str = '127.0.0.1', port: int = 7860):
    build_app(chat).queue().launch(server_name=host, server_port=port, show_error=True)
