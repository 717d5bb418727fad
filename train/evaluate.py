"""Held-out evaluation of an SAE on conversations processed FAST-style (one conversation per sequence).

Metrics (`EvalResult.metrics`):
- `mse`: squared error per element, averaged over each sequence's tokens, then over sequences; `log2_mse`;
- `mse_st`, `log2_mse_st`: the same on special-token positions only (template special tokens and the
  role-name tokens after them, `steer.positions`);
- `l0`, `explained_variance` (1 - SSE / total sum of squares around the mean residual), the same for a
  zero-feature SAE that outputs `b_dec` (`explained_variance_bdec_only`), `dead_share` (never fired on the
  held-out tokens), `dense_share` (fired on more than `dense_threshold` of them);
- `ce_clean`, `ce_spliced`, `delta_lm_loss` (absolute, nats) and `delta_lm_loss_pct`: next-token
  cross-entropy with the SAE reconstruction spliced in after layer L versus the clean model.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.positions import SpecialTokens, resolve_special_tokens
from steer.sae import SAE
from train.harvest import Harvester, decoder_layers
from train.sequences import Batch, bucket_batches, fast_sequences

EVAL_FILE = "eval.json"
FIRST = "first token"
OTHER = "other tokens"


@dataclass
class EvalConfig:
    max_conversations: int = 200
    max_len: int = 2048  # FAST truncation of each held-out conversation
    token_budget: int = 8192  # padded tokens per forward
    dense_threshold: float = 0.1
    extra_special_tokens: tuple[str | int, ...] = ()  # added to the template's special tokens for MSE_st
    lm_loss: bool = True
    # Leave position 0 out of the headline metrics and the LM-loss splice (it is still reported under
    # "first token"). None follows the SAE's training (`metadata.exclude_first_token`).
    exclude_first_token: bool | None = None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    mse_by_token_type: dict[str, dict[str, float]]  # label -> {"mse", "tokens"}
    special_tokens: dict[str, Any]
    n_sequences: int
    n_tokens: int
    layer: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    """Running sums over held-out tokens."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.seq_mse: list[float] = []
        self.seq_mse_st: list[float] = []
        self.sse = 0.0
        self.sse_bdec = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.l0_sum = 0.0
        self.tokens = 0
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.ce_clean = 0.0
        self.ce_spliced = 0.0
        self.ce_tokens = 0

    def add_sequence(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        feats: torch.Tensor,
        b_dec: torch.Tensor,
        special: torch.Tensor,
        labels: list[str | None],
        skip_first: bool = False,
    ) -> None:
        err = (recon - x).pow(2).mean(dim=-1)  # per token, per element
        self.by_type[FIRST][0] += err[0].item()
        self.by_type[FIRST][1] += 1
        for e, label in zip(err[1:].tolist(), labels[1:], strict=True):
            key = label if label is not None else OTHER
            self.by_type[key][0] += e
            self.by_type[key][1] += 1
        if skip_first:
            x, recon, feats, special, err = x[1:], recon[1:], feats[1:], special[1:], err[1:]
        self.seq_mse.append(err.mean().item())
        if special.any():
            self.seq_mse_st.append(err[special].mean().item())
        self.sse += (recon - x).double().pow(2).sum().item()
        self.sse_bdec += (x - b_dec).double().pow(2).sum().item()
        self.sum_x += x.double().sum(dim=0)
        self.sum_sq += x.double().pow(2).sum().item()
        fired = feats > 0
        self.l0_sum += fired.sum().item()
        self.fired += fired.sum(dim=0)
        self.tokens += x.shape[0]

    def metrics(self, dense_threshold: float) -> dict[str, float]:
        sst = self.sum_sq - (self.sum_x.pow(2).sum().item() / self.tokens)
        mse = sum(self.seq_mse) / len(self.seq_mse)
        mse_st = sum(self.seq_mse_st) / len(self.seq_mse_st) if self.seq_mse_st else float("nan")
        freq = self.fired.double() / self.tokens
        out = {
            "mse": mse,
            "log2_mse": math.log2(mse) if mse > 0 else float("-inf"),
            "mse_st": mse_st,
            "log2_mse_st": math.log2(mse_st) if mse_st > 0 else float("nan"),
            "l0": self.l0_sum / self.tokens,
            "explained_variance": 1.0 - self.sse / sst,
            "explained_variance_bdec_only": 1.0 - self.sse_bdec / sst,
            "dead_share": (freq == 0).double().mean().item(),
            "dense_share": (freq > dense_threshold).double().mean().item(),
        }
        if self.ce_tokens:
            clean, spliced = self.ce_clean / self.ce_tokens, self.ce_spliced / self.ce_tokens
            out.update(
                ce_clean=clean,
                ce_spliced=spliced,
                delta_lm_loss=spliced - clean,
                delta_lm_loss_pct=100.0 * (spliced - clean) / clean,
            )
        return out


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _token_ce(logits: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Summed next-token cross-entropy over real positions, and their count."""
    labels = batch.input_ids[:, 1:].to(logits.device)
    keep = (batch.attention_mask[:, 1:] == 1).to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none")
    return ce[keep.flatten()].sum().item(), int(keep.sum())


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    layer: int,
    cfg: EvalConfig | None = None,
    special: SpecialTokens | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `sae` on the residuals after decoder block `layer` of `model` on `conversations`."""
    cfg = cfg or EvalConfig()
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    hidden_size = model.config.get_text_config().hidden_size
    if sae.d_in != hidden_size:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the model's hidden size {hidden_size}")
    if not conversations:
        raise ValueError("no held-out conversations to evaluate on")
    special = special or resolve_special_tokens(tokenizer, extra=cfg.extra_special_tokens)
    skip_first = cfg.exclude_first_token
    if skip_first is None:
        skip_first = bool(sae.metadata.get("exclude_first_token", False))
    names = dict(special.names)
    seqs = fast_sequences(list(conversations)[: cfg.max_conversations], tokenizer, max_len=cfg.max_len)
    batches = bucket_batches(seqs, cfg.token_budget, tokenizer.pad_token_id, seed=None)
    acc = _Accumulator(sae.d_in, sae.d_sae)
    device = next(model.parameters()).device
    sae_device = sae.W_enc.device
    b_dec = sae.b_dec.detach().float().to(sae_device)
    state: dict[str, torch.Tensor] = {}

    def capture(_module, _args, output):
        state["clean"] = _hidden(output)

    def splice(_module, _args, output):
        hidden = _hidden(output)
        mask = state["mask"].unsqueeze(-1)
        return _replace_hidden(output, torch.where(mask, state["recon"].to(hidden.dtype), hidden))

    bar = tqdm(
        total=sum(b.n_tokens for b in batches), unit="tok", unit_scale=True, desc="eval", disable=not progress
    )
    harvester = Harvester(model, layer)
    for batch in batches:
        ids, att = batch.input_ids.to(device), batch.attention_mask.to(device)
        if cfg.lm_loss:  # the clean logits are needed too: a whole forward, capturing layer L on the way
            handle = layers[layer].register_forward_hook(capture)
            try:
                logits = model(input_ids=ids, attention_mask=att).logits
            finally:
                handle.remove()
        else:  # right-padded: the forward that stops after layer L sees the same real tokens
            logits, state["clean"] = None, harvester.residuals(batch)
        x_all = state["clean"].float().to(sae_device)
        feats_all = sae.encode(x_all)
        recon_all = sae.decode(feats_all).float()
        st_mask = special.mask(batch.input_ids, batch.attention_mask)
        for row, n in enumerate(batch.lengths):
            ids_row = batch.input_ids[row, :n].tolist()
            labels = [
                names.get(t) if m else None for t, m in zip(ids_row, st_mask[row, :n].tolist(), strict=True)
            ]
            acc.add_sequence(
                x_all[row, :n],
                recon_all[row, :n],
                feats_all[row, :n],
                b_dec,
                st_mask[row, :n],
                labels,
                skip_first=skip_first,
            )
        if cfg.lm_loss:
            ce, n_ce = _token_ce(logits, batch)
            splice_mask = att.bool()
            if skip_first:
                splice_mask[:, 0] = False  # batches are right-padded: column 0 is each sequence's first token
            state["recon"], state["mask"] = recon_all.to(device), splice_mask
            handle = layers[layer].register_forward_hook(splice)
            try:
                spliced_logits = model(input_ids=ids, attention_mask=att).logits
            finally:
                handle.remove()
            ce_sp, _ = _token_ce(spliced_logits, batch)
            acc.ce_clean += ce
            acc.ce_spliced += ce_sp
            acc.ce_tokens += n_ce
        bar.update(batch.n_tokens)
    bar.close()
    by_type = {
        k: {"mse": s / n, "tokens": n} for k, (s, n) in sorted(acc.by_type.items(), key=lambda kv: -kv[1][1])
    }
    return EvalResult(
        metrics=acc.metrics(cfg.dense_threshold),
        mse_by_token_type=by_type,
        special_tokens=special.to_dict(),
        n_sequences=len(seqs),
        n_tokens=acc.tokens,
        layer=layer,
        config={**asdict(cfg), "exclude_first_token": skip_first},
    )


def write_eval(result: EvalResult, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the evaluation JSON (`eval.json` beside the SAE by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), **result.to_dict()}, indent=2) + "\n", encoding="utf-8")
    return path


