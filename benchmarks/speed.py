"""Speed figures of DARec, measured on real batches of a dataset.

- step ratio: one DARec training step (all losses, forward + backward) over a plain forward + backward of the same
  backbone (no adapters, causal mask) on the same packed tokens (item-level mode: its top layers over the batch's
  item states); the median of 20 steps of each, run in turns, with the quartiles;
- LLM tokens per epoch: all-position training (one sample per user) vs. RecBole's per-prefix augmentation;
- evaluation time per user (item vectors built once per evaluation, timed separately with one user's scores):
  ``full_sort_predict`` over every test user, DARec and an (untrained: its time does not depend on its weights)
  SASRec on the same batches in turns, the median of 3 passes each.

Token-level models (``DARecTokens``) are compared with the plain backbone over every token of the history; the
item-level default (``DARec``, ``DARecbase``) with the plain top layers over its one vector per item.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import full_sequence

from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.model import darec as darec_module
from recbole_darec.model.attention import attention_mask_dtype
from recbole_darec.model.backbone import load_backbone
from recbole_darec.model.darectokens import DARecTokens
from recbole_darec.model.item_states import drop_lower_layers
from recbole_darec.model.layout import pack_items, pack_rows, pack_sequences
from recbole_darec.model.masks import attention_mask
from recbole_darec.utils import get_model


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def interleaved(darec_step, plain_steps: dict, steps: int) -> dict:
    """Medians (and quartiles) of ``steps`` DARec steps and of each plain step, run in turns (DARec, plain, ...,
    DARec, ...), and of the pairwise ratios: a slow spell of the machine hits both sides of a pair alike."""
    seconds = {"darec_step_s": [], **{f"{name}_step_s": [] for name in plain_steps}}
    runs = {"darec_step_s": darec_step, **{f"{name}_step_s": fn for name, fn in plain_steps.items()}}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(steps):
        for key, fn in runs.items():
            seconds[key].append(_seconds(fn))
    result = {"steps": steps}
    for key, values in seconds.items():
        q1, median, q3 = _quartiles(values)
        result[key], result[f"{key}_iqr"] = median, [q1, q3]
    for name in plain_steps:
        ratio_key = "step_ratio" if name == "plain" else f"step_ratio_{name}"
        q1, median, q3 = _quartiles([d / p for d, p in zip(seconds["darec_step_s"], seconds[f"{name}_step_s"])])
        result[ratio_key], result[f"{ratio_key}_iqr"] = median, [q1, q3]
    return result


def tokens_per_epoch(sequences: torch.Tensor, lengths: torch.Tensor, item_token_len: torch.Tensor) -> tuple[int, int]:
    """(all-position, per-prefix) LLM tokens for one pass over the training sequences."""
    slot = torch.arange(sequences.shape[1])[None, :] < lengths[:, None]
    per_item = torch.where(slot, item_token_len[sequences] + 1, 0)  # text + [ITEM]
    prefix_tokens = 1 + torch.cumsum(per_item, dim=1)  # tokens of the prefix ending at each item
    all_position = int(prefix_tokens[torch.arange(len(lengths)), lengths - 1].sum())
    # RecBole's augmentation makes one row per prefix of >= 1 item followed by a target: prefixes 1..n-1.
    has_target = torch.arange(sequences.shape[1])[None, :] < (lengths - 1)[:, None]
    per_prefix = int(prefix_tokens[has_target].sum())
    return all_position, per_prefix


@dataclass
class TrainingSteps:
    """One DARec training step on the first training batch and the plain steps it is compared with ("plain": the
    histories; token level also "plain_all", every token the step runs), each a function of no arguments."""

    model: torch.nn.Module
    train_data: object
    test_data: object
    darec_step: Callable[[], None]
    plain_steps: dict[str, Callable[[], None]]
    batch_users: int
    batch_tokens: int


def training_steps(model_name: str, dataset: str, config_dict: dict) -> TrainingSteps:
    config = Config(model=model_name, dataset=dataset, config_dict=config_dict)
    _, train_data, _, test_data = load_data(config)
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    model.train()
    batch = next(iter(train_data)).to(config["device"])

    def darec_step():
        model.zero_grad(set_to_none=True)  # a step includes its slice of the rolling item-cache refresh
        sum(model.calculate_loss(batch)).backward()

    plain = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"]).model
    plain.to(config["device"]).train(model.training)  # DARec's LLM runs in train mode (dropout, checkpointing)
    if config["gradient_checkpointing"]:  # like for like: the plain layers recompute in backward as DARec's do
        plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full_seq, full_len = full_sequence(model, batch)

    def plain_pass(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                   backward: bool = True) -> None:
        inputs = inputs_embeds.clone().requires_grad_(backward)  # backward through every layer, as adapters need
        with torch.set_grad_enabled(backward), torch.autocast(inputs.device.type, torch.bfloat16,
                                                              enabled=model.llm_bf16):  # DARec's precision
            hidden = plain(inputs_embeds=inputs, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        if backward:
            hidden.sum().backward()

    token_level = isinstance(model, DARecTokens)
    if not token_level:
        # The same work without DARec: the top layers over the batch's item states, K positions per item.
        drop_lower_layers(plain, model.n_item_layers)
        full_seq = full_seq[:, : int(full_len.max())]
        first = model.first_token_state.expand(len(full_len), 1, -1)
        items = model.item_text_states[full_seq].flatten(1, 2)  # (B, L*K, H)
        embeds, token_counts = torch.cat([first, items], dim=1), 1 + full_len * model.item_positions
    else:
        packed = pack_sequences(full_seq, full_len, model.item_token_ids, model.item_token_len, model.special)
        embeds, token_counts = model._embed(packed.input_ids), (packed.block_ids >= 0).sum(1)
    # Histories packed into the rows DARec runs (several to a row, each seeing only itself), causal within each.
    rows = pack_rows(token_counts, embeds.shape[1], darec_module.PACKED_ROW_TOKENS, multiple=model.pad_tokens_to)
    mask_dtype = attention_mask_dtype(embeds.device, rows.positions.shape[1], model.llm_bf16)  # as DARec's forward
    history_inputs = (rows.pack(embeds).detach(), attention_mask(rows.positions, True, mask_dtype, rows.segment_ids),
                      rows.positions.clamp(min=0))
    plain_steps = {"plain": lambda: plain_pass(*history_inputs)}
    if token_level:
        # Every token a token-level step runs through the LLM: the histories, the batch's target items alone (with
        # gradient) and the slice of the item-cache refresh (without).
        _, next_items = model.next_positions(full_seq, full_len)
        fresh = torch.unique(next_items)[: model.fresh_items_per_step or None]
        per_step = -(-(model.n_items - 1) // model.item_cache.refresh_every)
        refreshed = torch.arange(1, per_step + 1, device=fresh.device)
        item_inputs = []
        for items in (fresh, refreshed):
            packed_items = pack_items(items, model.item_token_ids, model.item_token_len, model.special)
            item_inputs.append((model._embed(packed_items.input_ids).detach(), (packed_items.block_ids >= 0).long()))

        def plain_every_token():
            plain_pass(*history_inputs)
            plain_pass(*item_inputs[0])
            plain_pass(*item_inputs[1], backward=False)

        plain_steps["plain_all"] = plain_every_token
    return TrainingSteps(model, train_data, test_data, darec_step, plain_steps, len(full_len),
                         int(token_counts.sum()))


def measure(model_name: str, dataset: str, config_dict: dict, steps: int = 20, steps_only: bool = False) -> dict:
    """Every figure of the module docstring; ``steps_only``: the step ratio alone (the paper profile on a CPU, where
    one evaluation through 30 layers would take an hour)."""
    built = training_steps(model_name, dataset, config_dict)
    model, train_data, test_data = built.model, built.train_data, built.test_data
    figures = {"batch_users": built.batch_users, "batch_tokens": built.batch_tokens,
               **interleaved(built.darec_step, built.plain_steps, steps)}
    if steps_only:
        return figures
    # Token level: a full refresh of the training item cache; item level keeps no such cache.
    refresh_seconds = _timed(model.encode_all_items, 1) if isinstance(model, DARecTokens) else 0.0

    sequences, lengths = train_data._dataset.training_sequences()
    all_position, per_prefix = tokens_per_epoch(sequences, lengths, model.item_token_len.cpu())

    one_user = next(iter(test_data))[0][:1].to(model.device)

    def encode_every_item():
        model.eval()  # drops the item vectors of the last evaluation: the next prediction builds them again
        model.full_sort_predict(one_user)

    with torch.no_grad():
        item_seconds = _timed(encode_every_item, 1)
        eval_ms = evaluation_ms_per_user(model, train_data._dataset, test_data, config_dict)
    return {
        **figures,
        "item_cache_refresh_s": refresh_seconds,
        "tokens_per_epoch_all_position": all_position,
        "tokens_per_epoch_per_prefix": per_prefix,
        "eval_item_encoding_s": item_seconds,
        **eval_ms,
    }


def evaluation_ms_per_user(model, dataset, test_data, config_dict: dict, passes: int = 3) -> dict:
    """ms per user of ``full_sort_predict`` over every test user: ``model``, SASRec and SASRec in bf16 autocast on the
    same batches, in turns (a DARec batch, the same SASRec batch, ...), the median over ``passes`` passes of each."""
    config = Config(model="SASRec", dataset=dataset.dataset_name, config_dict=config_dict)
    sasrec = get_model("SASRec")(config, dataset).to(config["device"]).eval()
    batches = [batch[0].to(config["device"]) for batch in test_data]
    users = sum(len(batch) for batch in batches)

    def sasrec_bf16(batch):  # SASRec in the same autocast, for a like-for-like figure when DARec runs bf16
        with torch.autocast(batch[model.ITEM_SEQ].device.type, torch.bfloat16):
            return sasrec.full_sort_predict(batch)

    runs = {"darec": model.full_sort_predict, "sasrec": sasrec.full_sort_predict, "sasrec_bf16": sasrec_bf16}
    for run in runs.values():
        run(batches[0])  # warm-up; DARec's item vectors are built once per evaluation, timed apart
    seconds = {name: [] for name in runs}
    for _ in range(passes):
        totals = dict.fromkeys(runs, 0.0)
        for batch in batches:
            for name, run in runs.items():
                totals[name] += _seconds(lambda b=batch, r=run: r(b))
        for name, total in totals.items():
            seconds[name].append(total)
    ms = {name: 1000 * statistics.median(seconds[name]) / users for name in runs}
    return {"eval_users": users, "eval_ms_per_user": ms["darec"], "eval_ms_per_user_sasrec": ms["sasrec"],
            "eval_ratio_to_sasrec": ms["darec"] / ms["sasrec"], "eval_ms_per_user_sasrec_bf16": ms["sasrec_bf16"],
            "eval_bf16": model.llm_bf16}
