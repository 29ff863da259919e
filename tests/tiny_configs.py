"""Tiny model configs shared by the tests (fast to build, big enough to exercise every layer kind)."""

#: a 2-layer Llama with grouped-query attention, as transformers' LlamaConfig takes it.
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
)
