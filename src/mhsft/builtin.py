"""`builtin:tiny`: a tiny random-init Qwen2 chat model built locally, so that every stage (train, merge,
serve, eval) can run end to end on CPU in seconds with no model hub.

It is shaped like Qwen2.5-Instruct where it matters to our code: Qwen2ForCausalLM with tied embeddings,
GQA, rope_theta 1e6, a byte-level BPE tokenizer with Qwen's pre-tokenizer regex and special tokens,
`<|im_end|>` as eos, an embedding matrix larger than the tokenizer (Qwen pads its vocabulary too), and
Qwen2.5-Instruct's exact chat template. The BPE vocabulary is trained in-process on the demo corpus.

The model is built once into `cache_dir()/builtin/tiny-<hash>`; the hash covers everything that
decides the bytes written (recipe, corpus, library versions), so a changed recipe gets a new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from mhsft.utils import UserError, cache_dir, get_logger

BUILTIN_PREFIX = "builtin:"
RECIPE_VERSION = 1  # bump when the recipe below changes in a way the hash can't see
SEED = 1234

# Qwen2.5-7B-Instruct's chat template, verbatim (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's order: pad/bos, start, eos

# Qwen2's pre-tokenizer regex (digits split one by one, CJK runs kept together before BPE).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TINY = {
    "bpe_vocab_size": 2048,
    "pad_vocab_to": 64,  # embedding rows rounded up past the tokenizer, as Qwen does (151936 > 151665)
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "init_std": 0.02,
}
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def demo_corpus_path() -> Path:
    """The packaged demo dialogues (ShareGPT JSONL) the tokenizer is trained on."""
    return Path(str(resources.files("mhsft") / "assets" / "demo_dialogues.jsonl"))


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def resolve_model(name_or_path: str) -> str:
    """`builtin:tiny` -> path of the cached tiny model (built on first use); anything else unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name != "tiny":
        raise UserError(f"unknown built-in model {name_or_path!r} (available: builtin:tiny)")
    return str(ensure_tiny())


def recipe_hash() -> str:
    """Hash of everything that decides the built files' bytes."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    parts = [RECIPE_VERSION, SEED, TINY, QWEN25_CHAT_TEMPLATE, PRETOKENIZE_REGEX, SPECIAL_TOKENS]
    parts += [transformers.__version__, tokenizers.__version__, torch.__version__.split("+")[0]]
    h.update(json.dumps(parts, sort_keys=True).encode())
    h.update(demo_corpus_path().read_bytes())
    return h.hexdigest()[:12]


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in MODEL_FILES)


def ensure_tiny(root: Path | None = None) -> Path:
    """Return the tiny model's folder, building it first when missing. Safe when several processes
    race: each builds into its own temporary folder and renames it into place; the loser keeps the
    winner's copy (the builds are byte-identical anyway)."""
    root = Path(root) if root is not None else cache_dir() / "builtin"
    final = root / f"tiny-{recipe_hash()}"
    if _is_complete(final):
        return final
    from filelock import FileLock

    try:
        root.mkdir(parents=True, exist_ok=True)
        # One builder at a time (torchrun starts every rank at once); the others wait, then reuse its copy.
        with FileLock(str(root / f".tiny-{recipe_hash()}.lock"), timeout=600):
            if _is_complete(final):
                return final
            get_logger().info(f"building the built-in tiny model into {final} (once)")
            # A folder only ever appears here complete (by rename), so an incomplete one was damaged by hand.
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-tmp-", dir=root))
            try:
                tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (CI)
                build_tiny(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write the built-in tiny model under {root}: {e}") from e
    return final


def _corpus_texts() -> list[str]:
    texts = []
    with open(demo_corpus_path(), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            # The template's own words too, so that role headers become single tokens as in Qwen.
            texts += [DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n", rec.get("system") or ""]
            texts.extend(turn["value"] for turn in rec["conversations"])
    return texts


def build_tokenizer():
    """Train the byte-level BPE on the demo corpus and wrap it as Qwen2.5-Instruct's tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["bpe_vocab_size"],
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus_texts(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for t in SPECIAL_TOKENS:  # ids right after the BPE vocabulary, in Qwen's order
        vocab[t] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=TINY["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]]}
    )
    tok.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])  # no-op for ones already added
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    n = len(model["vocab"])
    if ids != [n, n + 1, n + 2] or len(tok) != n + 3:  # guard against a silent recipe break
        raise RuntimeError(
            f"special tokens were not added as expected: {dict(zip(SPECIAL_TOKENS, ids, strict=True))}"
        )
    return tok


def build_tiny(out_dir: str | os.PathLike) -> Path:
    """Write the tiny model and tokenizer into `out_dir` (deterministic: same recipe -> same bytes)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer()
    pad_id, eos_id = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    step = TINY["pad_vocab_to"]
    vocab_size = (len(tok) + step - 1) // step * step
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=TINY["hidden_size"],
        intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_hidden_layers"],
        num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_key_value_heads"],
        max_position_embeddings=TINY["max_position_embeddings"],
        rope_theta=TINY["rope_theta"],
        rms_norm_eps=TINY["rms_norm_eps"],
        tie_word_embeddings=TINY["tie_word_embeddings"],
        initializer_range=TINY["init_std"],
        use_sliding_window=False,
        max_window_layers=TINY["num_hidden_layers"],
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.random.fork_rng(devices=[]):  # the constructor's own init must not disturb the caller's RNG
        model = Qwen2ForCausalLM(config)
    # Re-initialise from a private generator: the weights then depend neither on the global RNG (threads)
    # nor on how a transformers version happens to order its own init.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * TINY["init_std"])
    model.to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    import transformers.utils.logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(out)
    (out / "README.md").write_text(
        "# mhsft builtin:tiny\n\nA tiny randomly initialised Qwen2 chat model built by mhsft for tests and demos.\n"
        "Its tokenizer is a byte-level BPE trained on mhsft's own demo corpus. It generates noise.\n",
        encoding="utf-8",
    )
    return out
