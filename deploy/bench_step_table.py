"""Formats the step benchmark rows (JSON lines on stdin, tch then PyTorch per setting)."""
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
with open("out/bench/step.json", "w") as f:
    json.dump(rows, f, indent=1)
print("\nbimodal ResNet50 step (fwd+bwd+Adam) and inference, median; CPU threads =", rows[0]["threads"])
print("%5s %5s %11s %13s %6s %12s %14s %6s" % ("px", "batch", "tch step s", "torch step s", "ratio", "tch infer s", "torch infer s", "ratio"))
for t, p in zip(rows[0::2], rows[1::2]):
    print("%5d %5d %11.3f %13.3f %6.2f %12.3f %14.3f %6.2f" % (
        t["image_size"], t["batch"], t["train_step_s"], p["train_step_s"], t["train_step_s"] / p["train_step_s"],
        t["inference_s"], p["inference_s"], t["inference_s"] / p["inference_s"]))
