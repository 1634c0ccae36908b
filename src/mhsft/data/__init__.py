"""`mhsft data`: read, validate, convert and clean counseling dialogues, and the data every later stage reads.

commands.py  the verb: inspect | validate | convert | clean
schema.py    Dialogue, Turn, Source, DataError: the one shape every format is read into
readers.py   the formats (ShareGPT, messages, Alpaca, EmoLLM, CPsyCounD, PsyQA, ...), streamed, and JSONL writing
json_files.py  the records of a JSON / JSONL file, each bad one a DataError; encoding checks and hints
json_array.py  a JSON array's elements one at a time, carrying on past a broken one
loader.py    --dataset specs (files, folders, hub ids, `#N` samples) into train / validation splits with rejects
clean.py     repairs, PII and hotline rules, near-duplicate removal (MinHash)
crisis.py    a client turn that signals self-harm or suicide, a reply that points to help (by their words)
render.py    a dialogue under the chat template, with assistant-only labels (IGNORE_INDEX elsewhere)
stats.py     token and turn statistics for `inspect`
binpack.py   best-fit-decreasing packing of samples into rows (the trainer's --packing, inspect's estimate)
"""
