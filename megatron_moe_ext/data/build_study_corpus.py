"""Build the results study's English corpus (issue 17) from downloaded Debian packages.

Nothing is fetched here: the script reads the `.deb` files given as paths (ar archives holding a
`data.tar.*`), extracts clean UTF-8 English text and writes one `.txt.gz` (gzip header without a
timestamp, so the output is byte-identical from run to run). docs/results-corpus.md has the
commands, the packages' versions and md5s, the licenses and the sizes.

    apt-get download dict-gcide=0.48.5+nmu2 linux-doc-6.1=6.1.192-3 python3.11-doc=3.11.2-6+deb12u9
    python -m megatron_moe_ext.data.build_study_corpus --out data/study/study_corpus_en.txt.gz \\
        dict-gcide_*.deb linux-doc-6.1_*.deb python3.11-doc_*.deb
    megatron-moe-ext prepare-data --input data/study/study_corpus_en.txt.gz \\
        --output-dir data/study/prepared --vocab-size 32000

Sources (each recognised by the package name in the .deb's file name):
- dict-gcide: the GNU Collaborative International Dictionary of English (Webster's 1913 plus
  later additions), `usr/share/dictd/gcide.dict.dz`: every entry becomes one paragraph, with the
  pronunciation markup (\\Ab*do"men\\), the cross-reference braces and the source tags
  ([1913 Webster], [PJC], ...) removed and the lines unwrapped.
- linux-doc-6.1: the kernel's documentation as reStructuredText, the Sphinx copies
  `.../html/_sources/**/*.rst.txt`, one file after another in path order.
- python3.11-doc: Python's documentation as reStructuredText, `.../html/_sources/**/*.rst.txt`.

Every source is separated from the next by a blank line; prepare-data cuts documents at paragraph
breaks, so no document straddles two sources' boundaries by more than one paragraph.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import io
import re
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

GCIDE_MEMBER = "usr/share/dictd/gcide.dict.dz"
SOURCES_RE = re.compile(r".*/html/_sources/.*\.rst\.txt$")
# Source tags at the end of a GCIDE sense: [1913 Webster], [PJC], [WordNet 1.5], [Century Dict.] ...
_GCIDE_TAG = re.compile(r"^\s*\[(?:[^\]]*(?:Webster|PJC|WordNet|Century|Dict|Chambers|RDH|MW|Crabb|"
                        r"Note|Obs)[^\]]*)\]\s*$")
_PRON = re.compile(r"\\[^\\\n]{1,80}\\")          # \Ab*do"men\  (pronunciation / syllabification)
_SPACES = re.compile(r"[ \t]+")


def _cp1252_fallback(err: UnicodeDecodeError):
    return err.object[err.start:err.end].decode("cp1252", errors="replace"), err.end


codecs.register_error("cp1252fallback", _cp1252_fallback)


def read_deb(path: Path) -> Dict[str, bytes]:
    """The files of a .deb's data archive, by path without the leading './'."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{path} is not a .deb (ar) archive")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            data = body
        pos += 60 + size + (size & 1)
    if data is None:
        raise SystemExit(f"{path} has no data.tar member")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                files[m.name.removeprefix("./")] = tar.extractfile(m).read()
    return files


def gcide_text(dict_dz: bytes) -> str:
    """GCIDE's dictd database as plain paragraphs, one per entry."""
    # Three stray cp1252 bytes (0x92, a right single quote) in otherwise UTF-8 text: decoded as
    # cp1252, so that nothing becomes U+FFFD.
    raw = gzip.decompress(dict_dz).decode("utf-8", errors="cp1252fallback")
    out: List[str] = []
    started = False
    for entry in raw.split("\n\n"):
        if not started:   # the database header and the license preamble end at "Letter A"
            started = "Begin file 1 of 26" in entry
            continue
        lines = [ln for ln in entry.splitlines() if ln.strip() and not _GCIDE_TAG.match(ln)]
        if not lines or lines[0].lstrip().startswith(("Begin file", "End of file", "* * *")):
            continue
        text = " ".join(ln.strip() for ln in lines)
        text = _PRON.sub("", text).replace("{", "").replace("}", "")
        text = _SPACES.sub(" ", text).strip()
        if len(text) > 20 and not text.startswith("00-database"):
            out.append(text)
    return "\n\n".join(out)


def rst_sources(files: Dict[str, bytes]) -> str:
    """Sphinx's reStructuredText copies (`_sources/*.rst.txt`), in path order."""
    texts = []
    for name in sorted(n for n in files if SOURCES_RE.match(n)):
        text = files[name].decode("utf-8", errors="strict").replace("\r\n", "\n").strip()
        if text:
            texts.append(text)
    return "\n\n".join(texts)


def build(debs: List[Path], out: Path) -> List[Tuple[str, int]]:
    parts: List[Tuple[str, str]] = []
    for deb in sorted(debs, key=lambda p: p.name):
        pkg = deb.name.split("_")[0]
        files = read_deb(deb)
        if pkg == "dict-gcide":
            parts.append((pkg, gcide_text(files[GCIDE_MEMBER])))
        elif pkg.startswith(("linux-doc", "python3")):
            parts.append((pkg, rst_sources(files)))
        else:
            raise SystemExit(f"{deb}: no extractor for package {pkg!r}")
        if not parts[-1][1]:
            raise SystemExit(f"{deb}: no text found")
    body = "\n\n".join(t for _, t in parts).replace("\x00", "")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                               filename="") as gz:
        gz.write(body.encode("utf-8") + b"\n")
    return [(pkg, len(text)) for pkg, text in parts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("debs", nargs="+", type=Path, help="downloaded .deb files")
    ap.add_argument("--out", type=Path, required=True, help="the .txt.gz to write")
    ns = ap.parse_args(argv)
    for pkg, chars in build(ns.debs, ns.out):
        print(f"{pkg}: {chars:,} characters")
    md5 = hashlib.md5(ns.out.read_bytes()).hexdigest()
    print(f"wrote {ns.out} ({ns.out.stat().st_size:,} bytes, md5 {md5})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
