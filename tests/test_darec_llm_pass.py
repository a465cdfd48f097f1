"""The LLM pass at scale (model/darec.py ``forward``): the memory-efficient attention path against the dense
reference, token padding for CUDA's kernel, gradient checkpointing and bf16 autocast.

Tolerances: sdpa and eager differ only in float32 summation order (1e-5 on states of size ~1); padding and
checkpointing change nothing but shapes and the order of work (1e-6); bf16 keeps 8 bits of mantissa (5e-2).
The no-future-leak perturbation tests (test_darec_masks.py, test_item_level.py) run on the sdpa path, the default.
"""

from __future__ import annotations

import pytest
import torch
from darec_testing import BACKBONES, DAREC_TEST_FIXTURES, build, first_batch, settings_for

from recbole_darec.model import attention as attention_module
from recbole_darec.model import darec_core
from recbole_darec.model.attention import ATTN_IMPLEMENTATION, CPU_PRODUCT_ATTENTION_BELOW, _sdpa_attention
from recbole_darec.model.masks import attention_mask

pytestmark = DAREC_TEST_FIXTURES

SEQ = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
SEQ_LEN = torch.tensor([5, 3])


def user_states(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.encode_sequences(SEQ, SEQ_LEN, torch.tensor([1, 2]))


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_sdpa_gives_the_dense_reference_states(tmp_path, text_data, llm_path, context_masking):
    states = {}
    for attention in ("eager", "sdpa"):
        _, model, _, _, _ = build("DARecTokens", text_data[1], settings_for(
            tmp_path, text_data, llm_path=llm_path, context_masking=context_masking, attention=attention))
        assert model.llm.config._attn_implementation == {"eager": "eager", "sdpa": ATTN_IMPLEMENTATION}[attention]
        states[attention] = user_states(model)
    torch.testing.assert_close(states["sdpa"], states["eager"], rtol=0, atol=1e-5)


def test_unknown_attention_is_refused(tmp_path, text_data):
    with pytest.raises(ValueError, match="attention='flash'"):
        build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, attention="flash"))


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_padding_tokens_to_a_multiple_changes_no_state(tmp_path, text_data, llm_path):
    _, model, _, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_path=llm_path))
    assert model.pad_tokens_to == 1  # on CPU; 8 on CUDA
    plain = user_states(model)
    model.pad_tokens_to = 8
    torch.testing.assert_close(user_states(model), plain, rtol=0, atol=1e-6)


def loss_and_grads(model, batch, seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the adapters' dropout draws the same masks in both runs
    loss = sum(model.calculate_loss(batch))
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name", ["DARecTokens", "DARec"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, text_data, llm_path, model_name):
    results = []
    for checkpointing in (False, True):
        extra = {"sequence_layers": 1, "whiten_dim": 16} if model_name == "DARec" else {}
        _, model, train_data, _, _ = build(model_name, text_data[1], settings_for(
            tmp_path, text_data, llm_path=llm_path, gradient_checkpointing=checkpointing, adapter_dropout=0.2,
            **extra))
        assert model.llm.is_gradient_checkpointing == checkpointing
        results.append(loss_and_grads(model, first_batch(train_data)))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert grads_on.keys() == grads_off.keys()
    assert any("adapters" in name for name in grads_on)  # gradients reach the adapters inside the recomputed layers
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_autocast_keeps_the_states(tmp_path, text_data):
    states = {}
    for bf16 in (False, True):
        _, model, _, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_bf16=bf16))
        states[bf16] = user_states(model)
    assert states[True].dtype == torch.float32  # the heads after the LLM stay in float32
    assert not torch.equal(states[True], states[False])  # autocast did act
    torch.testing.assert_close(states[True], states[False], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_auto_follows_what_the_device_computes_natively(tmp_path, text_data, monkeypatch, native):
    monkeypatch.setattr(darec_core, "computes_bf16_natively", lambda device: native)
    _, model, _, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_bf16="auto"))
    assert model.llm_bf16 is native


