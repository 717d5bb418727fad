"""Held-out evaluation of an SAE on conversations processed FAST-style (one conversation per sequence).

Metrics (`EvalResult.metrics`):
- `mse`: squared error per element, averaged over each sequence's tokens, then over sequences; `log2_mse`;
- `mse_st`, `log2_mse_st`: the same on the paper's Table 11 special-token positions (`paper_st_tokens`:
  ChatML `<|im_start|>`, `<|im_end|>`, `user`, `assistant`; Llama-3 headers and `<|eot_id|>`; the other
  chat families in the function's docstring);
  `mse_st_after_first` / `log2_mse_st_after_first` on those positions after position 0 (the attention
  sink, whose norm is ~100x the rest on SmolLM2), whether or not position 0 is scored;
  `mse_st_template` / `log2_mse_st_template` on every template special and role-name token
  (`steer.positions`, `system` included); `system` and the first token also have their own rows in
  `mse_by_token_type`;
- `l0`, `explained_variance` (1 - SSE / total sum of squares around the mean residual), the same for a
  zero-feature SAE that outputs `b_dec` (`explained_variance_bdec_only`), `dead_share` (never fired on the
  held-out tokens), `dense_share` (fired on more than `dense_threshold` of them);
- `ce_clean`, `ce_spliced`, `delta_lm_loss` (absolute, nats) and `delta_lm_loss_pct`: next-token
  cross-entropy with the SAE reconstruction spliced in after layer L versus the clean model.

One forward per batch: blocks 0..L run once on the B clean rows; a hook on block L encodes and decodes
their real tokens with the SAE and hands on 2B rows (clean, then spliced), so the later blocks give the
clean and the spliced logits together. `evaluate_saes` does the same for k SAEs of one layer with
(k + 1)B rows, sharing blocks 0..L and the clean rows. The LM head runs only on the positions whose next token is real
(not on padding), and the cross-entropy is taken in row chunks. Batches are right-padded and run without
an attention mask (a real token never attends to padding on its right; see `train.harvest`), so the other
inputs of the later blocks (positions, rotary tables) are shared by all rows; a batch-sized one (an eager
attention mask) is repeated. Without the LM loss the forward stops after block L. The sums stay tensors
on the SAE's device until the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.errors import ConfigError
from steer.positions import SINK_POSITION, SpecialTokens, pad_token_id, resolve_special_tokens
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
    token_budget: int = 8192  # padded tokens per forward (the LM-loss forward carries twice as many rows)
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
    # which conversations were evaluated: {"split", "conversations", "available", ...} (`split_line`)
    split: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """The result an `eval.json` holds (extra header keys ignored, optional fields defaulted)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class _TokenLabels:
    """Token-type label of every position: FIRST at position 0, the token string at marked positions
    whose id has a name, OTHER elsewhere (as indices into `names`)."""

    def __init__(self, special: SpecialTokens) -> None:
        strings = sorted({name for _, name in special.names})
        self.names = [FIRST, OTHER, *strings]
        index = {name: i for i, name in enumerate(self.names)}
        ids = [tid for tid, _ in special.names]
        self.table = torch.full((max(ids, default=0) + 1,), 1, dtype=torch.long)  # 1 = OTHER
        for tid, name in special.names:
            self.table[tid] = index[name]

    def __call__(self, input_ids: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        """[B, T] label indices of right-padded `input_ids` ([B, T]) with their special-token mask."""
        table = self.table.to(input_ids.device)
        inside = input_ids < len(table)
        named = table[input_ids.clamp(max=len(table) - 1)]
        labels = torch.where(marked & inside, named, torch.ones_like(input_ids))
        labels[:, 0] = 0  # FIRST
        return labels


@dataclass
class _Tokens:
    """The real tokens of a right-padded batch, flattened in row-major order (all on one device)."""

    real: torch.Tensor  # [B, T] bool: not padding
    seq: torch.Tensor  # [N] row of each real token
    keep: torch.Tensor  # [N] bool: scored (and spliced); False at position 0 when it is left out
    later: torch.Tensor  # [N] bool: after position 0
    special: torch.Tensor  # [N] bool: the paper's Table 11 special-token positions (`paper_st_tokens`)
    template: torch.Tensor  # [N] bool: every template special and role-name position
    labels: torch.Tensor  # [N] token-type indices

    @classmethod
    def of(
        cls,
        batch: Batch,
        template: SpecialTokens,
        paper: SpecialTokens,
        labeller: _TokenLabels,
        skip_first: bool,
        device,
    ) -> _Tokens:
        real = batch.attention_mask.to(device).bool()
        rows, length = real.shape
        seq = torch.arange(rows, device=device).unsqueeze(1).expand(rows, length)[real]
        pos = torch.arange(length, device=device).expand(rows, length)[real]
        marked = template.mask(batch.input_ids, batch.attention_mask).to(device)
        primary = paper.mask(batch.input_ids, batch.attention_mask).to(device)
        labels = labeller(batch.input_ids.to(device), marked)
        later = pos > SINK_POSITION
        keep = later if skip_first else torch.ones_like(pos, dtype=torch.bool)
        return cls(real, seq, keep, later, primary[real], marked[real], labels[real])


def paper_st_tokens(template: SpecialTokens, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """The paper's Table 11 MSE_st set, by token id: the template's special tokens that a rendered
    user/assistant chat holds inside it (not only at its first or last position, as a begin-of-text
    `<|begin_of_text|>` / `<bos>` or a closing eos; not only in a system turn, as Phi's `<|system|>`),
    and the `user` and `assistant` role names (not `system`). ChatML: `<|im_start|>`, `<|im_end|>`,
    `user`, `assistant` (Qwen3 adds `<think>`, `</think>`); Llama 3: the header tokens and `<|eot_id|>`;
    Gemma: `<start_of_turn>`, `<end_of_turn>`, `user`, `model`; Mistral: `[INST]`, `[/INST]`, `</s>`;
    Phi-3 / 4: `<|user|>`, `<|assistant|>`, `<|end|>`."""
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    ids = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    inside = set(ids[1:-1])
    keep = [i for i in template.special_ids if i in inside]
    return template.subset(keep, ("user", "assistant"))


class _Accumulator:
    """Running sums over held-out tokens, kept as tensors on `device`."""

    def __init__(self, d_in: int, d_sae: int, n_labels: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.seq_mse: list[torch.Tensor] = []
        self.seq_mse_st: list[torch.Tensor] = []
        self.seq_mse_st_template: list[torch.Tensor] = []
        self.seq_mse_st_after_first: list[torch.Tensor] = []
        self.sse, self.sse_bdec, self.sum_sq = zeros(), zeros(), zeros()
        self.sum_x = zeros(d_in)
        self.l0_sum, self.tokens = zeros(dtype=torch.long), zeros(dtype=torch.long)
        self.fired = zeros(d_sae, dtype=torch.long)
        self.type_sse, self.type_tokens = zeros(n_labels), zeros(n_labels, dtype=torch.long)
        self.ce_clean, self.ce_spliced, self.ce_tokens = zeros(), zeros(), zeros(dtype=torch.long)

    def add_batch(
        self, x: torch.Tensor, recon: torch.Tensor, feats: torch.Tensor, b_dec: torch.Tensor, tokens: _Tokens
    ) -> None:
        """One batch's real tokens: x, recon [N, d] float32 and feats [N, d_sae]."""
        err = (recon - x).pow(2).mean(dim=-1)  # per token, per element
        self.type_sse.index_add_(0, tokens.labels, err.double())
        self.type_tokens += torch.bincount(tokens.labels, minlength=len(self.type_tokens))
        keep, rows = tokens.keep, len(tokens.real)
        self.seq_mse.append(self._per_row_mean(err, tokens.seq, keep, rows)[0])
        st_mean, n_st = self._per_row_mean(err, tokens.seq, keep & tokens.special, rows)
        self.seq_mse_st.append(st_mean[n_st > 0])
        st_mean, n_st = self._per_row_mean(err, tokens.seq, keep & tokens.template, rows)
        self.seq_mse_st_template.append(st_mean[n_st > 0])
        st_mean, n_st = self._per_row_mean(err, tokens.seq, tokens.later & tokens.special, rows)
        self.seq_mse_st_after_first.append(st_mean[n_st > 0])
        xk, rk = x[keep].double(), recon[keep].double()
        self.sse += (rk - xk).pow(2).sum()
        self.sse_bdec += (xk - b_dec.double()).pow(2).sum()
        self.sum_x += xk.sum(dim=0)
        self.sum_sq += xk.pow(2).sum()
        fired = feats[keep] > 0
        self.fired += fired.sum(dim=0)
        self.l0_sum += fired.sum()
        self.tokens += keep.sum()

    @staticmethod
    def _per_row_mean(
        err: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of `err` over the `mask`ed tokens of each row (float64 [rows]), and their counts."""
        total = torch.zeros(rows, dtype=torch.float64, device=err.device).index_add_(
            0, seq[mask], err[mask].double()
        )
        count = torch.bincount(seq[mask], minlength=rows)
        return total / count, count

    def add_ce(self, clean: torch.Tensor, spliced: torch.Tensor, n: torch.Tensor) -> None:
        self.ce_clean += clean
        self.ce_spliced += spliced
        self.ce_tokens += n

    def by_type(self, names: list[str]) -> dict[str, dict[str, float]]:
        sse, counts = self.type_sse.tolist(), self.type_tokens.tolist()
        rows = [(name, s, n) for name, s, n in zip(names, sse, counts, strict=True) if n]
        return {name: {"mse": s / n, "tokens": n} for name, s, n in sorted(rows, key=lambda r: -r[2])}

    def metrics(self, dense_threshold: float) -> dict[str, float]:
        sum_sq, sse, sse_bdec, tokens = (
            self.sum_sq.item(),
            self.sse.item(),
            self.sse_bdec.item(),
            int(self.tokens),
        )
        sst = sum_sq - self.sum_x.pow(2).sum().item() / tokens
        mse = torch.cat(self.seq_mse).mean().item()
        mse_st, mse_st_template, mse_st_after_first = (
            st.mean().item() if len(st) else float("nan")
            for st in (
                torch.cat(self.seq_mse_st),
                torch.cat(self.seq_mse_st_template),
                torch.cat(self.seq_mse_st_after_first),
            )
        )
        freq = self.fired.double() / tokens
        out = {
            "mse": mse,
            "log2_mse": math.log2(mse) if mse > 0 else float("-inf"),
            "mse_st": mse_st,
            "log2_mse_st": math.log2(mse_st) if mse_st > 0 else float("nan"),
            "mse_st_template": mse_st_template,
            "log2_mse_st_template": math.log2(mse_st_template) if mse_st_template > 0 else float("nan"),
            "mse_st_after_first": mse_st_after_first,
            "log2_mse_st_after_first": math.log2(mse_st_after_first)
            if mse_st_after_first > 0
            else float("nan"),
            "l0": self.l0_sum.item() / tokens,
            "explained_variance": 1.0 - sse / sst,
            "explained_variance_bdec_only": 1.0 - sse_bdec / sst,
            "dead_share": (freq == 0).double().mean().item(),
            "dense_share": (freq > dense_threshold).double().mean().item(),
        }
        n_ce = int(self.ce_tokens)
        if n_ce:
            clean, spliced = self.ce_clean.item() / n_ce, self.ce_spliced.item() / n_ce
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


@contextmanager
def _clean_and_spliced(
    model: PreTrainedModel,
    layer: int,
    rows: int,
    splice: Callable[[torch.Tensor], list[torch.Tensor]],
    heads: torch.Tensor,
) -> Iterator[None]:
    """While active, block `layer` hands on `[clean; *splice(clean)]` (k x `rows` rows), the later blocks
    see every other batch-sized input (an eager attention mask) repeated to match, and the LM head runs
    only on the positions where `heads` ([k x rows, T] bool) is set: the logits come out as [n, V]."""
    layers = decoder_layers(model)
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ConfigError(
            f"{type(model).__name__} has no output embeddings (LM head) to compute the LM loss with"
        )
    copies = heads.shape[0] // rows

    def stack(_module, _args, output):
        clean = _hidden(output)
        if clean.shape[0] != rows:
            raise RuntimeError(f"block {layer} saw {clean.shape[0]} rows, expected the batch's {rows}")
        return _replace_hidden(output, torch.cat([clean, *splice(clean)]))

    def widen(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == rows:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        if isinstance(value, tuple):
            return tuple(widen(v) for v in value)
        return value

    def widen_inputs(_module, args, kwargs):
        return (args[0], *(widen(a) for a in args[1:])), {k: widen(v) for k, v in kwargs.items()}

    def select(_module, args):
        hidden = args[0]
        if hidden.shape[:2] != heads.shape:
            raise RuntimeError(f"the LM head saw {tuple(hidden.shape)}, expected {tuple(heads.shape)} + (d,)")
        return (hidden[heads], *args[1:])

    handles = [layers[layer].register_forward_hook(stack), lm_head.register_forward_pre_hook(select)]
    if rows > 1:  # a single row's inputs broadcast over all copies
        handles += [m.register_forward_pre_hook(widen_inputs, with_kwargs=True) for m in layers[layer + 1 :]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_inputs(sae: SAE, model: PreTrainedModel, layer: int, conversations: Sequence) -> None:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    hidden_size = model.config.get_text_config().hidden_size
    if sae.d_in != hidden_size:
        raise ConfigError(f"SAE d_in={sae.d_in} does not match the model's hidden size {hidden_size}")
    if not conversations:
        raise ConfigError("no held-out conversations to evaluate on")


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
    """Evaluate `sae` on the residuals after decoder block `layer` of `model` on `conversations` (the first
    `cfg.max_conversations` of them). The SAE may sit on another device than the model."""
    return evaluate_saes([sae], model, tokenizer, conversations, layer, cfg, special, progress)[0]


@torch.no_grad()
def evaluate_saes(
    saes: Sequence[SAE],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    layer: int,
    cfg: EvalConfig | None = None,
    special: SpecialTokens | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """`evaluate_sae` for several SAEs of one layer in one pass: blocks 0..L and the clean logits run once
    per batch, and each SAE adds only its spliced rows (so k SAEs cost far less than k evaluations).
    Each batch holds `cfg.token_budget` x 2 / (k + 1) padded tokens, so a forward carries as many rows
    as one SAE's would."""
    cfg = cfg or EvalConfig()
    if not saes:
        raise ConfigError("no SAEs to evaluate")
    for sae in saes:
        _check_inputs(sae, model, layer, conversations)
    special = special or resolve_special_tokens(tokenizer, extra=cfg.extra_special_tokens)
    skips = [
        bool(sae.metadata.get("exclude_first_token", False))
        if cfg.exclude_first_token is None
        else cfg.exclude_first_token
        for sae in saes
    ]
    seqs = fast_sequences(list(conversations)[: cfg.max_conversations], tokenizer, max_len=cfg.max_len)
    budget = max(1, 2 * cfg.token_budget // (len(saes) + 1)) if cfg.lm_loss else cfg.token_budget
    batches = bucket_batches(seqs, budget, pad_token_id(tokenizer), seed=None)
    paper = paper_st_tokens(special, tokenizer)
    labeller = _TokenLabels(special)
    accs = [_Accumulator(sae.d_in, sae.d_sae, len(labeller.names), sae.W_enc.device) for sae in saes]
    b_decs = [sae.b_dec.detach().float() for sae in saes]
    harvester = Harvester(model, layer)
    bar = tqdm(total=sum(b.n_tokens for b in batches), unit="tok", unit_scale=True, desc="eval",
               disable=not progress)  # fmt: skip
    for batch in batches:
        tokens = [
            _Tokens.of(batch, special, paper, labeller, skip, sae.W_enc.device)
            for sae, skip in zip(saes, skips, strict=True)
        ]
        if cfg.lm_loss:
            outs, ces, n_ce = _forward_with_splice(saes, model, layer, batch, tokens)
            for acc, ce in zip(accs, ces, strict=True):
                acc.add_ce(ce[0].to(acc.sse.device), ce[1].to(acc.sse.device), n_ce.to(acc.sse.device))
        else:  # the forward stops after block L
            residuals = harvester.residuals(batch)
            outs = [_sae_pass(sae, residuals, t.real) for sae, t in zip(saes, tokens, strict=True)]
        for acc, out, b_dec, t in zip(accs, outs, b_decs, tokens, strict=True):
            acc.add_batch(out["x"], out["recon"], out["feats"], b_dec, t)
        bar.update(batch.n_tokens)
    bar.close()
    return [
        EvalResult(
            metrics=acc.metrics(cfg.dense_threshold),
            mse_by_token_type=acc.by_type(labeller.names),
            special_tokens={**special.to_dict(), "paper_table_11": paper.to_dict()},
            n_sequences=len(seqs),
            n_tokens=int(acc.tokens),
            layer=layer,
            config={**asdict(cfg), "exclude_first_token": skip},
        )
        for acc, skip in zip(accs, skips, strict=True)
    ]


def _forward_with_splice(
    saes: Sequence[SAE], model: PreTrainedModel, layer: int, batch: Batch, tokens: Sequence[_Tokens]
) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], torch.Tensor]:
    """One forward of `batch`: each SAE's pass on the clean residuals after block `layer`, and per SAE the
    summed clean and spliced next-token cross-entropies over the positions whose target is real (float64
    [2]) with their count. Each reconstruction replaces the residual at its SAE's kept tokens only."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    real = tokens[0].real.to(device)
    has_target = torch.zeros_like(real)
    has_target[:, :-1] = real[:, 1:]
    outs: list[dict[str, torch.Tensor]] = []

    def splice(clean: torch.Tensor) -> list[torch.Tensor]:
        spliced_rows = []
        for sae, t in zip(saes, tokens, strict=True):
            out = _sae_pass(sae, clean, real)
            outs.append(out)
            at = real.clone()
            at[real] = t.keep.to(device)
            spliced = clean.clone()
            spliced[at] = out["recon"][t.keep].to(device, clean.dtype)
            spliced_rows.append(spliced)
        return spliced_rows

    with _clean_and_spliced(model, layer, len(ids), splice, has_target.repeat(len(saes) + 1, 1)):
        logits = model(input_ids=ids, use_cache=False).logits
    targets = ids[:, 1:][real[:, 1:]]
    n = len(targets)
    clean_ce = _summed_ce(logits[:n], targets)
    ces = [
        torch.stack([clean_ce, _summed_ce(logits[(i + 1) * n : (i + 2) * n], targets)])
        for i in range(len(saes))
    ]
    return outs, ces, torch.tensor(n)


def _summed_ce(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of [n, V] `logits`, in row chunks (bounded float32 temporaries), float64."""
    parts = [
        F.cross_entropy(lg.float(), tg, reduction="sum").double()
        for lg, tg in zip(logits.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.stack(parts).sum() if parts else logits.new_zeros((), dtype=torch.float64)


def _sae_pass(sae: SAE, residuals: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """The real tokens' float32 residuals `x` ([N, d], on the SAE's device), features and reconstruction."""
    x = residuals[real.to(residuals.device)].to(sae.W_enc.device, torch.float32)
    feats = sae.encode(x)
    return {"x": x, "feats": feats, "recon": sae.decode(feats).float()}


def split_line(split: dict[str, Any]) -> str:
    """'held-out split: 6 of 150 conversations (fraction 0.05)', 'all: 150 of 150 conversations', plus
    the cap by `max_conversations` when it applied."""
    used, total = split["conversations"], split["available"]
    if split["split"] == "held-out":
        detail = [f"fraction {split['held_out_fraction']:g}"]
        if used < split["selected"]:
            detail.append(f"{split['selected']} held out, capped by --max-conversations {used}")
        return f"held-out split: {used} of {total} conversations ({'; '.join(detail)})"
    capped = f" (capped by --max-conversations {used})" if used < total else ""
    return f"all: {used} of {total} conversations{capped}"


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
        ("MSE_st (paper's Table 11 set)", m["mse_st"]),
        ("log2 MSE_st", m["log2_mse_st"]),
        ("MSE_st, after position 0", m["mse_st_after_first"]),
        ("MSE_st, every template token", m["mse_st_template"]),
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
    lines = [split_line(result.split)] if result.split else []
    lines.append(
        f"evaluated: {result.n_sequences} conversations, {result.n_tokens} tokens, layer {result.layer}"
    )
    if result.config.get("exclude_first_token"):
        lines.append("first token of each conversation left out (as in training); see 'first token' below")
    lines += [f"{name:<{width}}  {value:>12.5g}" for name, value in rows]
    st = result.special_tokens
    paper = st["paper_table_11"]
    lines.append(f"MSE_st set (Table 11): {paper['special_tokens']} + role names {paper['role_tokens']}")
    lines.append(f"template set: {st['special_tokens']} + role names {st['role_tokens']}")
    lines.append("MSE by token type:")
    tw = max(len(k) for k in result.mse_by_token_type)
    for label, v in result.mse_by_token_type.items():
        lines.append(f"  {label!r:<{tw + 2}}  {v['mse']:>12.5g}  ({v['tokens']} tokens)")
    return "\n".join(lines)
