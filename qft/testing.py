"""In-process tiny models and tokenizers for tests and examples (no downloads)."""

from __future__ import annotations

import torch


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) built in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ("<s>", "</s>", "<pad>"):
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               vocab: int = 259, seed: int = 0, tie: bool = False):
    """A randomly initialized LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=256,
                      eos_token_id=257, pad_token_id=258)
    return LlamaForCausalLM(cfg).eval()


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps real numbers onto a small grid. "
    "A language model predicts the next token from the ones before it. ") * 40


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64, failing on non-finite output (a poisoned, unwritten element)."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()
