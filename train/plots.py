"""PNG plots: training curves from the JSONL log, and held-out MSE by token type."""

from __future__ import annotations

import json
from pathlib import Path

from steer.errors import ConfigError, MissingFileError
from train.evaluate import EvalResult

CURVES = (
    ("loss", "loss"),
    ("mse", "MSE (sum over d_in)"),
    ("l0", "L0"),
    ("dead_share", "dead-feature share"),
)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | Path) -> list[dict]:
    """The records of a `train_log.jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no training log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(log_path: str | Path, out_dir: str | Path) -> Path:
    """`training_curves.png`: loss, MSE, L0 and dead share against tokens, one line per SAE."""
    records = read_log(log_path)
    if not records:
        raise ConfigError(f"{log_path} holds no log records yet")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    tokens = [r["tokens"] for r in records]
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for name in records[-1]["saes"]:
            ax.plot(tokens, [r["saes"][name][key] for r in records], label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens")
        if key in ("loss", "mse"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir) / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_mse_by_token_type(result: EvalResult, out_dir: str | Path, top: int = 20) -> Path:
    """`mse_by_token_type.png`: per-element MSE of the most frequent token types (log scale)."""
    items = list(result.mse_by_token_type.items())[:top]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(items) + 2), 3.6))
    ax.bar(range(len(items)), [v["mse"] for _, v in items], color="tab:blue")
    ax.set_xticks(range(len(items)), [f"{k}\n({v['tokens']})" for k, v in items], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("MSE per element")
    ax.set_title(f"held-out MSE by token type (layer {result.layer})", fontsize=10)
    fig.tight_layout()
    out = Path(out_dir) / "mse_by_token_type.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
