"""An offline English prose corpus built from documentation that Debian packages ship.

Why this corpus: the machines this project runs on reach only package registries, so the one
real text we can count on is what packages carry. Debian's `*-doc` packages hold hundreds of
megabytes of hand-written, freely licensed English (manuals, tutorials, handbooks), the same on
every machine of a release. `build_corpus` fetches them with `apt-get download` (no install, no
root needed for the download itself once `apt-get update` has run), unpacks them with `dpkg -x`
into a temporary folder, strips the markup down to prose paragraphs, and writes one
`<package>.jsonl.gz` per package ({"text", "source"} per page) plus each package's copyright file.

What counts as prose: a paragraph of at least 8 words, mostly letters, ending like a sentence,
with enough English function words ("the", "of", "is"...) to exclude code, tables and other
languages. Code blocks, navigation, sidebars and headings are dropped before that test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from sst_dist.errors import DataError

# (package, license of its documentation as the package's Debian copyright file states it).
# All are in Debian main, so DFSG-free; each copyright file is copied next to the corpus.
# Ordered by prose per second of work; the build stops once `min_mb` is reached (--all: never).
PACKAGES: list[tuple[str, str]] = [
    ("python3.11-doc", "PSF-2.0"),
    ("linux-doc-6.1", "GPL-2.0"),
    ("postgresql-doc-15", "PostgreSQL"),
    ("python-django-doc", "BSD-3-Clause"),
    ("perl-doc", "GPL-1.0+ or Artistic-1.0"),
    ("sqlite3-doc", "public-domain"),
    ("llvm-15-doc", "Apache-2.0 WITH LLVM-exception"),
    ("python-sqlalchemy-doc", "MIT"),
    ("dict-foldoc", "GFDL-1.1+"),
    ("git-doc", "GPL-2.0"),
    ("cmake-doc", "BSD-3-Clause"),
    ("c++-annotations-html", "GPL-2.0+"),
    ("exim4-doc-html", "GPL-2.0+"),
    ("postfix-doc", "IPL-1.0 or EPL-2.0"),
    ("r-doc-html", "GPL-2.0"),
    ("dict-jargon", "public-domain"),
    ("apache2-doc", "Apache-2.0"),
    ("erlang-doc", "Apache-2.0"),
    ("openjdk-17-doc", "GPL-2.0 WITH Classpath-exception-2.0"),
    ("debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0"),
    ("debian-reference-en", "GPL-2.0+"),
    ("developers-reference", "GPL-2.0"),
    ("debian-policy", "GPL-2.0+"),
    ("maint-guide", "GPL-2.0+ (parts MIT)"),
    ("libreoffice-help-en-us", "MPL-2.0"),
    ("nova-doc", "Apache-2.0"),
    ("neutron-doc", "Apache-2.0"),
    ("bind9-doc", "MPL-2.0"),
    ("octave-doc", "GPL-3.0+"),
    ("maxima-doc", "GPL-2.0"),
    ("sphinx-doc", "BSD-2-Clause"),
    ("scons-doc", "MIT"),
    ("python-celery-doc", "BSD-3-Clause (documentation CC-BY-SA-4.0)"),
    ("racket-doc", "MIT or Apache-2.0 (parts LGPL-2.1+)"),
    ("qtbase5-doc-html", "GFDL-1.3"),
    ("dict-gcide", "GPL-3.0+"),
    ("twisted-doc", "MIT"),
    ("python-sklearn-doc", "BSD-3-Clause"),
    ("python-sympy-doc", "BSD-3-Clause"),
    ("lilypond-doc-html", "GFDL-1.3+ and GPL-3.0+"),
    ("ghc-doc", "BSD-3-Clause"),
    ("python-astropy-doc", "BSD-3-Clause"),
    ("python-scipy-doc", "BSD-3-Clause"),
    ("cppreference-doc-en-html", "CC-BY-SA-3.0"),
    ("rust-doc", "MIT or Apache-2.0"),
    ("python-pandas-doc", "BSD-3-Clause"),
    ("wireshark-doc", "GPL-2.0+"),
    ("sagemath-doc", "GPL-2.0+"),
    ("dict-devil", "public-domain"),
]
# Packages whose documentation license lets its text ship inside this repository (the sample)
# without attaching copyleft terms to the repository: checked by hand in their copyright files.
PERMISSIVE = frozenset(
    "python3.11-doc postgresql-doc-15 python-django-doc sqlite3-doc llvm-15-doc "
    "python-sqlalchemy-doc cmake-doc apache2-doc erlang-doc nova-doc neutron-doc sphinx-doc "
    "scons-doc twisted-doc python-sklearn-doc python-sympy-doc ghc-doc python-astropy-doc "
    "python-scipy-doc python-pandas-doc dict-jargon dict-devil".split()
)

MIN_WORDS = 8
MIN_DOC_WORDS = 40

# English function words: prose has ~40% of them, code and API listings far fewer, other
# languages almost none. A cheap, dependency-free language and prose test in one.
_STOPWORDS = frozenset(
    "the of and to a in is it that for as with be on are this by or not an can from at which "
    "you if will have was but all one has use used when they their there these its may more "
    "also than other such so into been only should must each would how what then any some no "
    "we your our his her he she them were do does using set".split()
)
_SENTENCE_END = tuple(".!?:;)\"'”’")
_WS = re.compile(r"\s+")

_SKIP_TAGS = frozenset(
    "script style pre code-block nav header footer head title noscript svg math form button "
    "select textarea object iframe template info links screen synopsis".split()  # last 4: Mallard
)
# Whole class names (not substrings: mdBook's <body class="sidebar-visible"> holds the page).
_SKIP_CLASSES = frozenset(
    "sphinxsidebar sphinxsidebarwrapper related footer headerlink highlight navigation navbar "
    "breadcrumb breadcrumbs toc toctree-wrapper sidebar sidebar-elems example-wrap programlisting "
    "screen synopsis funcsynopsis literallayout navheader navfooter copyright legalnotice docnav "
    "banner indexterm src-line-numbers line-numbers nav-chapters nav-wrapper menu-bar "
    "rustdoc-breadcrumbs out-of-band item-decl code-header".split()
)
_BLOCK_TAGS = frozenset(
    "p div li dd dt h1 h2 h3 h4 h5 h6 blockquote section article br td th tr ul ol dl table "
    "figure figcaption caption hr main aside details summary body html".split()
)
_VOID_TAGS = frozenset("br img hr meta link input wbr col area base source embed param track".split())


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < MIN_WORDS or not paragraph.endswith(_SENTENCE_END):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    if letters < 0.85 * len(paragraph):
        return False
    if sum(len(w) for w in words) > 12 * len(words):  # long identifiers, URLs, hashes
        return False
    stop = sum(w.lower().strip(",.;:()\"'") in _STOPWORDS for w in words)
    return stop >= 0.22 * len(words)


class _ProseHTML(HTMLParser):
    """Collects the text of block elements, skipping code, navigation and chrome."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_tag: str | None = None  # the tag that opened the region being skipped
        self._skip_depth = 0

    def _flush(self):
        if self._buf:
            text = _WS.sub(" ", "".join(self._buf)).strip()
            if text:
                self.paragraphs.append(text)
            self._buf = []

    def handle_starttag(self, tag, attrs):
        if self._skip_tag is not None:
            # Count nesting of the same tag name only: robust to unclosed <p>/<li> inside.
            if tag == self._skip_tag and tag not in _VOID_TAGS:
                self._skip_depth += 1
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        cls = ""
        role = ""
        for k, v in attrs:
            if k == "class" and v:
                cls = v
            elif k == "role" and v:
                role = v
        if tag in ("html", "body", "main"):
            return
        if tag in _SKIP_TAGS or role == "navigation" or not _SKIP_CLASSES.isdisjoint(cls.split()):
            self._skip_tag, self._skip_depth = tag, 1

    def handle_endtag(self, tag):
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data):
        if self._skip_tag is None:
            self._buf.append(data)

    def close(self):
        super().close()
        self._flush()


