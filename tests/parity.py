"""The parity checks shared by the ChatGLM2/3 and ChatGLM-6B tests: the same prompts through our model and
the reference oracle (conftest's `reference` fixture)."""
from modelscope_chatglm.models.base import left_pad

TOL = 1e-4


def long_prompt(model, n=320):
    """A prompt of more than 300 tokens built from real text."""
    ids = model.build_inputs('介绍下清华大学。' + 'The quick brown fox jumps over the lazy dog. 1234 ' * 40)
    assert len(ids) > n, len(ids)
    return ids[:n] if model.family != 'glm1' else ids   # ChatGLM-6B prompts must end in [gMASK] <sop>


def check_logits(model, ref, name, prompts):
    ids, mask = left_pad(prompts, model.tokenizer.pad_id)
    ours = model.logits(ids, mask if len(prompts) > 1 else None)
    theirs = ref[name]
    assert ours.shape == theirs.shape
    valid = mask.bool()
    diff = (ours - theirs)[valid].abs().max().item()
    print(f'\n[parity {model.family}] {name}: max |logit diff| = {diff:.3g} over {int(valid.sum())} positions')
    assert diff < TOL
    return diff


def run_parity(model, model_dir, reference, rope='divide', with_chat=True):
    """Logits (single, left-padded batch, > 300 tokens), greedy tokens with the cache, and a three-turn
    greedy chat, ours against the reference."""
    single = model.build_inputs('你好，请介绍一下你自己。', [('你好', '你好！有什么可以帮助你的吗？')])
    batch = [model.build_inputs('hi'), single]
    long = long_prompt(model)
    greedy_prompt = model.build_inputs('你好')
    cases = [
        {'kind': 'logits', 'name': 'single', 'prompts': [single]},
        {'kind': 'logits', 'name': 'batch', 'prompts': batch},
        {'kind': 'logits', 'name': 'long', 'prompts': [long]},
        {'kind': 'greedy', 'name': 'greedy', 'prompt': greedy_prompt, 'max_new_tokens': 24},
    ]
    queries = ['你好', '介绍下清华大学', 'Tell me a joke about   spaces\tand tabs.']
    if with_chat:
        cases.append({'kind': 'chat', 'name': 'chat', 'queries': queries, 'max_new_tokens': 20})
    family = 'glm1' if model.family == 'glm1' else 'glm2'
    ref = reference({'model_dir': model_dir, 'family': family, 'rope': rope, 'cases': cases})
    check_logits(model, ref, 'single', [single])
    check_logits(model, ref, 'batch', batch)
    check_logits(model, ref, 'long', [long])
    assert model.generate(greedy_prompt, max_new_tokens=24, do_sample=False) == ref['greedy']
    if with_chat:
        history, replies = [], []
        for q in queries:
            response, history = model.chat(q, history, do_sample=False, max_new_tokens=20)
            replies.append(response)
        assert replies == ref['chat']
        assert [h[1] for h in history] == ref['chat']
    return ref
