"""Bottleneck adapters on the attention and FFN sublayers of every decoder layer, serial or parallel.

For a sublayer f (attention or FFN, its input x already normalised by the pre-norm block):
- serial (Houlsby et al., 2019):  f(x) + A(f(x))
- parallel (He et al., 2022):     f(x) + A(x)
and the block adds its residual around that, giving ``h = x + f(x) + A(.)``. ``A`` is down (d -> r), activation,
up (r -> d) with ``up`` initialised to zero, so an untrained DARec reproduces the backbone exactly.

Adapters are attached with forward hooks on the loaded transformers modules (no copy of their modeling code): a
pre-hook stores the sublayer input, a hook adds the adapter output to the sublayer output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from recbole_darec.model.backbone import sublayer_modules

SERIAL, PARALLEL = 0, 1
# The one spelling of a layer's choice, indexed by it: adapter_arch, trial logs and log lines all use these.
ARCH_LETTERS = "sp"
CHOICE_NAMES = ("serial", "parallel")


def parse_adapter_arch(adapter_arch: str | None, n_layers: int) -> list[int] | None:
    """``"s"``/``"p"`` (every layer) or one letter per layer (``"sspp"``) -> [0/1 per layer]; None -> not fixed."""
    if adapter_arch is None or adapter_arch in ("", "gate", "search"):
        return None
    arch = str(adapter_arch).strip().lower()
    if len(arch) == 1:
        arch = arch * n_layers
    if len(arch) != n_layers or set(arch) - set(ARCH_LETTERS):
        raise ValueError(
            f"adapter_arch='{adapter_arch}': give one letter s (serial) or p (parallel) per decoder layer "
            f"({n_layers} layers here, e.g. {'s' * n_layers}), a single letter for all layers, or ~ to learn a gate."
        )
    return str_to_arch(arch)


def arch_to_str(arch: Iterable[int | float | bool]) -> str:
    """Encode a 0/1 vector as a string: 0 -> 's' (serial adapter), 1 -> 'p' (parallel adapter)."""
    out = []
    for i, bit in enumerate(arch):
        # Accept float tensors' entries (0.0 / 1.0) but refuse anything that is not exactly binary.
        if bit not in (0, 1):
            raise ValueError(f"architecture entry {i} is {bit!r}; expected 0 (serial) or 1 (parallel)")
        out.append(ARCH_LETTERS[int(bit)])
    return "".join(out)


def str_to_arch(arch: str) -> list[int]:
    """Decode an architecture string such as 'spps' into [0, 1, 1, 0]."""
    bad = sorted({c for c in arch if c not in ARCH_LETTERS})
    if bad:
        raise ValueError(
            f"invalid architecture string {arch!r}: letters {bad} are not 's' (serial) or 'p' (parallel)"
        )
    return [ARCH_LETTERS.index(c) for c in arch]


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, adapter_size: int, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.act = nn.GELU()
        self.up = nn.Linear(adapter_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The r-wide activations that ``up`` maps back (r = adapter_size)."""
        return self.dropout(self.act(self.down(x)))


class LayerRouter(nn.Module):
    """Which adapter a decoder layer runs.

    ``fixed``: one choice (serial or parallel), only that adapter exists. ``gate``: both exist and a learned
    sigmoid gate mixes them. ``supernet``: both exist, ``choice`` is set from outside per batch (architecture search).
    """

    def __init__(self, mode: str, choice: int | None = None):
        super().__init__()
        if mode not in ("fixed", "gate", "supernet"):
            raise ValueError(f"router mode {mode!r}: expected fixed, gate or supernet")
        self.mode = mode
        self.choice = choice if choice is not None else SERIAL
        self.gate_logit = nn.Parameter(torch.zeros(())) if mode == "gate" else None

    def branches(self) -> tuple[int, ...]:
        return (self.choice,) if self.mode == "fixed" else (SERIAL, PARALLEL)


