"""scalelora: LoRA fine-tuning of transformer sequence classifiers with a custom Accelerate loop."""

__version__ = "0.1.0"
