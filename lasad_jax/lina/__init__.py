"""LINA (arXiv 2601.22630): masked autoregression over continuous tokens with bidirectional
linear attention. ``../shared/LINA.md`` is the specification; ``lasad_jax/lina/README.md`` says
what is built and where it departs from or guesses at the PyTorch code.

    attention.py   lina_attention: division-normalised bidirectional linear attention
    model.py       class encoder, image transformer (encoder/decoder split), AdaLN diffusion head
    flow.py        masking schedule, flow-matching loss, Euler sampler (masked AR, CFG ramp)
    objective.py   the hooks the shared training loop calls for a LINA config
    convert.py     LINA PyTorch state dict -> parameters
"""
