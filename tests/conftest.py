import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_llama(vocab_size=32, seed=0, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size=32, seed=0, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]()


@pytest.fixture(scope="session")
def default_model():
    import cfgen

    return cfgen.load_default_model()
