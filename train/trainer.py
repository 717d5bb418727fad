"""Train one or several SAEs on one activation stream (so a sweep pays for harvesting once).

Recipe (FAST paper App. C on SAELens 5.3.3): Adam, lr warm-up + cosine decay to a floor + final linear
decay, sparsity-coefficient warm-up, gradient clipping, decoder rows kept at unit norm (the gradient
component parallel to each row is removed before the step, rows renormalised after it), Kaiming-uniform
decoder rows (unit norm) and an encoder drawn independently (`encoder_init="kaiming"`, SAELens) or set to
the decoder's transpose, `b_dec` initialised to the geometric median of the first `init_tokens` training
tokens (SAELens: its first storage half-buffer), `apply_b_dec_to_input=False`. Where activations are
normalised, the factor is estimated on those same tokens (or fixed by `norm_scaling_factor`) and folded
into the saved weights.

The SAE metadata is built when the folders are written (after training), so that it records what the
stream really yielded; `metadata` may be a callable for that reason.

Data-parallel: every process harvests its own shard and yields `batch_size / world_size` tokens per step;
gradients and feature-firing counts are all-reduced, so every process holds identical SAEs; only rank 0
writes SAE folders, logs and the shared checkpoint files (each process adds its own stream state).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from steer.errors import ConfigError
from steer.sae import SAE, SAEConfig, build_sae
from train import checkpoint as ckpt
from train.config import SAETrainSpec, TrainConfig
from train.distributed import DistContext
from train.gsnr import gradient_snr
from train.losses import LossOutput, Objective, build_objective
from train.memory import peak_memory_mib
from train.schedules import LRSchedule, SparsityWarmup

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
CKPT_DIR = "checkpoints"
# Settings that may change between a killed run and its resume; everything else must match.
_RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "gsnr_every", "gsnr_micro_batches"}
# devices with a fused (single-kernel) Adam
_FUSED_ADAM_DEVICES = ("cpu", "cuda")


def finished_run(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a finished training run (its summary says so)."""
    path = Path(out_dir) / SUMMARY_FILE
    return path.is_file() and bool(json.loads(path.read_text()).get("finished"))


class ResumableStream(Protocol):
    """An iterator of float32 `[batch, d_in]` activations that can save and restore its position."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    sae_dirs: list[Path]
    steps: int
    tokens: int
    tokens_per_s: float
    peak_memory_mib: float
    final_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_from_step: int | None = None


def norm_scaling_factor(x: torch.Tensor) -> float:
    """sqrt(d_in) / the mean norm of the rows of `x [n, d_in]` (SAELens `expected_average_only_in`)."""
    return float(x.shape[-1] ** 0.5 / x.float().norm(dim=-1).mean().clamp_min(1e-12))


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points [n, d]`."""
    points = points.double()
    squared_norms = points.square().sum(dim=1)
    median = points.mean(dim=0)
    for _ in range(max_iter):
        # |p - m|^2 = |p|^2 - 2 p.m + |m|^2: two matrix-vector products an iteration, no [n, d] temporaries
        squared = torch.addmv(squared_norms, points, median, alpha=-2).add_(median.dot(median))
        weights = squared.clamp_min_(1e-16).rsqrt_()
        new = (weights @ points).div_(weights.sum())
        moved = (new - median).norm()
        median = new
        if moved <= tol * median.norm().clamp_min(1.0):
            break
    return median.float()


