"""Count words of the uploaded notes with PyYAML installed by the `text` environment."""

import collections
import pathlib

import yaml

words = pathlib.Path("quickstart/data/notes.txt").read_text().split()
counts = collections.Counter(w.strip(".,").lower() for w in words)
pathlib.Path("words.txt").write_text("\n".join(f"{w} {n}" for w, n in counts.most_common()) + "\n")
pathlib.Path("report.yaml").write_text(yaml.safe_dump({"words": len(words), "distinct": len(counts)}))
print(f"{len(words)} words")
