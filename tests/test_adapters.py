"""Bottleneck adapters: architecture strings, zero-init identity, serial vs parallel, the router.

The identity check compares DARec's backbone-with-adapters to a *separately loaded* copy of the same backbone
that never had hooks attached, so a hook that silently does nothing cannot pass the perturbation checks and a
hook that changes anything at init cannot pass the identity check.
"""

from __future__ import annotations

import pytest
import torch
from darec_testing import BACKBONES, TINY_LLM, build, darec_settings, write_text_dataset

from recbole_darec.model.adapters import (
    PARALLEL,
    SERIAL,
    BottleneckAdapter,
    LayerRouter,
    SublayerAdapter,
    parse_adapter_arch,
    set_architecture,
)
from recbole_darec.model.backbone import load_backbone
from recbole_darec.model.layout import pack_sequences
from recbole_darec.model.masks import attention_mask

# RecBole's Trainer writes ./log_tensorboard and its Config reads sys.argv (pytest's own flags): every test runs
# in its tmp_path with a clean command line (conftest's isolated_run), on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_run")


# ------------------------------------------------------------------------------------- parse_adapter_arch


@pytest.mark.parametrize(
    ("arch", "n_layers", "expected"),
    [
        ("sp", 2, [SERIAL, PARALLEL]),
        ("ppsp", 4, [PARALLEL, PARALLEL, SERIAL, PARALLEL]),
        ("s", 3, [SERIAL] * 3),
        ("p", 2, [PARALLEL] * 2),
        (" SP ", 2, [SERIAL, PARALLEL]),  # yaml / command-line values: case and blanks do not matter
        (None, 4, None),
        ("", 4, None),
        ("gate", 4, None),
    ],
)
def test_parse_adapter_arch_valid(arch, n_layers, expected):
    assert parse_adapter_arch(arch, n_layers) == expected


@pytest.mark.parametrize(("arch", "n_layers"), [("ssp", 2), ("s" * 5, 4), ("sx", 2), ("ab", 2), ("12", 2),
                                                (["s", "p"], 2)])
def test_parse_adapter_arch_invalid_says_what_to_give(arch, n_layers):
    with pytest.raises(ValueError) as err:
        parse_adapter_arch(arch, n_layers)
    message = str(err.value)
    # The message names the setting, the bad value, the layer count and the valid letters.
    assert "adapter_arch" in message and str(arch) in message
    assert f"{n_layers} layers" in message
    assert "serial" in message and "parallel" in message


# ------------------------------------------------------------------------------------------- unit level


def test_sublayer_adapter_serial_and_parallel_formulas():
    torch.manual_seed(0)
    x, fx = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    router = LayerRouter("supernet", SERIAL)
    adapter = SublayerAdapter(8, 4, router)
    for branch in (adapter.serial, adapter.parallel):
        torch.nn.init.normal_(branch.up.weight)
    # serial (Houlsby): f(x) + A(f(x)); parallel (He et al.): f(x) + A(x). The block adds the residual x.
    torch.testing.assert_close(adapter(x, fx), fx + adapter.serial(fx), rtol=0, atol=0)
    router.choice = PARALLEL
    torch.testing.assert_close(adapter(x, fx), fx + adapter.parallel(x), rtol=0, atol=0)


def test_bottleneck_adapter_starts_at_zero():
    adapter = BottleneckAdapter(16, 4)
    assert torch.count_nonzero(adapter(torch.randn(3, 16))) == 0
    assert adapter.down.weight.abs().sum() > 0  # only `up` is zero: gradients still reach `up` at step one


def test_gate_mixes_both_branches_and_learns():
    torch.manual_seed(0)
    router = LayerRouter("gate")
    adapter = SublayerAdapter(8, 4, router)
    for branch in (adapter.serial, adapter.parallel):
        torch.nn.init.normal_(branch.up.weight)
        torch.nn.init.normal_(branch.up.bias)
    with torch.no_grad():
        router.gate_logit.fill_(0.7)  # not sigmoid(0) = 0.5, where the two branches' weights would be symmetric
    x, fx = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    parameters = [router.gate_logit, *adapter.serial.parameters(), *adapter.parallel.parameters()]

    def reference() -> torch.Tensor:  # the unfused formula the adapter computes as one product
        gate = torch.sigmoid(router.gate_logit)
        return fx + gate * adapter.serial(fx) + (1 - gate) * adapter.parallel(x)

    expected = reference()
    expected_grads = torch.autograd.grad((expected * torch.arange(8.0)).sum(), parameters)
    out = adapter(x, fx)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out * torch.arange(8.0)).sum(), parameters)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    assert grads[0] != 0  # the gate learns


def test_router_rejects_unknown_mode():
    with pytest.raises(ValueError, match="router mode"):
        LayerRouter("mixture")


# ----------------------------------------------------------------------------- inside a DARec backbone


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    data_path, name = write_text_dataset(root / "dataset")
    return root, data_path, name


def make_model(text_dataset, llm_path: str, **overrides):
    root, data_path, name = text_dataset
    settings = darec_settings(root, data_path, llm_path=llm_path, **overrides)
    _, model, train_data, _, _ = build("DARecTokens", name, settings)
    return model.eval(), train_data


def llm_inputs(model, context_masking: bool = True):
    """Embeddings and block ids of three real user sequences (different lengths, so with padding)."""
    seq_items = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]])
    seq_len = torch.tensor([4, 2, 3])
    packed = pack_sequences(seq_items, seq_len, model.item_token_ids, model.item_token_len, model.special)
    return model._embed(packed.input_ids), packed.block_ids


