"""Peak memory of DARec's LLM pass (one training forward + backward) against the tokens per row.

    python benchmarks/memory.py --dataset=amazon-scientific

Token-level DARec (``DARecTokens``, the paper's layout: every layer reads every token) on the pretrained
SmolLM2-135M truncated to ``--layers``, with its adapters and the context mask, on rows of 33-token items (32 text
tokens + ``[ITEM]``).
Settings compared: ``attention: eager`` (the dense reference: every layer keeps its attention probabilities),
``attention: sdpa`` (the default) and sdpa with ``gradient_checkpointing``. Each setting runs in its own process
with glibc's mmap threshold fixed, so freed tensors leave the process and its peak RSS (VmHWM, reset before each
measured step) is the step's own. Prints a markdown table, the growth per doubling of the tokens and an estimate
for the paper profile's batches of the dataset (64 users, their last 50 items at 33 tokens): histories padded to the
batch's longest (no packing) and packed several to a row (as DARec runs them); writes ``--out`` (json).
``--from_json`` writes the report of an earlier measurement again, with the batches counted anew.

    python benchmarks/memory.py --dataset=amazon-scientific --paper_step --rows 64

``--paper_step`` measures instead of estimating: one whole training step (every loss, the batch's target items
encoded with gradient, its slice of the item-cache refresh) of the paper profile's ``DARec-tokens`` row
(``benchmarks/profiles/paper.yaml``: all layers, the last 50 items at 32 tokens, bf16 autocast), ``--rows`` users,
on the training batch with the most history tokens; peak RSS on a CPU, CUDA's max allocated on a GPU. Checkpointing as
``--settings`` says (default: ``sdpa+checkpointing``, the profile's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, default_data_path, full_sequence, load_profile, parse_overrides, row_config

SETTINGS = {
    "eager": {"attention": "eager", "gradient_checkpointing": False},
    "sdpa": {"attention": "sdpa", "gradient_checkpointing": False},
    "sdpa+checkpointing": {"attention": "sdpa", "gradient_checkpointing": True},
}
ITEM_TOKENS = 33  # 32 text tokens + [ITEM], as in the paper profile
PAPER = {"rows": 64, "items": 50, "layers": 30}


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def measure_child(args) -> list[dict]:
    import torch

    from recbole_darec.config import Config
    from recbole_darec.data import load_data
    from recbole_darec.utils import build_model

    torch.set_num_threads(args.threads)
    layers = args.layers[0]
    settings = {"data_path": args.data_path, "llm_layers": layers,
                "item_max_tokens": ITEM_TOKENS - 1, "item_text_cache_dir": args.cache_dir, "state": "WARNING",
                "show_progress": False, "llm_bf16": False,  # float32 on every machine: the table's reference
                **SETTINGS[args.setting]}
    config = Config(model="DARecTokens", dataset=args.dataset, config_dict=settings)
    _, train_data, _, _ = load_data(config)
    model = build_model(config, train_data._dataset)
    model.train()
    rows = []
    for tokens in args.tokens:
        generator = torch.Generator().manual_seed(0)
        token_ids = torch.randint(0, model.backbone.vocab_size, (args.rows, tokens), generator=generator)
        block_ids = (torch.arange(tokens) + ITEM_TOKENS - 1) // ITEM_TOKENS  # [CF_USER] block 0, then one per item
        block_ids = block_ids.expand(args.rows, tokens).contiguous()
        with torch.no_grad():
            inputs_embeds = model._embed(token_ids)  # (rows, tokens, H)

        def step(inputs_embeds=inputs_embeds, block_ids=block_ids):
            model.zero_grad(set_to_none=True)
            model(inputs_embeds, block_ids).square().mean().backward()

        step()  # warm-up: one-off allocations (kernels, thread pools) are not the step's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _rss_mb("VmRSS:")
        start = time.perf_counter()
        step()
        rows.append({"setting": args.setting, "layers": layers, "rows": args.rows, "tokens": tokens,
                     "peak_mb": round(_rss_mb("VmHWM:") - before, 1), "step_s": round(time.perf_counter() - start, 2)})
    return rows


def measure_paper_step(args) -> dict:
    import torch

    from recbole_darec.config import Config
    from recbole_darec.data import load_data
    from recbole_darec.model.layout import pack_sequences
    from recbole_darec.utils import build_model

    torch.set_num_threads(args.threads)
    overrides = {"item_text_cache_dir": args.cache_dir, "state": "WARNING", "train_batch_size": args.rows,
                 **SETTINGS[args.setting], **parse_overrides(args.set)}
    model_name, settings = row_config(load_profile("paper"), "DARec-tokens", 2020, args.data_path,
                                      ROOT / "saved" / "memory-paper-step", overrides)
    config = Config(model=model_name, dataset=args.dataset, config_dict=settings)
    _, train_data, _, _ = load_data(config)
    model = build_model(config, train_data._dataset)
    model.train()

    def history_tokens(batch) -> int:
        packed = pack_sequences(*full_sequence(model, batch), model.item_token_ids, model.item_token_len,
                                model.special)
        return int((packed.block_ids >= 0).sum())

    tokens, largest = max(((history_tokens(batch), batch) for batch in train_data), key=lambda pair: pair[0])
    target_items = len(torch.unique(model.next_positions(*full_sequence(model, largest))[1]))  # encoded afresh
    batch = largest.to(config["device"])
    cuda = config["device"].type == "cuda"

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sum(model.calculate_loss(batch)).backward()

    row = {"setting": args.setting, "device": str(config["device"]), "layers": len(model.backbone.layers),
           "rows": len(batch[model.ITEM_SEQ_LEN]), "history_tokens": tokens,
           "target_items": target_items, "llm_bf16": model.llm_bf16,
           "measure": "CUDA max allocated" if cuda else "RSS (VmHWM)"}
    try:
        start = time.perf_counter()
        step()  # warm-up: fills the item cache (a run's first step, once) and the one-off allocations
        row["warm_up_s"] = round(time.perf_counter() - start, 1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _rss_mb("VmRSS:")
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        row["step_s"] = round(time.perf_counter() - start, 2)
    except torch.cuda.OutOfMemoryError:  # a result, not a failure: the step does not fit this device
        row["out_of_memory_mb"] = round(torch.cuda.get_device_properties(config["device"]).total_memory / 2**20)
        return row
    total = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM:")
    return {**row, "peak_mb": round(total - before, 1), "peak_total_mb": round(total, 1)}


def paper_batch_tokens(dataset: str, data_path: str, cache_dir: str, batches: int = 200) -> dict:
    """LLM tokens of the paper profile's training batches on ``dataset`` (``PAPER`` users, their last ``PAPER['items']``
    items at ``ITEM_TOKENS`` tokens): padded (rows x the batch's longest history) and packed (the histories' own
    tokens), the mean and the largest over ``batches`` shuffled batches."""
    import torch

    from recbole_darec.config import Config
    from recbole_darec.data import load_data
    from recbole_darec.data.item_text import cached_item_tokens
    from recbole_darec.model.backbone import load_backbone

    config = Config(model="DARecTokens", dataset=dataset, config_dict={
        "data_path": data_path, "MAX_ITEM_LIST_LENGTH": PAPER["items"], "state": "WARNING",
        "train_batch_size": PAPER["rows"], "show_progress": False, "item_max_tokens": ITEM_TOKENS - 1})
    _, train_data, _, _ = load_data(config)
    tokenizer = load_backbone(config["llm_path"], 1).tokenizer
    _, token_len = cached_item_tokens(train_data._dataset.item_sentences, tokenizer, ITEM_TOKENS - 1, tokenizer.name,
                                      cache_dir)
    padded, packed = [], []
    generator = torch.Generator().manual_seed(0)
    sequences, lengths = train_data._dataset.training_sequences()
    for _ in range(batches):
        rows = torch.randperm(len(lengths), generator=generator)[: PAPER["rows"]]
        seq, length = sequences[rows], lengths[rows]
        kept = length.clamp(max=PAPER["items"] + 1)  # the last items of the history, and its target
        slot = torch.arange(seq.shape[1])[None, :]
        last = (slot < length[:, None]) & (slot >= (length - kept)[:, None])  # slots length-kept .. length-1
        tokens = 1 + torch.where(last, token_len[seq] + 1, 0).sum(1)  # [CF_USER], then text + [ITEM] per item
        padded.append(len(rows) * int(tokens.max()))
        packed.append(int(tokens.sum()))
    return {"batches": batches, "padded_mean": sum(padded) / batches, "padded_max": max(padded),
            "packed_mean": sum(packed) / batches, "packed_max": max(packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048], help="tokens per row")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows per batch (default 4); --paper_step: users per batch (default 64, the paper's)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                        help="backbone depths (the table: the first; the per-layer cost: the difference)")
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated, of {', '.join(SETTINGS)} (default: all; --paper_step: the last)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="json file (default benchmarks/results/memory-cpu.json; "
                        "--paper_step: memory-paper-step-<device>.json)")
    parser.add_argument("--cache_dir", default=str(ROOT / "saved" / "item_text_cache"))
    parser.add_argument("--from_json", help="report the rows of this earlier --out file again; measure nothing")
    parser.add_argument("--paper_step", action="store_true",
                        help="one whole training step of the paper profile's DARec-tokens, measured")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--paper_step: override a setting of the row (yaml value), e.g. --set llm_path=...")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # a child process: one setting, one depth
    args = parser.parse_args()
    args.data_path = args.data_path or default_data_path(args.dataset)
    args.rows = args.rows or (PAPER["rows"] if args.paper_step else 4)
    settings = (args.settings or ("sdpa+checkpointing" if args.paper_step else ",".join(SETTINGS))).split(",")
    if unknown := set(settings) - set(SETTINGS):
        raise SystemExit(f"--settings: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(SETTINGS)}")
    if args.setting:
        print("ROWS " + json.dumps([measure_paper_step(args)] if args.paper_step else measure_child(args)))
        return
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        if "history_tokens" in earlier["rows"][0]:  # a --paper_step file
            print(paper_step_report(earlier["rows"]))
            return
        batch = paper_batch_tokens(args.dataset, args.data_path, args.cache_dir)
        print(report(earlier["rows"], sorted({row["layers"] for row in earlier["rows"]}), batch))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for layers in [None] if args.paper_step else args.layers:
        for setting in settings:
            command = [sys.executable, __file__, f"--dataset={args.dataset}", f"--data_path={args.data_path}",
                       f"--rows={args.rows}", f"--setting={setting}", f"--threads={args.threads}",
                       f"--cache_dir={args.cache_dir}"]
            if args.paper_step:
                command += ["--paper_step", *(f"--set={item}" for item in args.set)]
            else:
                command += [f"--layers={layers}", "--tokens", *map(str, args.tokens)]
            child = subprocess.run(command, env=env, capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{setting}, {layers or 'all'} layers failed:\n{child.stderr[-3000:]}")
            output = child.stdout
            rows += json.loads(next(line[5:] for line in output.splitlines() if line.startswith("ROWS ")))
            print(f"done: {setting}, {layers or 'all'} layers", file=sys.stderr)
    if args.paper_step:
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"memory-paper-step-{rows[0]['device']}.json")
        record = {"command": " ".join(sys.argv), "rows": rows}
        text = paper_step_report(rows)
    else:
        out = Path(args.out or ROOT / "benchmarks" / "results" / "memory-cpu.json")
        batch = paper_batch_tokens(args.dataset, args.data_path, args.cache_dir)
        record = {"command": " ".join(sys.argv), "rows": rows, "paper_batch_tokens": batch}
        text = report(rows, args.layers, batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(text)


def paper_step_report(rows: list[dict]) -> str:
    lines = ["One training step of the paper profile's DARec-tokens (benchmarks/profiles/paper.yaml) on the training "
             "batch with the most history tokens; peak memory of the step above the state before it, and in all:", "",
             "| setting | device | layers | users | history tokens | target items | bf16 | peak above | peak in all "
             "| measure | step s, with glibc's mmap threshold fixed (not a speed figure) |", "|---" * 11 + "|"]
    for r in rows:
        if "out_of_memory_mb" in r:
            peaks = f"out of memory | over {r['out_of_memory_mb'] / 1024:.0f} GB | {r['measure']} | -"
        else:
            peaks = (f"{r['peak_mb'] / 1024:.2f} GB | {r['peak_total_mb'] / 1024:.2f} GB | {r['measure']} | "
                     f"{r['step_s']:.1f}")
        lines.append(f"| {r['setting']} | {r['device']} | {r['layers']} | {r['rows']} | {r['history_tokens']:,} | "
                     f"{r['target_items']} | {r['llm_bf16']} | {peaks} |")
    return "\n".join(lines)


def report(rows: list[dict], depths: list[int], batch: dict) -> str:
    shallow = depths[0]
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    tokens = sorted({row["tokens"] for row in rows})
    peak = {(r["setting"], r["layers"], r["tokens"]): r["peak_mb"] for r in rows}
    seconds = {(r["setting"], r["layers"], r["tokens"]): r["step_s"] for r in rows}
    n_rows = rows[0]["rows"]
    lines = [f"Peak RSS of one training step (MB above the model), {n_rows} rows, {shallow} layers:", "",
             "| setting | " + " | ".join(f"{t} tokens" for t in tokens) + " | growth per doubling | step s at "
             f"{tokens[-1]} |", "|---" * (len(tokens) + 3) + "|"]
    for setting in settings:
        values = [peak[(setting, shallow, t)] for t in tokens]
        growth = (values[-1] / values[0]) ** (1 / max(len(values) - 1, 1))
        lines.append(f"| {setting} | " + " | ".join(f"{v:,.0f}" for v in values) + f" | {growth:.2f}x | "
                     f"{seconds[(setting, shallow, tokens[-1])]:.1f} |")
    if len(depths) > 1:
        deep = depths[-1]
        lines += ["", f"Paper profile estimate ({PAPER['rows']} users, their last {PAPER['items']} items at "
                  f"{ITEM_TOKENS} tokens, {PAPER['layers']} layers), linear in tokens from the {tokens[-1]}-token "
                  f"step, the cost per layer from {shallow} vs {deep} layers; tokens of the largest of "
                  f"{batch['batches']} shuffled training batches: padded to the batch's longest history "
                  f"{batch['padded_max']:,}, packed {batch['packed_max']:,} (means {batch['padded_mean']:,.0f} and "
                  f"{batch['packed_mean']:,.0f}):"]
        for setting in settings:
            base, more = peak[(setting, shallow, tokens[-1])], peak[(setting, deep, tokens[-1])]
            per_layer = (more - base) / (deep - shallow)
            per_token = (base + per_layer * (PAPER["layers"] - shallow)) / (n_rows * tokens[-1])  # MB
            padded, packed = (per_token * batch[key] / 1024 for key in ("padded_max", "packed_max"))
            note = ""
            if setting == "eager":  # its probabilities grow with the square of the row
                note = " (the probabilities grow with the square of the row: more than this)"
            lines.append(f"- {setting}: {per_layer:,.0f} MB per layer at {tokens[-1]} tokens -> about {padded:,.0f} "
                         f"GB padded, {packed:,.0f} GB packed{note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