class _Clock:
    """Seconds spent per named phase (`with clock("data"): ...`) and each phase's share of their sum."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"data": 0.0, "step": 0.0}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def shares(self) -> dict[str, float]:
        """`data_share` (the stream: harvesting, mixing, reading) and `step_share` (the SAE steps)."""
        total = max(sum(self.seconds.values()), 1e-9)
        return {f"{phase}_share": seconds / total for phase, seconds in self.seconds.items()}


class SAETrainer:
    """Trains the SAEs of `cfg.saes` side by side on batches of `d_in`-dimensional activations."""

    def __init__(
        self,
        cfg: TrainConfig,
        d_in: int,
        out_dir: str | Path,
        metadata: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
        dist: DistContext | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.d_in = d_in
        self.out_dir = Path(out_dir)
        self.metadata = metadata or {}
        self.dist = dist or DistContext.current()
        self.progress = progress
        self.local_batch = cfg.local_batch_size(self.dist.world_size)
        self.specs: list[SAETrainSpec] = cfg.resolved_specs()
        torch.manual_seed(cfg.seed)
        self.objectives: list[Objective] = [self._build(spec) for spec in self.specs]
        self.optimizers = [
            # fused: one kernel for the whole update (on CPU 3.6x faster than foreach, which is itself faster
            # than the default loop over the parameters); equal to them up to rounding order
            torch.optim.Adam(
                list(obj.trainable_parameters().values()),
                lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                **(
                    {"fused": True}
                    if torch.device(self.dist.device).type in _FUSED_ADAM_DEVICES
                    else {"foreach": True}
                ),
            )
            for obj in self.objectives
        ]
        self.lr_at = LRSchedule(cfg.lr, cfg.lr_end, cfg.total_steps, cfg.lr_warmup_steps, cfg.lr_decay_steps)
        warm = cfg.sparsity_warmup_steps
        self.coefficient_at = [
            SparsityWarmup(spec.sparsity_coefficient or 0.0, warm if spec.arch != "topk" else 0)
            for spec in self.specs
        ]
        # tokens (global) since each feature last fired, per SAE
        device = self.dist.device
        self.since_fired = [
            torch.zeros(o.sae.d_sae, dtype=torch.long, device=device) for o in self.objectives
        ]
        self.autocast = cfg.sae_autocast(device)
        self.step = 0
        self.tokens = 0
        self.scale = cfg.norm_scaling_factor or 1.0  # activation scaling factor (see `initialise`)

    # -- set-up -------------------------------------------------------------------------------
    def _build(self, spec: SAETrainSpec) -> Objective:
        sae_cfg = SAEConfig(
            architecture=spec.arch,
            d_in=self.d_in,
            d_sae=self.d_in * spec.expansion,
            dtype=self.cfg.sae_dtype,
            device=self.dist.device,
            apply_b_dec_to_input=False,
            k=spec.k if spec.arch == "topk" else None,
        )
        if spec.arch == "topk" and spec.k > sae_cfg.d_sae:
            raise ConfigError(f"k={spec.k} exceeds the SAE width d_sae={sae_cfg.d_sae}")
        sae = build_sae(sae_cfg)
        if self.cfg.encoder_init == "kaiming":  # SAELens: W_enc drawn on its own, not W_dec.T
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(sae.W_enc)
        return build_objective(sae, spec).train()

    @property
    def saes(self) -> list[SAE]:
        return [obj.sae for obj in self.objectives]

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def sae_dirs(self) -> list[Path]:
        """One SAE: the output folder itself; a sweep: one sub-folder per SAE."""
        if len(self.specs) == 1:
            return [self.out_dir]
        return [self.out_dir / name for name in self.names]

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor) -> None:
        """Estimate the scaling factor (sqrt(d_in) / mean norm; unless fixed by `norm_scaling_factor`) and
        set `b_dec` of every SAE to the geometric median of the (scaled) sample, over all processes' tokens."""
        points = self.dist.all_gather_cat(sample.float())
        if (
            self.cfg.normalize_activations == "expected_average_only_in"
            and self.cfg.norm_scaling_factor is None
        ):
            self.scale = norm_scaling_factor(points)
        median = geometric_median(points * self.scale)
        for sae in self.saes:
            sae.b_dec.copy_(median.to(sae.b_dec))

    # -- one optimiser step -------------------------------------------------------------------
    def measures(self, step: int) -> bool:
        """Whether the loop logs the metrics of 0-indexed optimiser step `step`."""
        return (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.total_steps

    def train_step(self, x: torch.Tensor, measure: bool = True) -> list[dict[str, torch.Tensor]]:
        """One optimiser step of every SAE on the local batch `x`; returns per-SAE metric tensors (an empty
        list unless `measure`: counting the features that fire costs a pass over the activations)."""
        lr = self.lr_at(self.step)
        n_global = x.shape[0] * self.dist.world_size
        out = []
        for i, (obj, opt) in enumerate(zip(self.objectives, self.optimizers, strict=True)):
            coefficient = self.coefficient_at[i](self.step)
            dead = self.since_fired[i] >= self.cfg.dead_feature_window
            for group in opt.param_groups:
                group["lr"] = lr
            autocast = (
                torch.autocast(x.device.type, dtype=torch.bfloat16)
                if self.autocast
                else contextlib.nullcontext()
            )
            gsnr = {}
            if self.cfg.gsnr_every and (self.step + 1) % self.cfg.gsnr_every == 0:
                gsnr = gradient_snr(obj, x, coefficient, dead, self.cfg.gsnr_micro_batches)
            with autocast:
                res: LossOutput = obj(x, coefficient, dead)
            res.loss.backward()
            params = list(obj.trainable_parameters().values())
            self.dist.all_reduce_mean_([p.grad for p in params])
            self._remove_parallel_grad(obj.sae)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._renormalise_decoder(obj.sae)
            obj.sync_to_sae()
            with torch.no_grad():
                fired = res.fired().float()
                self.dist.all_reduce_sum_(fired)
                self.since_fired[i] += n_global
                self.since_fired[i][fired > 0] = 0
                if measure:
                    active = (res.feature_acts > 0).sum(dtype=torch.float32)
                    self.dist.all_reduce_sum_(active)
                    out.append(
                        {
                            "loss": res.loss.detach(),
                            "mse": res.mse.detach(),
                            "penalty": res.penalty.detach(),
                            "l0": active / n_global,
                            "coefficient": torch.tensor(coefficient),
                            **gsnr,
                        }
                    )
            del res  # free this SAE's activations before the next SAE's forward
        self.step += 1
        self.tokens += n_global
        return out

    @staticmethod
    @torch.no_grad()
    def _remove_parallel_grad(sae: SAE) -> None:
        """Project out of each decoder row's gradient its component along the (unit-norm) row."""
        grad = sae.W_dec.grad
        if grad is not None:
            grad.addcmul_(sae.W_dec, torch.linalg.vecdot(grad, sae.W_dec)[:, None], value=-1)

    @staticmethod
    @torch.no_grad()
    def _renormalise_decoder(sae: SAE) -> None:
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # -- the loop -------------------------------------------------------------------------------
    def fit(
        self,
        stream: ResumableStream | Iterable[torch.Tensor],
        resume: bool = False,
        init_tokens: int | None = None,
    ) -> TrainResult:
        """Train until `cfg.total_tokens` (rounded up to whole batches); save the SAEs; return a summary.

        A fresh run first initialises from its first `init_tokens` tokens (whole batches, at least one;
        None: one batch), which it then trains on as usual."""
        if resume and (done := self.finished_result()) is not None:
            log.warning("%s already holds a finished run with these settings: nothing to do", self.out_dir)
            return done
        resumed_from = self.load_checkpoint(stream) if resume else None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._trim_log(resumed_from or 0)
        # smoothing=0: the bar's rate is tokens trained / time since the start (the rate a user gets), not
        # an instantaneous rate that collapses while the buffer refills
        bar = tqdm(
            total=self.cfg.final_tokens,
            initial=self.tokens,
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            smoothing=0,
            desc="train",
            disable=not (self.progress and self.dist.is_main),
        )
        start, start_tokens = time.perf_counter(), self.tokens
        clock = _Clock()
        iterator = iter(stream)
        if self.step == 0:
            with clock("data"):
                iterator = self._initialise_from(iterator, init_tokens)
        metrics: list[dict[str, torch.Tensor]] = []
        while self.step < self.cfg.total_steps:
            try:
                with clock("data"):
                    x = self._check_batch(next(iterator))
            except StopIteration:
                log.warning(
                    "the activation stream ended after %d of %d steps", self.step, self.cfg.total_steps
                )
                break
            with clock("step"):
                measure = self.measures(self.step)
                out = self.train_step(x * self.scale if self.scale != 1.0 else x, measure)
            if measure:
                metrics = out
            bar.update(x.shape[0] * self.dist.world_size)
            if measure:  # the step just taken is one the log records
                rate = (self.tokens - start_tokens) / max(time.perf_counter() - start, 1e-9)
                record = {**self._log_record(metrics, rate), **clock.shares()}
                bar.set_postfix_str(self._postfix(record), refresh=False)
                if self.dist.is_main:
                    with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record) + "\n")
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(stream)
        bar.close()
        elapsed = max(time.perf_counter() - start, 1e-9)
        final = self._log_record(metrics, (self.tokens - start_tokens) / elapsed)["saes"] if metrics else {}
        result = TrainResult(
            sae_dirs=self.sae_dirs(),
            steps=self.step,
            tokens=self.tokens,
            tokens_per_s=(self.tokens - start_tokens) / elapsed,
            peak_memory_mib=peak_memory_mib(),
            final_metrics=final,
            resumed_from_step=resumed_from,
        )
        self.save_saes(result)
        return result

    def _initialise_from(self, iterator: Iterator[torch.Tensor], init_tokens: int | None) -> Iterator:
        """Read the first batches, initialise from them, and hand them back ahead of the rest."""
        n_batches = max(1, math.ceil((init_tokens or 0) / self.local_batch))
        n_batches = min(n_batches, self.cfg.total_steps)
        first = [self._check_batch(x) for x in itertools.islice(iterator, n_batches)]
        if not first:
            raise ConfigError("the activation stream yielded no batch to initialise the SAEs from")
        self.initialise(torch.cat(first))
        return itertools.chain(first, iterator)

    def _check_batch(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape != (self.local_batch, self.d_in):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"the activation stream yielded {shape}; expected a tensor of shape "
                f"[{self.local_batch}, {self.d_in}] (batch_size / processes, d_in)"
            )
        return x.to(device=self.dist.device, dtype=torch.float32, non_blocking=True)

    # -- logging ---------------------------------------------------------------------------------
    def _log_record(self, metrics: list[dict[str, torch.Tensor]], tokens_per_s: float) -> dict[str, Any]:
        saes = {}
        for name, m, since in zip(self.names, metrics, self.since_fired, strict=True):
            values = torch.stack([m["loss"], m["mse"], m["penalty"], m["l0"]]).float()
            self.dist.all_reduce_mean_([values])
            loss, mse, penalty, l0 = values.tolist()
            saes[name] = {
                "loss": loss,
                "mse": mse,
                "mse_per_element": mse / self.d_in,
                "penalty": penalty,
                "coefficient": float(m["coefficient"]),
                "l0": l0,
                "dead_share": float((since >= self.cfg.dead_feature_window).float().mean()),
            }
            if "gsnr_W_enc" in m:
                gsnr = torch.stack([m["gsnr_W_enc"], m["gsnr_W_dec"]])
                self.dist.all_reduce_mean_([gsnr])
                saes[name]["gsnr_W_enc"], saes[name]["gsnr_W_dec"] = gsnr.tolist()
        return {
            "step": self.step,
            "tokens": self.tokens,
            "lr": self.lr_at(max(self.step - 1, 0)),
            "tokens_per_s": tokens_per_s,
            "saes": saes,
        }

    @staticmethod
    def _postfix(record: dict[str, Any]) -> str:
        first = next(iter(record["saes"].values()))
        more = f" (+{len(record['saes']) - 1} SAEs)" if len(record["saes"]) > 1 else ""
        return (
            f"loss={first['loss']:.4g} mse={first['mse']:.4g} L0={first['l0']:.1f} "
            f"dead={first['dead_share']:.1%}{more} | harvest {record['data_share']:.0%} "
            f"train {record['step_share']:.0%}"
        )

    def _trim_log(self, step: int) -> None:
        """Drop log lines past `step` (written by a killed run after its last checkpoint)."""
        path = self.out_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / CKPT_DIR

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "scale": self.scale,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "saes": [
                {
                    "name": name,
                    "params": {k: p.data for k, p in obj.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "since_fired": since,
                }
                for name, obj, opt, since in zip(
                    self.names, self.objectives, self.optimizers, self.since_fired, strict=True
                )
            ],
        }

    def save_checkpoint(self, stream: Any) -> None:
        """Write an atomic checkpoint: trainer state by rank 0, stream state by every process."""
        if not hasattr(stream, "state_dict"):
            raise TypeError("checkpointing needs a stream with state_dict()/load_state_dict()")
        if self.dist.is_main:
            staging = ckpt.begin(self.ckpt_dir, self.step)
            ckpt.write_part(staging, "trainer", self.trainer_state())
        self.dist.barrier()
        ckpt.write_part(
            ckpt.staging_dir(self.ckpt_dir, self.step), f"stream_rank{self.dist.rank}", stream.state_dict()
        )
        self.dist.barrier()
        if self.dist.is_main:
            ckpt.commit(self.ckpt_dir, self.step, keep=1)
        self.dist.barrier()

    def load_checkpoint(self, stream: Any) -> int | None:
        """Restore the newest checkpoint (SAEs, optimisers, counters, stream); None when there is none."""
        folder = ckpt.latest(self.ckpt_dir)
        if folder is None:
            log.warning("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return None
        state = ckpt.read_part(folder, "trainer")
        self._check_resumable(state, folder)
        for obj, opt, saved, since in zip(
            self.objectives, self.optimizers, state["saes"], self.since_fired, strict=True
        ):
            obj.load_state_dict(saved["params"])
            opt.load_state_dict(saved["optimizer"])
            since.copy_(saved["since_fired"])
        stream.load_state_dict(ckpt.read_part(folder, f"stream_rank{self.dist.rank}"))
        self.step, self.tokens, self.scale = state["step"], state["tokens"], state["scale"]
        log.info("resumed from %s (step %d, %d tokens)", folder, self.step, self.tokens)
        return self.step

    def _check_resumable(self, state: dict[str, Any], folder: Path) -> None:
        saved, now = state["config"], self.cfg.to_dict()
        diff = sorted(
            k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
        )
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise ConfigError(f"cannot resume from {folder}: the training settings differ ({detail})")
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"cannot resume from {folder}: it was written by {state['world_size']} processes, "
                f"now running {self.dist.world_size}"
            )

    # -- output ------------------------------------------------------------------------------------
    def save_saes(self, result: TrainResult) -> None:
        """Write each SAE folder (cfg.json with provenance + weights) and the run summary (rank 0)."""
        if not self.dist.is_main:
            return
        from hub.sae_io import save_sae

        train_cfg = {k: v for k, v in self.cfg.to_dict().items() if k != "saes"}
        metadata = self.metadata() if callable(self.metadata) else dict(self.metadata)
        for spec, obj, folder in zip(self.specs, self.objectives, result.sae_dirs, strict=True):
            obj.sync_to_sae()
            if self.cfg.normalize_activations != "none":
                # the SAE now reads raw activations; save_sae folds the factor into the weights
                obj.sae.cfg = replace(
                    obj.sae.cfg,
                    normalize_activations="expected_average_only_in",
                    norm_scaling_factor=self.scale,
                )
            obj.sae.cfg.metadata = {
                **metadata,
                "sae_name": spec.name,
                "training_tokens": result.tokens,
                "expansion_factor": spec.expansion,
                "training": {
                    **train_cfg,
                    "sae": asdict(spec),
                    "steps": result.steps,
                    "tokens_trained": result.tokens,
                    "processes": self.dist.world_size,
                    "activation_scaling_factor": self.scale,
                    "final_metrics": result.final_metrics.get(spec.name, {}),
                },
            }
            save_sae(obj.sae, folder)
        summary = {
            **asdict(result),
            "sae_dirs": [str(p) for p in result.sae_dirs],
            "config": self.cfg.to_dict(),
            "sae_autocast": self.autocast,
        }
        summary["finished"] = result.steps == self.cfg.total_steps
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if summary["finished"]:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)

    def finished_result(self) -> TrainResult | None:
        """The summary of a finished run with the same settings in `out_dir`, if there is one."""
        path = self.out_dir / SUMMARY_FILE
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        if not summary.get("finished"):
            return None
        self._check_resumable({"config": summary["config"], "world_size": self.dist.world_size}, path)
        fields = {k: summary[k] for k in TrainResult.__dataclass_fields__}
        fields["sae_dirs"] = [Path(p) for p in fields["sae_dirs"]]
        return TrainResult(**fields)
