"""Rebuilds docs/RESULTS.md from its head and the area files.

  python docs/collect_results.py

Keeps everything in RESULTS.md before the first "collected from" marker
(the intro and the status table, edited by hand) and appends each
docs/results/<area>.md in pipeline order, headings demoted one level.
"""

import pathlib
import re

DOCS = pathlib.Path(__file__).parent
AREAS = (
  "data",
  "cf",
  "qformer",
  "llm",
  "cpu_runtime",
  "ilm",
  "serving",
  "pod",
  "reliability",
)
MARKER = "<!-- collected from docs/results/{}.md -->"


def main():
  results = DOCS / "RESULTS.md"
  head = results.read_text().split("<!-- collected from", 1)[0].rstrip()
  parts = [head, ""]
  for area in AREAS:
    text = (DOCS / "results" / f"{area}.md").read_text().strip()
    demoted = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)
    parts += ["", MARKER.format(area), demoted, ""]
  results.write_text("\n".join(parts))


if __name__ == "__main__":
  main()
