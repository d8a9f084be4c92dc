"""Image tokenizers: LlamaGen's VQ-16 (``vq.py``)."""
