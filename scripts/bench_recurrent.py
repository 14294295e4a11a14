"""Cost of the recurrent rule (logger/recurrent.py): a logged step against a plain step, interleaved in one process.

Taggers (embedding → recurrent module → per-token head) at a realistic small size; for each, the median step time of
plain forward+backward and of the same step inside ``GradientLogger.record`` (exact statistics, writer flushed
outside the timed region), and the ratio. The rule replays the recurrence step by step in autograd (one more
forward and backward of the recurrence, in Python) and reduces the factored forms.

    python scripts/bench_recurrent.py                 # all configurations, 5 repetitions, 1 thread
    python scripts/bench_recurrent.py --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from torch import nn

log = logging.getLogger("bench_recurrent")

CONFIGS = {  # name -> (cell, options, batch, steps)
    "LSTM 1 layer": (nn.LSTM, {}, 32, 64),
    "LSTM 2 layers bidirectional": (nn.LSTM, {"num_layers": 2, "bidirectional": True}, 32, 64),
    "GRU 2 layers bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}, 32, 64),
    "LSTM packed (lengths T/2..T)": (nn.LSTM, {"packed": True}, 32, 64),
}
VOCAB, EMBED, HIDDEN, TAGS = 5000, 128, 256, 20


class Tagger(nn.Module):
    """Embedding → recurrent module → per-token head (optionally over packed sequences)."""

    def __init__(self, cell: type[nn.RNNBase], packed: bool = False, **options: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMBED)
        self.rnn = cell(EMBED, HIDDEN, batch_first=True, **options)
        self.head = nn.Linear(HIDDEN * (2 if options.get("bidirectional") else 1), TAGS)
        self.packed = packed

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if not self.packed:
            return self.head(self.rnn(h)[0])
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=ids.shape[1])
        return self.head(out)


def bench(name: str, reps: int) -> tuple[float, float]:
    """Median plain and logged step times (seconds) of one configuration."""
    cell, options, n, steps = CONFIGS[name]
    options = dict(options)
    packed = bool(options.pop("packed", False))
    torch.manual_seed(0)
    model = Tagger(cell, packed=packed, **options)
    g = torch.Generator().manual_seed(1)
    ids, tags = torch.randint(0, VOCAB, (n, steps), generator=g), torch.randint(0, TAGS, (n, steps), generator=g)
    lengths = torch.randint(steps // 2, steps + 1, (n,), generator=g)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(ids, lengths).transpose(1, 2), tags)

    times: dict[str, list[float]] = {"plain": [], "logged": []}
    with tempfile.TemporaryDirectory() as tmp, GradientLogger(model, f"{tmp}/s.zarr", handle_sigterm=False) as glog:
        for k in range(reps + 1):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss().backward()
            plain = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with glog.record(k):
                loss().backward()
            logged = time.perf_counter() - t0
            glog.flush()
            if k:  # the first round warms up
                times["plain"].append(plain)
                times["logged"].append(logged)
    return statistics.median(times["plain"]), statistics.median(times["logged"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("| configuration (batch 32, T 64, embed %d, hidden %d) | plain step | logged step | ratio |", EMBED,
             HIDDEN)
    log.info("|---|---|---|---|")
    for name in CONFIGS:
        plain, logged = bench(name, args.reps)
        log.info("| %s | %.0f ms | %.0f ms | %.2f× |", name, plain * 1e3, logged * 1e3, logged / plain)


if __name__ == "__main__":
    main()
