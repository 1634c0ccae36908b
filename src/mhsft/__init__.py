"""mhsft: fine-tune, serve and evaluate Chinese counseling chat models with LoRA, in one CLI."""

__version__ = "0.1.0"
