"""SAELens 6.54 training throughput, run by `fast-steer bench train --vs-saelens` inside `.venv-saelens`.

Standalone on purpose (imports only SAELens and its dependencies, never fast-steer). Prints one JSON line.
Same model folder, layer, SAE size, batch and token budget as our benchmark; conversations are rendered
with the model's chat template into a `text` column that SAELens tokenises and packs itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _conversations(paths: list[str], limit_chars: int) -> list[list[dict]]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    out, chars = [], 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                msgs = json.loads(line)["messages"]
                out.append(msgs)
                chars += sum(len(m["content"]) for m in msgs)
                if chars > limit_chars:
                    return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--expansion", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--compile", action="store_true", help="compile_llm and compile_sae")
    args = ap.parse_args()

    import sae_lens
    import torch
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    d_in = AutoConfig.from_pretrained(args.model_dir).hidden_size
    convs = _conversations(args.data, limit_chars=8 * args.tokens)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LanguageModelSAERunnerConfig(
            sae=StandardTrainingSAEConfig(
                d_in=d_in, d_sae=d_in * args.expansion, dtype="float32", device="cpu"
            ),
            model_name=args.model_dir,
            model_class_name="AutoModelForCausalLM",
            hook_name=f"model.layers.{args.layer}",
            dataset_path=args.model_dir,  # unused: the dataset is passed in directly
            is_dataset_tokenized=False,
            streaming=False,
            context_size=1024,
            prepend_bos=False,
            training_tokens=args.tokens,
            train_batch_size_tokens=args.batch_size,
            n_batches_in_buffer=4,
            store_batch_size_prompts=4,
            n_batches_for_norm_estimate=2,
            autocast=args.autocast,
            autocast_lm=args.autocast,
            compile_llm=args.compile,
            compile_sae=args.compile,
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0,
            checkpoint_path=str(Path(tmp) / "ckpt"),
            output_path=str(Path(tmp) / "out"),
            verbose=False,
        )
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=Dataset.from_dict({"text": texts}))
        t0 = time.perf_counter()
        runner.run()
        seconds = time.perf_counter() - t0
    print(json.dumps({
        "sae_lens_version": sae_lens.__version__,
        "tokens": args.tokens,
        "seconds": seconds,
        "tokens_per_s": args.tokens / seconds,
        "autocast": args.autocast,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
