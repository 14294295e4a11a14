"""Step time of a stock Hugging Face Trainer and Lightning Trainer with and without GradcohCallback.

    python scripts/bench_integrations.py --steps 20 --threads 1
    python scripts/bench_integrations.py --verifier   # the verifier's cost under the callbacks

Both runs of a pair use the same model initialisation, data and settings; the time is the Trainer's own
``train_runtime`` (HF) or the wall time of ``fit`` (Lightning), divided by the steps. The callback logs every step
(``every=1``), exact statistics only; logging every N steps costs 1 + (ratio − 1)/N. The two runs of each round are
interleaved and the ratio reported is the median of the per-round ratios (robust to a busy machine); the first line
printed names the machine (CPU, cores, threads, torch).

``--verifier`` compares the callback with ``verify_every=0`` (never) and ``verify_every=1`` (every logged step) instead,
and prints the verifier's overhead at the default rate, ``(ratio − 1) / verify_every``, against logged steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger("bench_integrations")


def hf_time(steps: int, callback: bool, tmp: str, **options: object) -> float:
    import transformers
    from datasets import Dataset
    from gradcoh.logger.integrations.huggingface import GradcohCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=2000, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(2, 2000, (steps * 16, 64), generator=torch.Generator().manual_seed(1))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                            "idx": list(range(len(ids)))}).with_format("torch")
    args = transformers.TrainingArguments(output_dir=f"{tmp}/o", per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, max_steps=steps, report_to="none",
                                          save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6)
    cbs = [GradcohCallback(f"{tmp}/hf-{callback}.zarr", every=1, mode="overwrite", **options)] if callback else []
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=cbs)
    return trainer.train().metrics["train_runtime"] / steps


def lightning_time(steps: int, callback: bool, tmp: str, **options: object) -> float:
    import lightning as L
    from gradcoh.logger.integrations.lightning import GradcohCallback
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.MaxPool2d(2), torch.nn.Conv2d(32, 64, 3, padding=1),
                                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                           torch.nn.Linear(64 * 16, 10))

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            per = F.cross_entropy(self.net(x), y, reduction="none")
            return {"loss": per.mean(), "losses": per}  # stored (and verified) by the callback

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    n = steps * 2 * 32
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), torch.arange(n))
    cbs = [GradcohCallback(f"{tmp}/l-{callback}.zarr", every=1, mode="overwrite", index=lambda b: b[2],
                           labels=lambda b: b[1], **options)] if callback else []
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=2, callbacks=cbs, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(Module(), DataLoader(data, batch_size=32))
    return (time.perf_counter() - start) / steps


def machine(threads: int) -> str:
    """CPU model, cores, threads and torch version, for the record next to the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} thread(s), torch {torch.__version__}"


def report_verifier(name: str, pairs: list[tuple[float, float]]) -> None:
    """Logged steps never verified against verified every step: the ratio and the overhead at the default rate."""
    from gradcoh.logger.config import LoggerConfig

    default = LoggerConfig().verify_every
    ratios = sorted(v / n for n, v in pairs)
    ratio = ratios[len(ratios) // 2]
    log.info("%s: callback %.1f ms/step, verified every step %.1f ms/step: %.3fx (rounds %s); at verify_every=%d: "
             "+%.2f%% of the logged steps' time", name, 1e3 * sorted(n for n, _ in pairs)[len(pairs) // 2],
             1e3 * sorted(v for _, v in pairs)[len(pairs) // 2], ratio, " ".join(f"{r:.2f}" for r in ratios),
             default, 100 * (ratio - 1) / default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--verifier", action="store_true", help="verify_every=1 against 0 under the callbacks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("machine: %s", machine(args.threads))
    for name, fn in (("Hugging Face Trainer, GPT-2 d 128, 2 layers, T 64, batch 8 × 2 accumulation", hf_time),
                     ("Lightning, small CNN 32 px, batch 32 × 2 accumulation", lightning_time)):
        with tempfile.TemporaryDirectory() as tmp:
            if args.verifier:
                pairs = [(fn(args.steps, True, tmp, verify_every=0), fn(args.steps, True, tmp, verify_every=1))
                         for _ in range(args.rounds)]
            else:
                pairs = [(fn(args.steps, False, tmp), fn(args.steps, True, tmp)) for _ in range(args.rounds)]
        if args.verifier:
            report_verifier(name, pairs)
            continue
        plain = sorted(p for p, _ in pairs)[len(pairs) // 2]
        logged = sorted(c for _, c in pairs)[len(pairs) // 2]
        ratios = sorted(c / p for p, c in pairs)
        log.info("%s: %.1f ms/step plain, %.1f ms/step with the callback (every=1): %.2fx (rounds %s)", name,
                 plain * 1e3, logged * 1e3, ratios[len(ratios) // 2], " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
