"""Train the book's character-level GPT models (chapter 4).

    python -m typsamp.train --preset target|draft|draft_small [--steps N] [--batch-size B]
                            [--seed S] [--device cpu|cuda] [--out DIR] [--resume]

Each preset is a model shape plus its training recipe (:data:`PRESETS`). Training is
seeded and reproducible: AdamW, linear warm-up then cosine decay of the learning rate,
gradient clipping at 1, random windows of the training works (:mod:`typsamp.data`).
A progress bar shows the running training loss and the latest validation loss, measured
every ``eval_interval`` steps on the held-out plays, when a float32 checkpoint with the
optimizer and random-number state is also written to ``_build/train/<preset>/``;
``--resume`` continues from the last one exactly as if training had never stopped.

At the end the weights go, in float16, to ``<out>/<preset>.safetensors`` (default
``lib/typsamp/weights/``) with a training record ``<preset>.json`` beside them:
parameters, tokens seen, wall time, the machine, and the validation loss in nats per
character, measured by :func:`evaluate` on the *saved* float16 weights, so that
``evaluate(model.load(preset), load_corpus())`` reproduces the recorded number.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from typsamp import checks, model as gpt, provenance
from typsamp.data import Corpus, load_corpus, random_windows

__all__ = ["Preset", "PRESETS", "evaluate", "train", "CHECKPOINT_DIR"]

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_DIR = ROOT / "_build" / "train"

# The validation loss: mean cross-entropy (nats per character) over every position of
# EVAL_WINDOWS windows of block_size characters, drawn with EVAL_SEED from the held-out plays.
EVAL_WINDOWS = 256
EVAL_SEED = 1234


@dataclass(frozen=True)
class Preset:
    """A model shape (vocab_size comes from the corpus) and how to train it."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    eval_interval: int = 250

    def config(self, vocab_size: int) -> gpt.GPTConfig:
        return gpt.GPTConfig(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                             n_embd=self.n_embd, block_size=self.block_size, dropout=self.dropout)


#: The target and two drafts of different sizes. All share block_size, so the drafts can
#: follow the target over the same length of text.
PRESETS: dict[str, Preset] = {
    "target": Preset(n_layer=4, n_head=4, n_embd=256, block_size=256, steps=3000,
                     batch_size=32, lr=3e-3, min_lr=3e-4),
    "draft": Preset(n_layer=1, n_head=2, n_embd=128, block_size=256, steps=800,
                    batch_size=32, lr=3e-3, min_lr=3e-4),
    "draft_small": Preset(n_layer=1, n_head=1, n_embd=64, block_size=256, steps=1000,
                          batch_size=32, lr=3e-3, min_lr=3e-4),
}


def learning_rate(step: int, preset: Preset) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr``."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    progress = min(1.0, (step - preset.warmup) / max(1, preset.steps - preset.warmup))
    return preset.min_lr + 0.5 * (preset.lr - preset.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: gpt.GPT, corpus: Corpus, n_windows: int | None = None,
             seed: int = EVAL_SEED, batch_size: int = 32) -> float:
    """Validation loss in nats per character on the held-out plays: the mean cross-entropy
    over every position of ``n_windows`` (default :data:`EVAL_WINDOWS`) random windows of
    ``block_size`` characters, drawn with ``seed``. Deterministic for a given model."""
    n_windows = checks.integer("n_windows", EVAL_WINDOWS if n_windows is None else n_windows, low=1)
    was_training, cache = model.training, model.cache
    model.eval()
    model.cache = None
    device = model.transformer.wte.weight.device
    windows = random_windows(corpus.val_ids, n_windows, model.config.block_size,
                             torch.Generator().manual_seed(seed))
    x, y = next(windows)
    total = 0.0
    for i in range(0, n_windows, batch_size):
        logits = model(x[i:i + batch_size].to(device)).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y[i:i + batch_size].to(device).flatten(), reduction="sum").item()
    model.train(was_training)
    model.cache = cache
    return total / y.numel()


def _optimizer(model: gpt.GPT, preset: Preset, device: str) -> torch.optim.AdamW:
    # Weight decay on matrices (including the embeddings), none on biases and LayerNorms.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": preset.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=preset.lr, betas=(0.9, 0.99), fused=device.startswith("cuda"))


