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

from recbole_darec.model import darec as darec_module
from recbole_darec.model.backbone import ATTN_IMPLEMENTATION, CPU_FLOAT32_ATTENTION_BELOW, _sdpa_attention

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
        _, model, _, _, _ = build("DARec", text_data[1], settings_for(
            tmp_path, text_data, llm_path=llm_path, context_masking=context_masking, attention=attention))
        assert model.llm.config._attn_implementation == {"eager": "eager", "sdpa": ATTN_IMPLEMENTATION}[attention]
        states[attention] = user_states(model)
    torch.testing.assert_close(states["sdpa"], states["eager"], rtol=0, atol=1e-5)


def test_unknown_attention_is_refused(tmp_path, text_data):
    with pytest.raises(ValueError, match="attention='flash'"):
        build("DARec", text_data[1], settings_for(tmp_path, text_data, attention="flash"))


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_padding_tokens_to_a_multiple_changes_no_state(tmp_path, text_data, llm_path):
    _, model, _, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data, llm_path=llm_path))
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


@pytest.mark.parametrize("history_input", ["tokens", "items"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, text_data, llm_path, history_input):
    results = []
    for checkpointing in (False, True):
        extra = {"history_input": "items", "sequence_layers": 1, "whiten_dim": 16} if history_input == "items" else {}
        _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(
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
        _, model, _, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data, llm_bf16=bf16))
        states[bf16] = user_states(model)
    assert states[True].dtype == torch.float32  # the heads after the LLM stay in float32
    assert not torch.equal(states[True], states[False])  # autocast did act
    torch.testing.assert_close(states[True], states[False], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_auto_follows_what_the_device_computes_natively(tmp_path, text_data, monkeypatch, native):
    monkeypatch.setattr(darec_module, "computes_bf16_natively", lambda device: native)
    _, model, _, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data, llm_bf16="auto"))
    assert model.llm_bf16 is native


def test_unknown_bf16_setting_is_refused(tmp_path, text_data):
    with pytest.raises(ValueError, match="llm_bf16='fast'.*auto"):
        build("DARec", text_data[1], settings_for(tmp_path, text_data, llm_bf16="fast"))


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32-queries"])
@pytest.mark.parametrize("tokens", [10, CPU_FLOAT32_ATTENTION_BELOW], ids=["short", "long"])
def test_short_cpu_rows_run_their_bf16_attention_in_float32(tokens, query_dtype):
    """Under bf16 autocast on a CPU, as the backbone runs, rows shorter than CPU_FLOAT32_ATTENTION_BELOW get
    transformers' sdpa attention computed in float32 from the same inputs (bitwise), returned in bf16; longer rows run
    it as autocast does. float32-queries: a Llama layer's queries and keys leave rotary in float32, its values in bf16;
    autocast would cast all three to bf16 for SDPA unless the short-row path turns it off."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()  # what sdpa_attention_forward reads of the layer: is_causal, num_key_value_groups
    module.is_causal = True
    query, key = (torch.randn(2, 3, tokens, 8).to(query_dtype) for _ in range(2))
    value = torch.randn(2, 3, tokens, 8).bfloat16()
    mask = torch.zeros(2, 1, tokens, tokens, dtype=torch.bfloat16)
    mask[..., -1] = torch.finfo(torch.bfloat16).min  # the last token is seen by no one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = _sdpa_attention(module, query, key, value, mask, scaling=0.3)
        if tokens >= CPU_FLOAT32_ATTENTION_BELOW:
            expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert output.dtype == torch.bfloat16
    if tokens < CPU_FLOAT32_ATTENTION_BELOW:
        expected, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask.float(),
                                             scaling=0.3)
        expected = expected.bfloat16()
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
