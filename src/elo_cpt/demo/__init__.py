"""The embedded demo, a guest of the method: the default model (SmolLM2-135M-Instruct, converted once from the GGUF
file of a PyPI wheel) and the default corpora (Debian packages' German, English and Korean text, cleaned from roff,
Mallard, HTML and fortune files). `elo run` with no model or corpora uses them; nothing of the method depends on
them, and a user's own models and corpora never pass through this package.
"""