def html_to_prose(html: str) -> list[str]:
    parser = _ProseHTML()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # a malformed page loses its tail, not the build
        parser._flush()
    return [p for p in parser.paragraphs if is_prose(p)]


_POD_CODE = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")


def pod_to_prose(pod: str) -> list[str]:
    """Perl's POD: `=` lines are commands, indented paragraphs are code, X<...> are markup."""
    out = []
    in_begin = False
    for block in re.split(r"\n\s*\n", pod):
        if block.startswith("=begin"):
            in_begin = True
        if block.startswith("=end"):
            in_begin = False
            continue
        if in_begin or block.startswith(("=", " ", "\t")):
            continue
        text = block
        for _ in range(3):  # nested codes such as C<L<...>>
            text = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], text)
        text = _WS.sub(" ", text).strip()
        if is_prose(text):
            out.append(text)
    return out


def text_to_prose(text: str) -> list[str]:
    """Plain text (dictd entries): paragraphs are separated by blank lines; the prose test sorts."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        para = _WS.sub(" ", " ".join(ln.strip() for ln in lines)).strip()
        if is_prose(para):
            out.append(para)
    return out


def _read(path: Path) -> str:
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def file_to_prose(path: Path) -> list[str]:
    name = path.name.lower()
    base = name[:-3] if name.endswith((".gz", ".dz")) else name
    if base.endswith((".html", ".htm", ".xhtml", ".page")):  # .page: GNOME's Mallard XML
        return html_to_prose(_read(path))
    if base.endswith(".pod"):
        return pod_to_prose(_read(path))
    if base.endswith(".dict"):  # dictd's dictzip files are gzip-compatible
        return text_to_prose(_read(path))
    return []


# Paths that hold translations (or the same pages twice) rather than more English: a language
# folder (`/de/`, `/pt-BR/`) or suffix (`page.de.html`) other than English.
_LANGS = ("ar|bg|ca|cs|da|de|el|eo|es|et|eu|fa|fi|fr|gl|he|hi|hr|hu|id|it|ja|ko|lt|lv|nb|nl|nn|"
          "pl|pt|ro|ru|sk|sl|sr|sv|th|tr|uk|vi|zh")
_NON_ENGLISH = re.compile(
    rf"/(?:{_LANGS})(?:[-_][A-Za-z]{{2,4}})?/|\.(?:{_LANGS})(?:[-_][A-Za-z]{{2,4}})?\.html?$"
)
_SKIP_PATH = re.compile(
    r"/(_sources|_static|_images|_downloads|src|search|genindex|py-modindex|man|locale)/"
)
_EXTENSIONS = (".html", ".htm", ".xhtml", ".page", ".pod", ".dict", ".html.gz", ".pod.gz", ".dict.dz")


def _doc_files(root: Path):
    top = root / "usr" / "share"
    for path in sorted(top.rglob("*")) if top.is_dir() else ():
        rel = "/" + str(path.relative_to(top))
        if not path.name.endswith(_EXTENSIONS) or not path.is_file():
            continue
        if _SKIP_PATH.search(rel) or _NON_ENGLISH.search(rel):
            continue
        yield path


def _page_text(paragraphs: list[str], seen: set) -> str | None:
    kept = []
    for p in paragraphs:
        h = hashlib.blake2b(p.encode(), digest_size=8).digest()
        if h in seen:  # boilerplate repeated on every page of a manual
            continue
        seen.add(h)
        kept.append(p)
    text = "\n\n".join(kept)
    return text if len(text.split()) >= MIN_DOC_WORDS else None


def _extract(args):
    path, rel = args
    try:
        return rel, file_to_prose(Path(path))
    except (OSError, ValueError, EOFError):
        return rel, []


def package_to_jsonl(root: Path, package: str, out: Path, num_proc: int = 1) -> tuple[int, int]:
    """Writes the prose pages under an unpacked package to out (jsonl.gz). Returns (docs, bytes)."""
    files = [(str(p), str(p.relative_to(root))) for p in _doc_files(root)]
    seen: set = set()
    docs = nbytes = 0
    tmp = out.with_name(out.name + ".partial")
    if num_proc > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(num_proc)
        results = pool.imap(_extract, files, chunksize=8)
    else:
        pool = None
        results = map(_extract, files)
    try:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            for rel, paragraphs in results:
                text = _page_text(paragraphs, seen)
                if text is None:
                    continue
                f.write(json.dumps({"text": text, "source": f"{package}:{rel}"}) + "\n")
                docs += 1
                nbytes += len(text.encode())
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    os.replace(tmp, out)
    return docs, nbytes


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        hint = " (run `apt-get update` first?)" if cmd[:2] == ["apt-get", "download"] else ""
        raise DataError(f"{' '.join(cmd)} failed: {last}{hint}")


def fetch_package(package: str, workdir: Path) -> Path:
    """apt-get download + dpkg -x into workdir/<package>/; returns that folder."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DataError("corpus: needs apt-get and dpkg (a Debian or Ubuntu machine)")
    debdir = workdir / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    for old in debdir.glob(f"{package}_*.deb"):
        old.unlink()
    _run(["apt-get", "download", package], debdir)
    debs = sorted(debdir.glob(f"{package}_*.deb"))
    if not debs:
        raise DataError(f"corpus: apt-get download {package} produced no .deb in {debdir}")
    root = workdir / package
    if root.exists():
        shutil.rmtree(root)
    _run(["dpkg", "-x", str(debs[-1]), str(root)], workdir)
    debs[-1].unlink()
    return root


