"""Run ModelScope's reference ChatGLM2 code on a model directory and save what it computes.

This script runs in the side venv (transformers==4.40.2 + modelscope + CPU torch), never in ours:
    python chatglm2_oracle.py JOB.json OUT.pt

JOB.json: {"model_dir": ..., "rope": "divide"|"base", "cases": [...]}, each case one of
    {"kind": "logits", "name": ..., "prompts": [[ids], ...]}      left-padded as the tokenizer pads
    {"kind": "greedy", "name": ..., "prompt": [ids], "max_new_tokens": n}
    {"kind": "chat", "name": ..., "queries": [...], "max_new_tokens": n}   greedy multi-turn _chat
    {"kind": "tokenize", "name": ..., "texts": [...]}       -> [[ids, decode(ids)], ...]
OUT.pt: {name: tensor | list}.
"""
import json
import sys

import torch


def load(model_dir, rope):
    from modelscope.models.nlp.chatglm2.text_generation import ChatGLM2ForConditionalGeneration
    from modelscope.models.nlp.chatglm2.tokenization import ChatGLM2Tokenizer
    model = ChatGLM2ForConditionalGeneration._instantiate(model_dir=model_dir, torch_dtype=torch.float32)
    model = model.float().eval()
    if rope == 'base':
        # ChatGLM3-32K semantics: rope_ratio multiplies the RoPE base instead of dividing positions.
        rotary = model.transformer.rotary_pos_emb
        ratio, rotary.rope_ratio = rotary.rope_ratio, 1
        impl = rotary.forward_impl
        rotary.forward_impl = lambda seq_len, n_elem, dtype, device, base=10000: impl(
            seq_len, n_elem, dtype, device, base=10000 * ratio)
    # THUDM's tokenizer sets clean_up_tokenization_spaces=False (ModelScope's copy leaves the
    # transformers default, which rewrites " ." to "."); compare against the official behaviour.
    tokenizer = ChatGLM2Tokenizer(f'{model_dir}/tokenizer.model', clean_up_tokenization_spaces=False)
    return model, tokenizer


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
        pos[row, width - len(p):] = torch.arange(len(p))
    return ids, mask, pos


@torch.no_grad()
def main(job_path, out_path):
    job = json.load(open(job_path))
    model, tokenizer = load(job['model_dir'], job.get('rope', 'divide'))
    out = {}
    for case in job['cases']:
        if case['kind'] == 'logits':
            ids, mask, pos = left_pad(case['prompts'])
            padded = not bool(mask.all())
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask if padded else None).logits
            out[case['name']] = logits.float()
        elif case['kind'] == 'greedy':
            ids = torch.tensor([case['prompt']])
            gen = model.generate(input_ids=ids, max_new_tokens=case['max_new_tokens'], do_sample=False,
                                 use_cache=True, eos_token_id=2, pad_token_id=0)
            out[case['name']] = gen[0, ids.shape[1]:].tolist()
        elif case['kind'] == 'chat':
            history, replies = [], []
            for query in case['queries']:
                response, history = model._chat(tokenizer, query, history, do_sample=False,
                                                max_length=2048, max_new_tokens=case['max_new_tokens'])
                replies.append(response)
            out[case['name']] = replies
        elif case['kind'] == 'tokenize':
            out[case['name']] = [[ids, tokenizer.decode(ids)] for ids in
                                 (tokenizer.encode(t, add_special_tokens=False) for t in case['texts'])]
        else:
            raise ValueError(case['kind'])
    torch.save(out, out_path)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
