"""`fast-steer bench eval`: evaluation tokens/s against two bare full forwards over the same tokens.

`fast-steer eval` with the LM loss needs the clean and the spliced logits, i.e. the work of two full
forwards; it shares blocks 0..L between them and runs the LM head on real positions only
(`train.evaluate`). Measured in one run, repeats interleaved (bare, eval, bare, eval, ...), medians
compared: `ratio` = eval tokens/s (everything `evaluate_sae` does: tokenising, forwards, SAE, metrics) /
the tokens/s of two bare full forwards (`model(input_ids)`, logits at every padded position) on exactly
the batches the evaluation runs (goal >= 0.7). Tokens are real (not padding) tokens.
The SAE is random, of the model's width times `--expansion`: the speed does not depend on its training.
"""

from __future__ import annotations

import statistics
import sys
import time

from steer.errors import ConfigError

TARGET = 0.7


def run_bench(model_ref: str, device: str, dtype: str, data: list[str], layer: int | None, conversations: int,
              repeats: int, expansion: int) -> dict:  # fmt: skip
    """All measurements of `fast-steer bench eval`."""
    import torch
    from tqdm.auto import tqdm

    from hub import load_model
    from steer.positions import pad_token_id
    from steer.sae import SAEConfig, build_sae
    from train.data import load_conversations
    from train.evaluate import EvalConfig, evaluate_sae
    from train.harvest import decoder_layers
    from train.sequences import bucket_batches, fast_sequences

    model, tok = load_model(model_ref, dtype=dtype, device=device)
    n_layers = len(decoder_layers(model))
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ConfigError(f"--layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    convs = list(load_conversations(data, limit=conversations))
    d_in = model.config.get_text_config().hidden_size
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("standard", d_in, d_in * expansion, device=device))
    cfg = EvalConfig(max_conversations=conversations)
    batches = bucket_batches(fast_sequences(convs, tok, max_len=cfg.max_len), cfg.token_budget,
                             pad_token_id(tok), seed=None)  # fmt: skip
    real = sum(b.n_tokens for b in batches)
    padded = sum(b.n_padded for b in batches)

    def timed(work) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def two_bare_forwards() -> None:
        with torch.inference_mode():
            for batch in batches:
                ids = batch.input_ids.to(device)
                for _ in range(2):
                    model(input_ids=ids, use_cache=False)

    def evaluate() -> None:
        evaluate_sae(sae, model, tok, convs, layer, cfg, progress=False)

    bare_s, eval_s = [], []
    with tqdm(total=2 * (repeats + 1), desc="bench eval", unit="run", file=sys.stderr) as bar:
        for repeat in range(repeats + 1):  # repeat 0 warms up and is not recorded
            for times, work in ((bare_s, two_bare_forwards), (eval_s, evaluate)):
                elapsed = timed(work)
                if repeat:
                    times.append(elapsed)
                bar.update()
    bare, ev = statistics.median(bare_s), statistics.median(eval_s)
    return {
        "model": model_ref,
        "device": device,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "layer": layer,
        "n_layers": n_layers,
        "sae": f"standard {d_in}x{d_in * expansion}, random weights (the speed does not depend on training)",
        "conversations": len(convs),
        "batches": len(batches),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1.0 - real / padded,
        "repeats": repeats,
        "two_bare_forwards_seconds": bare,
        "eval_seconds": ev,
        "two_bare_forwards_tokens_per_s": real / bare,
        "eval_tokens_per_s": real / ev,
        "ratio": bare / ev,
        "target": TARGET,
        "meets_target": bare / ev >= TARGET,
        "bare_seconds_all": [round(t, 4) for t in bare_s],
        "eval_seconds_all": [round(t, 4) for t in eval_s],
    }
