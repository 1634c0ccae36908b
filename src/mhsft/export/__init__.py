"""`mhsft export` and `mhsft upload`: a LoRA adapter merged into its base model, checked, and published.

merge.py          the export verb: merge, write the side files, verify, publish the folder atomically
merge_weights.py  the merge itself, one output shard at a time (a 32B model in a few GB of memory)
merge_verify.py   the check: merged logits against base + adapter through PEFT
upload.py         the upload verb: ModelScope or Hugging Face, with a model card
modelcard.py      the model card (README.md) built from what the folder records
"""
