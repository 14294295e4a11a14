"""One rank of a 2-process (gloo, CPU) Hugging Face Trainer run with GradcohCallback (launched by the tests).

Usage: python hf_ddp_worker.py STORE KIND   (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/ (tolerance)
sys.path.insert(0, str(Path(__file__).parent))
from gradcoh.logger.integrations.huggingface import GradcohCallback
from test_huggingface import dataset, tiny


def main() -> None:
    store, kind = sys.argv[1], sys.argv[2]
    args = transformers.TrainingArguments(
        output_dir=str(Path(store).parent / "out"), per_device_train_batch_size=3, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=0.0, logging_steps=100, report_to="none", save_strategy="no", use_cpu=True,
        seed=3, ddp_backend="gloo", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=tiny(kind), args=args, train_dataset=dataset(kind),
                                   callbacks=[GradcohCallback(store, every=1)])
    trainer.train()


if __name__ == "__main__":
    main()
