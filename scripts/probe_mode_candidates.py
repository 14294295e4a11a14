import sys, time, json, logging
import torch
from gradcoh.logger.experiment import ExperimentConfig, run_experiment
mode, noise, seed, every = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 48
model = sys.argv[6] if len(sys.argv) > 6 else "resnet18"
hist = []
t = time.time()
run_experiment(ExperimentConfig(out=f"/tmp/t27/m_{model}_{mode}_{noise}_{seed}.zarr", model=model, dataset="digits",
    steps=steps, probe_size=256, probe_every=every, probe_mode=mode, label_noise=noise, seed=seed, threads=1,
    overwrite=True, log_every=0), on_probe=lambda r: hist.append((r.step, round(r.m_coherence, 2))))
vals = [v for _, v in hist]
print(json.dumps({"model": model, "mode": mode, "noise": noise, "seed": seed, "max": max(vals), "hist": hist, "wall": round(time.time()-t,1)}), flush=True)