def format_table(result: EvalResult) -> str:
    """A human-readable table of the metrics and of the MSE by token type."""
    m = result.metrics
    rows = [
        ("MSE (per element, per sequence)", m["mse"]),
        ("log2 MSE", m["log2_mse"]),
        ("MSE_st (special tokens)", m["mse_st"]),
        ("log2 MSE_st", m["log2_mse_st"]),
        ("L0", m["l0"]),
        ("explained variance", m["explained_variance"]),
        ("  b_dec-only baseline", m["explained_variance_bdec_only"]),
        ("dead features", m["dead_share"]),
        ("dense features", m["dense_share"]),
    ]
    if "delta_lm_loss" in m:
        rows += [
            ("CE clean (nats)", m["ce_clean"]),
            ("CE with SAE spliced", m["ce_spliced"]),
            ("delta LM loss", m["delta_lm_loss"]),
            ("delta LM loss %", m["delta_lm_loss_pct"]),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"held-out: {result.n_sequences} conversations, {result.n_tokens} tokens, layer {result.layer}"]
    if result.config.get("exclude_first_token"):
        lines.append("first token of each conversation left out (as in training); see 'first token' below")
    lines += [f"{name:<{width}}  {value:>12.5g}" for name, value in rows]
    st = result.special_tokens
    lines.append(f"special-token set: {st['special_tokens']} + role names {st['role_tokens']}")
    lines.append("MSE by token type:")
    tw = max(len(k) for k in result.mse_by_token_type)
    for label, v in result.mse_by_token_type.items():
        lines.append(f"  {label!r:<{tw + 2}}  {v['mse']:>12.5g}  ({v['tokens']} tokens)")
    return "\n".join(lines)
