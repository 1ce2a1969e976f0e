
import pytest
import torch

# Tiny models gain nothing from a second thread, and contention makes it spin.
torch.set_num_threads(1)


def tiny_llama(vocab_size=32, seed=0, init=0.02, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init, **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size=32, seed=0, init=0.02, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init, **kw,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]()


@pytest.fixture(scope="session")
def default_model():
    import cfgen

    return cfgen.load_default_model()


class CharTokenizer:
    """A tokenizer stand-in: one id per character (3 + ord % 29), ids 0-2 reserved (pad, bos, eos)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 29) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + (i - 3) % 26) if i >= 3 else f"<{i}>" for i in ids)

    def get_vocab(self):
        return {chr(ord("a") + i): i + 3 for i in range(29)}