def build_corpus(out_dir: str | Path, *, min_mb: float = 120.0, all_packages: bool = False,
                 packages: list[tuple[str, str]] | None = None, num_proc: int = 0,
                 progress: bool = True) -> Path:
    """Builds the prose corpus into out_dir; resumable (finished packages are kept)."""
    out = Path(out_dir)
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    num_proc = num_proc or os.cpu_count() or 1
    packages = packages or PACKAGES
    stats_path = out / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    total = sum(s["bytes"] for s in stats.values())
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sst-corpus-") as tmp:
        for package, license_ in packages:
            if total >= min_mb * 1e6 and not all_packages:
                break
            target = out / f"{package}.jsonl.gz"
            if package in stats and target.is_file():
                continue
            if progress:
                print(f"corpus: {package} ...", flush=True)
            try:
                root = fetch_package(package, Path(tmp))
            except DataError as err:  # another Debian release may lack or rename a package
                print(f"corpus: warning: skipping {package}: {err}", flush=True)
                missing.append(package)
                continue
            docs, nbytes = package_to_jsonl(root, package, target, num_proc)
            _copy_copyright(root, package, license_, out / "licenses" / f"{package}.copyright")
            shutil.rmtree(root)
            stats[package] = {"docs": docs, "bytes": nbytes, "license": license_}
            total += nbytes
            stats_path.write_text(json.dumps(stats, indent=1))
            if progress:
                print(f"corpus: {package}: {docs} pages, {nbytes / 1e6:.1f} MB "
                      f"(total {total / 1e6:.1f} MB)", flush=True)
    if not stats:
        raise DataError(f"corpus: no package could be fetched ({', '.join(missing[:3])}...); "
                        "run `apt-get update` first, on a Debian or Ubuntu machine")
    _write_readme(out, stats)
    if total < min_mb * 1e6:
        print(f"corpus: warning: only {total / 1e6:.1f} MB of prose (asked for {min_mb} MB)")
    return out