def test_unknown_bf16_setting_is_refused(tmp_path, text_data):
    with pytest.raises(ValueError, match="llm_bf16='fast'.*auto"):
        build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_bf16="fast"))


def _gqa_attention_inputs(tokens: int, query_dtype: torch.dtype):
    """A layer as sdpa_attention_forward reads it (is_causal, num_key_value_groups: 2 query heads per key head),
    queries (2, 4, T, 8), keys and values (2, 2, T, 8), and a block-causal float32 mask whose last key no one sees."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    query = torch.randn(2, 4, tokens, 8).to(query_dtype)
    key = torch.randn(2, 2, tokens, 8).to(query_dtype)
    value = torch.randn(2, 2, tokens, 8).bfloat16()
    block_ids = torch.arange(tokens).div(3, rounding_mode="floor")[None].expand(2, -1)  # blocks of 3 tokens
    mask = attention_mask(block_ids, True, torch.float32)
    mask[..., -1] = torch.finfo(torch.float32).min
    mask[..., -1, -1] = 0  # the last token still sees itself
    return module, query, key, value, mask


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32-queries"])
def test_short_cpu_rows_run_their_bf16_attention_as_products(query_dtype, monkeypatch):
    """Under bf16 autocast on a CPU, as the backbone runs, rows shorter than CPU_PRODUCT_ATTENTION_BELOW get their
    attention from bf16 matrix products around a float32 softmax: the float32 kernel's outputs and input gradients
    to bf16 precision, and a key the mask hides changes nothing. float32-queries: a Llama layer's queries and keys
    leave rotary in float32 and its values in bf16; the path must fire for them too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def recording(*args, **kwargs):
        calls.append(args[1].shape)
        return products(*args, **kwargs)

    products = attention_module._attention_as_products
    monkeypatch.setattr(attention_module, "_attention_as_products", recording)
    module, query, key, value, mask = _gqa_attention_inputs(10, query_dtype)
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = _sdpa_attention(module, *inputs, mask, scaling=0.3)
    assert calls == [(2, 4, 10, 8)]
    reference_inputs = [t.detach().float().requires_grad_() for t in (query, key, value)]
    expected, _ = sdpa_attention_forward(module, *reference_inputs, mask, scaling=0.3)
    assert output.dtype == torch.bfloat16 and output.shape == expected.shape == (2, 10, 4, 8)
    torch.testing.assert_close(output.float(), expected, rtol=0.02, atol=0.02)
    output_grad = torch.randn(expected.shape)
    output.backward(output_grad.bfloat16())
    expected.backward(output_grad)
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=0.05, atol=0.05)

    hidden_value = value.clone()
    hidden_value[:, :, -1] += 100.0  # the last key is seen only by its own token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        changed, _ = _sdpa_attention(module, query, key, hidden_value, mask, scaling=0.3)
    assert torch.equal(changed[:, :-1], output[:, :-1].detach())
    assert not torch.equal(changed[:, -1], output[:, -1].detach())


def test_product_attention_without_a_mask_is_causal():
    """Without a mask (transformers drops an all-ones 2-D padding mask), the products attend causally, as SDPA's
    is_causal does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, query, key, value, _ = _gqa_attention_inputs(10, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = _sdpa_attention(module, query, key, value, None)
    expected, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), None)
    torch.testing.assert_close(output.float(), expected, rtol=0.02, atol=0.02)


def test_long_cpu_rows_keep_the_sdpa_kernel(monkeypatch):
    """Rows from CPU_PRODUCT_ATTENTION_BELOW tokens on run transformers' sdpa function as autocast runs it: the
    products would keep (rows, heads, T, T) probabilities for backward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(attention_module, "_attention_as_products", None)  # not called
    module, query, key, value, mask = _gqa_attention_inputs(CPU_PRODUCT_ATTENTION_BELOW, torch.bfloat16)
    mask = mask.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = _sdpa_attention(module, query, key, value, mask, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
