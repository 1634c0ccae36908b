"""`mhsft infer` and `mhsft deploy`: generation on mhsft's own engine, in the terminal or over HTTP.

infer.py            the infer verb: an interactive chat, or a JSONL batch of dialogues
deploy.py           the deploy verb: the OpenAI-compatible server (FastAPI) on the engine, or another engine's
openai_protocol.py  the request bodies, validation and response pieces of OpenAI's API
engine.py           the continuous-batching engine: slots, prefill, decode (CUDA graphs), several adapters
sampling.py         per-row sampling settings and the sampler that runs on the device
kv_cache.py         the KV cache of fixed slots the engine decodes into
decode_attention.py the engine's grouped-query decode attention
detok.py            streamed detokenization that never splits a character
backends.py         --infer_backend vllm | sglang | lmdeploy: their own servers, started with our flags
"""