def _copy_copyright(root: Path, package: str, license_: str, dest: Path) -> None:
    found = [p for p in sorted(root.glob("usr/share/doc/*/copyright")) if p.is_file()]
    if found:
        shutil.copyfile(found[0], dest)
        return
    # Some -doc packages link /usr/share/doc/<pkg> to a sibling package's folder (cmake-doc ->
    # cmake-data); the copyright file then lives in that sibling, from the same Debian source.
    link = root / "usr/share/doc" / package
    target = os.readlink(link) if link.is_symlink() else "another package of the same source"
    dest.write_text(f"{package}: this package ships no copyright file of its own; "
                    f"/usr/share/doc/{package} points to {target} (same Debian source package), "
                    f"whose copyright file states: {license_}.\n")


def _write_readme(out: Path, stats: dict) -> None:
    lines = [
        "# Prose corpus from Debian documentation packages",
        "",
        "Built by `python -m sst_dist.data corpus`. One `<package>.jsonl.gz` per package, one",
        "JSON object per documentation page: `text` (prose paragraphs separated by blank lines)",
        "and `source` (`package:path`). The text keeps each package's license; the package's",
        "Debian copyright file is in `licenses/`.",
        "",
        "| package | license | pages | MB of text |",
        "| --- | --- | ---: | ---: |",
    ]
    for package, s in stats.items():
        lines.append(f"| {package} | {s['license']} | {s['docs']} | {s['bytes'] / 1e6:.1f} |")
    total = sum(s["bytes"] for s in stats.values())
    lines += ["", f"Total: {total / 1e6:.1f} MB of text."]
    (out / "README.md").write_text("\n".join(lines) + "\n")

