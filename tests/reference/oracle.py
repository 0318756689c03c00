"""Run ModelScope's reference ChatGLM code on a model directory and save what it computes.

This script runs in the side venv (transformers==4.40.2 + modelscope + CPU torch), never in ours:
    python oracle.py JOB.json OUT.pt

JOB.json: {"model_dir": ..., "family": "glm1"|"glm2", "rope": "divide"|"base", "cases": [...]}.
glm1 runs `modelscope/models/nlp/chatglm`, glm2 (also for ChatGLM3 checkpoints) `.../chatglm2`; an
int8/int4 directory (config.json's quantization_bit) without a GPU as THUDM's int4 repositories run on the
CPU (`run_quantized_on_the_cpu`).
Each case is one of
    {"kind": "logits", "name": ..., "prompts": [[ids], ...]}      left-padded as the tokenizer pads
    {"kind": "greedy", "name": ..., "prompt": [ids], "max_new_tokens": n}
    {"kind": "chat", "name": ..., "queries": [...], "max_new_tokens": n}   greedy multi-turn _chat
    {"kind": "tokenize", "name": ..., "texts": [...]}       -> [[ids, decode(ids)], ...]
    {"kind": "decode", "name": ..., "ids": [[ids], ...]}     -> [decode(ids), ...]
Optional top-level keys:
    "adapter": {"kind": "lora", "path": DIR}                          peft's PeftModel.from_pretrained
               {"kind": "ptuning", "path": DIR, "pre_seq_len": n, "prefix_projection": bool}
                                                                      as THUDM's ptuning/main.py loads it
    "make_lora": {"out": DIR, "r", "alpha", "targets", "rslora", "safe", "seed"}
                                                                      write a LoRA adapter with peft (random A, B)
    "save_merged": DIR                                                peft merge_and_unload, saved in the hub layout
OUT.pt: {name: tensor | list}.
"""
import json
import sys

import torch


def run_quantized_on_the_cpu():
    """The reference builds an int8/int4 model for CUDA only: its `quantize()` moves every weight to
    torch.cuda.current_device(), and cpm_kernels' fatbin unpacks int4. THUDM's int4/int8 repositories run
    on the CPU by dequantizing to fp32 (`extract_int4_weight_to_float` in their quantization_kernels.c:
    per byte, the high nibble is the even column, both nibbles sign-extended, times the row's scale).
    Where there is no GPU, do that in the reference's place; the rest is the reference's own code."""
    import modelscope.models.nlp.chatglm.quantization as v1
    import modelscope.models.nlp.chatglm2.quantization as v2
    torch.cuda.current_device = lambda: 'cpu'

    def extract_weight(weight, scale, bits):
        if bits == 4:
            byte = weight.to(torch.int16)                  # the signed byte, widened
            high, low = byte >> 4, ((byte & 0xF) ^ 8) - 8   # both nibbles, sign-extended
            weight = torch.stack([high, low], dim=-1).flatten(-2)
        return weight.float() * scale.float()[:, None]

    v1.extract_weight_to_half = v2.extract_weight_to_half = extract_weight


def load(model_dir, family, rope):
    if json.load(open(f'{model_dir}/config.json')).get('quantization_bit') and not torch.cuda.is_available():
        run_quantized_on_the_cpu()
    if family == 'glm1':
        from modelscope.models.nlp.chatglm.text_generation import ChatGLMForConditionalGeneration
        model = ChatGLMForConditionalGeneration._instantiate(model_dir=model_dir, torch_dtype=torch.float32)
        return model.float().eval(), model.tokenizer
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


def glm1_batch(tokenizer, prompts):
    """The v1 tokenizer's own padding: 2D position ids and the bool prefix/causal mask."""
    batch = tokenizer.pad({'input_ids': prompts}, padding=True, return_tensors='pt')
    return batch['input_ids'], batch['attention_mask'], batch['position_ids']


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


def with_ptuning(job, family):
    """The model as ptuning/main.py runs a checkpoint: the base with pre_seq_len/prefix_projection in its
    config, then the checkpoint's prefix encoder loaded over it."""
    import os
    import shutil
    import tempfile
    spec = job['adapter']
    work = tempfile.mkdtemp()
    for name in os.listdir(job['model_dir']):
        os.symlink(os.path.join(job['model_dir'], name), os.path.join(work, name))
    config = json.load(open(os.path.join(job['model_dir'], 'config.json')))
    config.update(pre_seq_len=spec['pre_seq_len'], prefix_projection=spec['prefix_projection'])
    os.remove(os.path.join(work, 'config.json'))
    json.dump(config, open(os.path.join(work, 'config.json'), 'w'))
    model, tokenizer = load(work, family, job.get('rope', 'divide'))
    prefix = torch.load(os.path.join(spec['path'], 'pytorch_model.bin'), weights_only=True)
    model.transformer.prefix_encoder.load_state_dict(
        {k[len('transformer.prefix_encoder.'):]: v for k, v in prefix.items()})
    shutil.rmtree(work)
    return model.float().eval(), tokenizer


def make_lora(model, spec):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(spec.get('seed', 0))
    config = LoraConfig(r=spec['r'], lora_alpha=spec['alpha'], target_modules=spec['targets'], lora_dropout=0.0,
                        init_lora_weights=False, use_rslora=spec.get('rslora', False))
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(spec['out'], safe_serialization=spec.get('safe', True))


@torch.no_grad()
def main(job_path, out_path):
    job = json.load(open(job_path))
    family = job.get('family', 'glm2')
    adapter = job.get('adapter') or {}
    if adapter.get('kind') == 'ptuning':
        model, tokenizer = with_ptuning(job, family)
    else:
        model, tokenizer = load(job['model_dir'], family, job.get('rope', 'divide'))
    if 'make_lora' in job:
        make_lora(model, job['make_lora'])
        torch.save({}, out_path)
        return
    if adapter.get('kind') == 'lora':
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter['path']).eval()
    if 'save_merged' in job:   # the merged weights (fp32) and the base's other files: a hub-layout model
        import os
        import shutil
        from safetensors.torch import save_file
        out = job['save_merged']
        os.makedirs(out)
        merged = model.merge_and_unload()
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, os.path.join(out, 'model.safetensors'))
        for name in os.listdir(job['model_dir']):
            if not name.endswith(('.bin', '.safetensors', '.index.json')):
                shutil.copy(os.path.join(job['model_dir'], name), out)
    eos, pad = (model.config.eos_token_id, model.config.pad_token_id) if family == 'glm1' else (2, 0)
    out = {}
    for case in job['cases']:
        if case['kind'] == 'logits' and family == 'glm1':
            if len(case['prompts']) == 1:   # the model derives mask and positions itself
                logits = model(input_ids=torch.tensor(case['prompts'])).logits
            else:
                ids, mask, pos = glm1_batch(tokenizer, case['prompts'])
                logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
            out[case['name']] = logits.float()
        elif case['kind'] == 'logits':
            ids, mask, pos = left_pad(case['prompts'])
            padded = not bool(mask.all())
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask if padded else None).logits
            out[case['name']] = logits.float()
        elif case['kind'] == 'greedy':
            ids = torch.tensor([case['prompt']])
            gen = model.generate(input_ids=ids, max_new_tokens=case['max_new_tokens'], do_sample=False,
                                 use_cache=True, eos_token_id=eos, pad_token_id=pad)
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
        elif case['kind'] == 'decode':
            out[case['name']] = [tokenizer.decode(ids) for ids in case['ids']]
        else:
            raise ValueError(case['kind'])
    torch.save(out, out_path)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