class SublayerAdapter(nn.Module):
    """The adapter(s) of one sublayer, combined as the layer's router says."""

    def __init__(self, hidden_size: int, adapter_size: int, router: LayerRouter, dropout: float = 0.0):
        super().__init__()
        self.router = [router]  # a list, so the shared router is registered once, on the layer
        branches = router.branches()
        self.serial = BottleneckAdapter(hidden_size, adapter_size, dropout) if SERIAL in branches else None
        self.parallel = BottleneckAdapter(hidden_size, adapter_size, dropout) if PARALLEL in branches else None

    def forward(self, sublayer_input: torch.Tensor, sublayer_output: torch.Tensor) -> torch.Tensor:
        router = self.router[0]
        if router.mode == "gate":
            # g * up_s(a_s) + (1 - g) * up_p(a_p) as one product of [a_s, a_p] with the gate-scaled up weights: no
            # full-width scaling and sum of the two branches' outputs.
            gate = torch.sigmoid(router.gate_logit)
            serial, parallel = self.serial.up, self.parallel.up
            activations = torch.cat([self.serial.bottleneck(sublayer_output),
                                     self.parallel.bottleneck(sublayer_input)], dim=-1)  # (..., 2r)
            weight = torch.cat([gate * serial.weight, (1 - gate) * parallel.weight], dim=1)  # (d, 2r)
            bias = gate * serial.bias + (1 - gate) * parallel.bias
            return sublayer_output + F.linear(activations, weight, bias)
        if router.choice == SERIAL:
            return sublayer_output + self.serial(sublayer_output)
        return sublayer_output + self.parallel(sublayer_input)


class DecoderLayerAdapters(nn.Module):
    """Two adapters (attention, FFN) and the router of one decoder layer."""

    def __init__(self, hidden_size: int, adapter_size: int, mode: str, choice: int | None, dropout: float = 0.0):
        super().__init__()
        self.router = LayerRouter(mode, choice)
        self.attention = SublayerAdapter(hidden_size, adapter_size, self.router, dropout)
        self.ffn = SublayerAdapter(hidden_size, adapter_size, self.router, dropout)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _hook_sublayer(input_module: nn.Module, output_module: nn.Module, adapter: SublayerAdapter) -> list:
    stash: dict[str, torch.Tensor] = {}

    def save_input(module, args, kwargs):
        stash["x"] = _first_tensor(args, kwargs)

    def add_adapter(module, args, kwargs, output):
        sublayer_input = stash.pop("x")
        if isinstance(output, tuple):
            return (adapter(sublayer_input, output[0]), *output[1:])
        return adapter(sublayer_input, output)

    return [
        input_module.register_forward_pre_hook(save_input, with_kwargs=True),
        output_module.register_forward_hook(add_adapter, with_kwargs=True),
    ]


def attach_adapters(
    layers: nn.ModuleList, hidden_size: int, adapter_size: int, arch: list[int] | None, supernet: bool = False,
    dropout: float = 0.0,
) -> tuple[nn.ModuleList, list]:
    """Create the adapters of every layer and hook them into the layers. Returns (adapters, hook handles)."""
    adapters = nn.ModuleList()
    handles = []
    for index, layer in enumerate(layers):
        if supernet:
            mode, choice = "supernet", (arch[index] if arch else SERIAL)
        elif arch is None:
            mode, choice = "gate", None
        else:
            mode, choice = "fixed", arch[index]
        layer_adapters = DecoderLayerAdapters(hidden_size, adapter_size, mode, choice, dropout)
        attn_in, attn_out, ffn_in, ffn_out = sublayer_modules(layer)
        handles += _hook_sublayer(attn_in, attn_out, layer_adapters.attention)
        handles += _hook_sublayer(ffn_in, ffn_out, layer_adapters.ffn)
        adapters.append(layer_adapters)
    return adapters, handles


def set_architecture(adapters: nn.ModuleList, arch: list[int]) -> None:
    """Set the per-layer choice of a supernet (or re-fix a fixed one where both branches exist)."""
    if len(arch) != len(adapters):
        raise ValueError(f"architecture has {len(arch)} choices for {len(adapters)} layers")
    for layer_adapters, choice in zip(adapters, arch):
        router = layer_adapters.router
        if choice not in router.branches():
            name = CHOICE_NAMES[choice] if choice in (SERIAL, PARALLEL) else repr(choice)
            raise ValueError(f"layer has no {name} adapter to switch to")
        router.choice = int(choice)

