"""DARec's attention masks in the backbone: no future leakage (every backbone, mask and CF setting), the context
mask reaches the layers and acts from two layers on.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

import pytest
import torch
from darec_testing import BACKBONES, DAREC_TEST_FIXTURES, TINY_LLM, build, settings_for

from recbole_darec.model.layout import pack_sequences

# Leakage must hold with CF injection on too (its vectors sit at [CF_USER] and at every item's [ITEM]).
CF_MODELS = [None, "BPR"]

pytestmark = DAREC_TEST_FIXTURES


# ----------------------------------------------------------------------------------- no future leakage


def distinct_texts(model, seed: int = 0) -> None:
    """Random token texts of 3 to item_max_tokens tokens: every item distinct, every token position used."""
    generator = torch.Generator().manual_seed(seed)
    n_items, width = model.item_token_ids.shape
    model.item_token_ids = torch.randint(1, 256, (n_items, width), generator=generator)
    model.item_token_len = torch.randint(3, width + 1, (n_items,), generator=generator)
    model.item_token_len[0] = 0
    model.item_token_ids[torch.arange(width)[None, :] >= model.item_token_len[:, None]] = 0


@pytest.mark.parametrize("cf_model", CF_MODELS, ids=lambda name: f"cf={name}")
@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_no_future_leakage(tmp_path, text_data, llm_path, context_masking, cf_model):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, llm_path=llm_path, context_masking=context_masking, cf_model=cf_model))
    model.eval()
    distinct_texts(model)
    # Row 0 is the user under test; row 1 (shorter, so padded) must not move either.
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
    seq_len = torch.tensor([5, 3])
    users = torch.tensor([1, 2])
    n_slots = seq.shape[1]

    def states():
        with torch.no_grad():
            return model.encode_sequences(seq, seq_len, users)

    def check(base, changed, slot, what):
        # Everything before `slot` (the user after items 1..slot) is unchanged; `slot` itself does change
        # (otherwise the perturbation proved nothing); the other user is untouched.
        torch.testing.assert_close(changed[0, :slot], base[0, :slot], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{what} at item {slot + 1} leaked into earlier states: {m}")
        assert (changed[0, slot] - base[0, slot]).abs().max() > 1e-4, f"{what}: item {slot + 1} state unchanged"
        torch.testing.assert_close(changed[1, :3], base[1, :3], rtol=0, atol=1e-5)

    base = states()
    original_ids = model.item_token_ids.clone()
    for slot in range(1, n_slots):
        item = int(seq[0, slot])
        # Every single token of the later item.
        for position in range(int(model.item_token_len[item])):
            model.item_token_ids[item, position] = (original_ids[item, position] + 97) % 255 + 1
            check(base, states(), slot, f"token {position}")
            model.item_token_ids[item, position] = original_ids[item, position]
        # A different item in that slot (other text, other ID: with CF injection also another CF vector).
        seq[0, slot] = 50
        check(base, states(), slot, "item swap")
        seq[0, slot] = item
    # A shorter text for the last item (another length, so other positions after it) changes nothing before it.
    last = int(seq[0, -1])
    model.item_token_len[last] -= 1
    check(base, states(), n_slots - 1, "text length")


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_histories_packed_in_one_row_give_the_states_of_each_history_alone(tmp_path, text_data, llm_path,
                                                                           context_masking):
    _, model, *_ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_path=llm_path,
                                                             context_masking=context_masking, cf_model="BPR"))
    model.eval()
    distinct_texts(model)
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0], [11, 0, 0, 0, 0], [8, 2, 0, 0, 0]])
    seq_len = torch.tensor([5, 3, 1, 2])
    users = torch.tensor([1, 2, 3, 4])
    calls = []  # (rows, tokens) of every LLM pass
    model.llm.register_forward_pre_hook(
        lambda _module, _args, inputs: calls.append(tuple(inputs["inputs_embeds"].shape[:2])), with_kwargs=True)
    with torch.no_grad():
        together = model.encode_sequences(seq, seq_len, users)
        alone = [model.encode_sequences(seq[b: b + 1, : seq_len[b]], seq_len[b: b + 1], users[b: b + 1])[0]
                 for b in range(len(seq_len))]
    assert calls[0][0] == 1  # the four histories shared one row
    for b, states in enumerate(alone):
        torch.testing.assert_close(together[b, : seq_len[b]], states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_context_mask_reaches_the_backbone(tmp_path, text_data, llm_path, context_masking):
    # The layout tests check the mask tensor; this checks that the backbone obeys it (a backbone that
    # replaced a 4-D mask by its own causal one would pass the leakage test but lose the item-bidirectional part).
    _, model, *_ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, llm_path=llm_path,
                                                             context_masking=context_masking))
    model.eval()
    distinct_texts(model)
    seq, seq_len = torch.tensor([[3, 9]]), torch.tensor([2])
    packed = pack_sequences(seq, seq_len, model.item_token_ids, model.item_token_len, model.special)
    with torch.no_grad():
        embeds = model._embed(packed.input_ids)
        base = model(embeds, packed.block_ids)
        last_text = int(packed.boundary_positions[0, 0]) - 1  # last text token of item 1
        changed_embeds = embeds.clone()
        # A random direction: a constant shift (+1 everywhere) is erased by OPT's mean-centring LayerNorms.
        changed_embeds[0, last_text] += torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0))
        changed = model(changed_embeds, packed.block_ids)
    moved = (changed - base).abs().amax(-1)[0]
    # Item 1's earlier tokens (positions 1 .. last_text-1) see its last token only under context masking.
    assert (moved[1:last_text] > 1e-4).all() == context_masking, moved
    assert moved[0] == 0  # [CF_USER] sees only itself in both modes


@pytest.mark.parametrize("n_layers", [1, 2])
def test_context_masking_changes_item_boundary_states_only_from_two_layers(tmp_path, text_data, n_layers):
    # In one layer an [ITEM] state attends to input embeddings only, and the [ITEM] (last token of its block) sees
    # the same tokens under both masks: DARec and DARecbase coincide, which is why the masking ablation of the
    # benchmarks uses 2 layers. From the second layer on, it reads tokens that saw their whole item.
    boundary_states = {}
    for context_masking in (True, False):
        config = dict(llm_random_config={**TINY_LLM, "num_hidden_layers": n_layers}, context_masking=context_masking)
        _, model, *_ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, **config))
        model.eval()
        distinct_texts(model)
        with torch.no_grad():
            boundary_states[context_masking] = model.encode_sequences(torch.tensor([[3, 9, 12]]), torch.tensor([3]))
    same = torch.allclose(boundary_states[True], boundary_states[False], atol=1e-6)
    assert same == (n_layers == 1)