def train(preset_name: str, *, steps: int | None = None, batch_size: int | None = None,
          seed: int = 0, device: str = "cpu", out: Path = gpt.WEIGHTS_DIR,
          resume: bool = False, stop_at: int | None = None, checkpoint_dir: Path | None = None,
          progress: bool = True) -> dict | None:
    """Train ``preset_name`` (overriding its steps or batch size if given); returns the record.

    ``stop_at`` ends the run after that many steps with a checkpoint and no weights
    (returning None), to be continued with ``resume=True``: a long run split across
    sessions ends with exactly the weights of an unbroken one.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    if steps is not None:
        preset = replace(preset, steps=checks.integer("steps", steps, low=1))
    if batch_size is not None:
        preset = replace(preset, batch_size=checks.integer("batch_size", batch_size, low=1))
    checkpoint = (checkpoint_dir or CHECKPOINT_DIR / preset_name) / "checkpoint.pt"

    corpus = load_corpus()
    config = preset.config(corpus.tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = gpt.GPT(config).to(device)
    optimizer = _optimizer(model, preset, device)
    batches_rng = torch.Generator().manual_seed(seed)
    start, elapsed, history, ema = 0, 0.0, [], None
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["preset"] != asdict(preset) or state["seed"] != seed:
            raise ValueError(f"--resume: the checkpoint at {checkpoint} was made with preset "
                             f"{state['preset']} and seed {state['seed']}, not these settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches_rng.set_state(state["batches_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed, history, ema = state["step"], state["elapsed"], state["history"], state["ema"]

    def save_checkpoint(step: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"preset": asdict(preset), "seed": seed, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "batches_rng": batches_rng.get_state(),
                    "torch_rng": torch.get_rng_state(), "elapsed": elapsed + time.perf_counter() - t0,
                    "history": history, "ema": ema}, checkpoint)

    batches = random_windows(corpus.train_ids, preset.batch_size, preset.block_size, batches_rng)
    model.train()
    t0 = time.perf_counter()
    end = preset.steps if stop_at is None else min(preset.steps, checks.integer("stop_at", stop_at, low=1))
    bar = tqdm(range(start, end), initial=start, total=preset.steps,
               desc=preset_name, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, preset)
        x, y = next(batches)
        logits = model(x.to(device))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if (step + 1) % preset.eval_interval == 0 and step + 1 < preset.steps:
            val = evaluate(model, corpus, n_windows=64)
            history.append({"step": step + 1, "train_loss": round(ema, 4), "val_loss": round(val, 4)})
            save_checkpoint(step + 1)
            bar.set_postfix(loss=f"{ema:.3f}", val=f"{val:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", val=f"{history[-1]['val_loss']:.3f}" if history else "-", refresh=False)
    bar.close()
    wall = elapsed + time.perf_counter() - t0
    save_checkpoint(max(end, start))
    if end < preset.steps:
        return None

    val_float32 = evaluate(model, corpus)
    stem = Path(out) / preset_name
    record = {
        "preset": preset_name,
        "config": asdict(config),
        "training": {**asdict(preset), "seed": seed, "optimizer": "AdamW(betas=(0.9, 0.99))",
                     "schedule": "linear warm-up, cosine decay to min_lr", "grad_clip": 1.0},
        "parameters": model.num_params(),
        "parameters_non_embedding": model.num_params(non_embedding=True),
        "tokens_seen": preset.steps * preset.batch_size * preset.block_size,
        "wall_time_s": round(wall, 1),
        "machine": _machine(device),
        "versions": provenance.versions(),
        "corpus": {"train_chars": len(corpus.train), "val_chars": len(corpus.val),
                   "val_works": list(corpus.val_works), "vocab_size": corpus.tokenizer.vocab_size},
        "evaluation": {"windows": EVAL_WINDOWS, "window_chars": config.block_size, "seed": EVAL_SEED,
                       "weights": "float16 as saved, run in float32"},
        "train_loss": round(ema, 4),
        "val_loss_float32_weights": round(val_float32, 4),
        "history": history,
    }
    path = gpt.save(model, corpus.tokenizer, stem)
    record["val_loss"] = round(evaluate(gpt.load(path, device=device), corpus), 4)
    gpt.save(model, corpus.tokenizer, stem, record)
    return record


def _machine(device: str) -> dict:
    """Where the training ran (:func:`typsamp.provenance.machine`; a seam tests replace)."""
    return provenance.machine(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m typsamp.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=gpt.WEIGHTS_DIR, help="where the weights and record go")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this step, leaving a checkpoint to resume")
    args = parser.parse_args(argv)
    record = train(args.preset, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                   device=args.device, out=args.out, resume=args.resume, stop_at=args.stop_at)
    if record is None:
        print(f"stopped at step {args.stop_at}; continue with --resume")
        return
    print(f"{args.preset}: {record['parameters']:,} parameters, {record['tokens_seen']:,} tokens, "
          f"{record['wall_time_s']:.0f} s on {record['machine']['processor']}; "
          f"validation loss {record['val_loss']:.4f} nats/char -> {args.out / args.preset}.safetensors")


if __name__ == "__main__":
    main()