def bare_backbone_states(model, llm_path: str, inputs_embeds, block_ids) -> torch.Tensor:
    """The same weights in a freshly loaded backbone that never had adapter hooks, run as DARec.forward runs it."""
    bare = load_backbone(llm_path, None, dict(TINY_LLM)).model
    bare.load_state_dict(model.llm.state_dict())
    mask = attention_mask(block_ids, model.context_masking, inputs_embeds.dtype)
    position_ids = torch.arange(block_ids.shape[1]).expand_as(block_ids)
    return bare(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                use_cache=False).last_hidden_state


def perturb_adapters(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapters.named_parameters():
            if name.endswith("up.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def real_positions(block_ids):
    return block_ids != -1


@pytest.mark.parametrize("llm_path", BACKBONES)
@pytest.mark.parametrize(("adapter_arch", "supernet"), [("s", False), ("p", False), ("sp", False), (None, False),
                                                        ("ps", True)],
                         ids=["serial", "parallel", "mixed", "gate", "supernet"])
def test_untrained_darec_equals_bare_backbone(text_dataset, llm_path, adapter_arch, supernet):
    model, _ = make_model(text_dataset, llm_path, adapter_arch=adapter_arch, supernet=supernet)
    embeds, block_ids = llm_inputs(model)
    with torch.no_grad():
        with_adapters = model(embeds, block_ids)
        bare = bare_backbone_states(model, llm_path, embeds, block_ids)
        real = real_positions(block_ids)
        # Zero-initialised `up`: the adapters add exact zeros, so the states are the backbone's own.
        torch.testing.assert_close(with_adapters[real], bare[real], rtol=0, atol=1e-6)

        # The hooks do run: non-zero adapters change every real state.
        perturb_adapters(model)
        perturbed = model(embeds, block_ids)
    differs = (perturbed - bare).abs().amax(-1)[real]
    assert (differs > 1e-4).all(), f"{(differs <= 1e-4).sum()} states unchanged by non-zero adapters"


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_serial_and_parallel_compute_different_functions(text_dataset, llm_path):
    model, _ = make_model(text_dataset, llm_path, adapter_arch="s", supernet=True)
    perturb_adapters(model)
    # Give both branches the very same weights: any difference comes from what they are applied to.
    with torch.no_grad():
        for layer in model.adapters:
            for sublayer in (layer.attention, layer.ffn):
                sublayer.parallel.load_state_dict(sublayer.serial.state_dict())
    embeds, block_ids = llm_inputs(model)
    real = real_positions(block_ids)
    with torch.no_grad():
        set_architecture(model.adapters, [SERIAL, SERIAL])
        serial = model(embeds, block_ids)
        set_architecture(model.adapters, [PARALLEL, PARALLEL])
        parallel = model(embeds, block_ids)
    assert (serial - parallel).abs().amax(-1)[real].min() > 1e-4


def count_branch_calls(model) -> tuple[dict, list]:
    calls = {}
    handles = []
    for index, layer in enumerate(model.adapters):
        for sublayer_name in ("attention", "ffn"):
            sublayer = getattr(layer, sublayer_name)
            for branch_name in ("serial", "parallel"):
                key = (index, sublayer_name, branch_name)
                calls[key] = 0

                def hook(module, args, output, key=key):
                    calls[key] += 1

                handles.append(getattr(sublayer, branch_name).register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_set_architecture_switches_branches_in_supernet(text_dataset, llm_path):
    model, _ = make_model(text_dataset, llm_path, adapter_arch=None, supernet=True)
    perturb_adapters(model)
    embeds, block_ids = llm_inputs(model)
    calls, handles = count_branch_calls(model)
    outputs = {}
    with torch.no_grad():
        for arch in ([SERIAL, PARALLEL], [PARALLEL, SERIAL], [SERIAL, PARALLEL]):
            for key in calls:
                calls[key] = 0
            set_architecture(model.adapters, arch)
            assert [layer.router.choice for layer in model.adapters] == arch
            out = model(embeds, block_ids)
            # Exactly the chosen branch of each layer ran, once per sublayer (one forward pass).
            for (layer, _, branch), count in calls.items():
                chosen = (branch == "serial") == (arch[layer] == SERIAL)
                assert count == (1 if chosen else 0), (arch, layer, branch, count)
            if tuple(arch) in outputs:
                # A fixed architecture is deterministic: the same choice gives bit-identical states.
                assert torch.equal(out, outputs[tuple(arch)])
            outputs[tuple(arch)] = out
    for handle in handles:
        handle.remove()
    real = real_positions(block_ids)
    assert (outputs[(SERIAL, PARALLEL)] - outputs[(PARALLEL, SERIAL)]).abs().amax(-1)[real].min() > 1e-4


def test_set_architecture_checks_its_input(text_dataset):
    model, _ = make_model(text_dataset, "random:llama", adapter_arch="s")
    with pytest.raises(ValueError, match="2 layers"):
        set_architecture(model.adapters, [SERIAL])
    # A fixed serial model has no parallel adapters: switching to one must fail loudly, not run nothing.
    with pytest.raises(ValueError, match="parallel"):
        set_architecture(model.adapters, [SERIAL, PARALLEL])


def test_supernet_training_samples_architectures(text_dataset):
    model, train_data = make_model(text_dataset, "random:llama", adapter_arch=None, supernet=True)
    batch = next(iter(train_data))
    seen = set()
    torch.manual_seed(0)
    model.train()
    for _ in range(12):  # 4 architectures: 12 draws miss one with probability < 0.1
        model.sample_architecture()
        seen.add(tuple(layer.router.choice for layer in model.adapters))
    assert len(seen) >= 3
    # Each training batch draws its own architecture (weight sharing for the architecture search).
    model.calculate_loss(batch)
    assert tuple(layer.router.choice for layer in model.adapters) in {(0, 0), (0, 1), (1, 0), (1, 1)}
