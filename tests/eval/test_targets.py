"""mhsft/eval/targets.py: in-process evaluation runs on the serving engine. Its greedy replies are those of
transformers' `generate`, one conversation at a time (what the evaluation's own loop did before the engine), and
its log-likelihoods follow lm-eval's definition (context and continuation encoded apart, the last max_length
tokens kept), for the base model and an adapter alike."""

from __future__ import annotations

import pytest
import torch

from mhsft.args import GenerationArguments
from mhsft.eval.targets import EngineTarget, encode_pair
from mhsft.model import BASE, load_for_inference
from mhsft.serve.engine import Engine

CONVERSATIONS = [
    [{"role": "user", "content": "最近总是失眠，心里很乱。"}],
    [{"role": "system", "content": "你是一位心理咨询师。"}, {"role": "user", "content": "我和父母吵架了"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，想聊些什么？"},
     {"role": "user", "content": "考试焦虑怎么办"}],
    [{"role": "user", "content": "谢谢"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def loaded():
    """The tiny model with its weights drawn again at a larger scale, and a random LoRA named `ft`: the random
    tiny model repeats one token under greedy decoding, which would make equal replies prove nothing."""
    from peft import LoraConfig, get_peft_model

    model, tok, _ = load_for_inference("builtin:tiny", None, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, cfg, adapter_name="ft").eval(), tok, ["ft"]


def _generate(model, tok, messages, n: int) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_greedy_replies_equal_transformers_generate(loaded):
    model, tok, names = loaded
    engine = Engine(model, tok, names, max_batch_size=3).start()  # fewer slots than conversations
    try:
        for adapter in (BASE, "ft"):
            got = EngineTarget(engine, adapter).chat(CONVERSATIONS, GenerationArguments(), 24)
            if adapter is BASE:
                with model.disable_adapter():
                    want = want_base = [_generate(model, tok, m, 24) for m in CONVERSATIONS]
            else:
                model.set_adapter("ft")
                want = [_generate(model, tok, m, 24) for m in CONVERSATIONS]
            assert got == want, adapter
            assert all(len(set(r)) > 5 for r in got)  # real text, not one repeated token
        assert got != want_base
    finally:
        engine.stop()


def _lm_eval_reference(model, tok, ctx: str, cont: str, max_length: int) -> float:
    c, k = encode_pair(tok, ctx, cont)
    inp = (c + k)[-max_length:]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([inp])).logits[0].float().log_softmax(-1)
    start = len(inp) - len(k)
    return sum(float(logp[start - 1 + j, t]) for j, t in enumerate(k))


def test_loglikelihood_is_lm_evals(loaded):
    model, tok, names = loaded
    reqs = [("问题：失眠的常见原因是什么？\n答案：", f" {x}") for x in "ABCD"]
    reqs += [
        ("下列哪项属于焦虑症状？ ", "心悸和出汗"),
        ("下列哪项属于焦虑症状？ ", "食欲很好"),
    ]  # trailing space moves
    reqs += [("很长的上下文" * 40 + "答案：", " B")]  # longer than max_length: the last 64 tokens are kept
    engine = Engine(model, tok, names)
    model.set_adapter("ft")
    for adapter in ("ft",):
        got = EngineTarget(engine, adapter, max_length=64).loglikelihood(reqs)
        engine._use_adapter(adapter)
        want = [_lm_eval_reference(model, tok, c, k, 64) for c, k in reqs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-4)
