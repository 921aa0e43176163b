"""Summarise a CSV column with numpy; writes stats.json in the job's run directory."""

import argparse
import csv
import json

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("label")
parser.add_argument("--scale", type=float, default=1.0)
args = parser.parse_args()

with open("quickstart/data/measurements.csv") as fh:
    values = np.array([float(row["value"]) for row in csv.DictReader(fh)]) * args.scale

stats = {"label": args.label, "n": int(values.size), "mean": float(values.mean()), "std": float(values.std())}
print(stats)
with open("stats.json", "w") as fh:
    json.dump(stats, fh, indent=2)
