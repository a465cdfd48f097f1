"""What the benchmark scripts share: profiles, a row's settings, the data folder, ``--set`` overrides.

A script's own folder is the first entry of ``sys.path`` when Python runs it, so every script here imports this
module as ``common`` without touching ``sys.path``; tests add ``benchmarks/`` to the path themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["recall@10", "recall@50", "ndcg@10", "ndcg@50", "mrr@10", "mrr@50"]


def default_data_path(dataset: str) -> str | None:
    """The project's dataset/ folder, else the prepared shared copy beside the checkout (amazon-scientific)."""
    for root in (ROOT / "dataset", ROOT.parent / "shared" / "datasets"):
        if (root / dataset / f"{dataset}.inter").is_file():
            return str(root)
    return None


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value of the seeds of two rows (unequal variances)."""
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def load_profile(name: str) -> dict:
    """``benchmarks/profiles/<name>.yaml``, or a yaml file given by its path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "benchmarks" / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--profile: {path} not found")
    return yaml.safe_load(path.read_text())


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` flags as settings, each value read as yaml (``~`` = None, ``[1, 2]`` = a list)."""
    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}


def row_config(profile: dict, variant: str, seed: int, data_path: str | None, out_dir: Path,
               overrides: dict) -> tuple[str, dict]:
    """The model name and settings of one row: the profile's common settings, the variant's, then ``overrides``."""
    if variant not in profile["variants"]:
        raise SystemExit(f"--models: unknown variant '{variant}'; the profile defines {', '.join(profile['variants'])}")
    if "checkpoint_dir" in overrides:
        raise SystemExit("--set checkpoint_dir: a row keeps its checkpoints in <--out>/saved, where an interrupted "
                         "row resumes from; choose the folder with --out instead")
    settings = {**profile.get("common", {}), **profile["variants"][variant], **overrides}
    model = settings.pop("model")
    settings.update({"seed": seed, "checkpoint_dir": str(out_dir / "saved")})
    # The item text cache depends only on the backbone and the item text, so rows of other result folders may
    # share one (--set item_text_cache_dir=...) instead of computing it again. Resolved here: rows run in out_dir.
    cache_dir = overrides.get("item_text_cache_dir")
    settings["item_text_cache_dir"] = str(Path(cache_dir).resolve() if cache_dir
                                          else out_dir / "saved" / "item_text_cache")
    if data_path:
        settings["data_path"] = str(Path(data_path).resolve())  # as the cache: a relative one would miss there
    return model, settings


def full_sequence(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's histories with their target item appended, as a DARec model's ``calculate_loss`` builds
    them: items (B, L+1) and lengths (B,)."""
    item_seq, item_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    full_seq = torch.cat([item_seq, torch.zeros_like(item_seq[:, :1])], dim=1)
    full_seq[torch.arange(len(item_len)), item_len] = batch[model.POS_ITEM_ID]
    return full_seq, item_len + 1
