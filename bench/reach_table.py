"""The reach table: every diffusers transformer class of the reach zoo x every method,
measured by the same runner as the contract test (tests/support/reach.py), and in the same
loop diffusers' own hooks (First-Block Cache, MagCache, TaylorSeer at its default module
patterns and with explicit ones) and cache-dit's DBCache on the same tiny models, under the
same criteria. Writes docs/reach.md (atomically) and prints a summary. With --readme it
instead writes README.md's methods x models table (between its marker comments) from the
cells tests/test_readme.py measures.

    python bench/reach_table.py [--out docs/reach.md] [--classes flux2,wan ...] [--no-peers]
    python bench/reach_table.py --readme [--readme-file README.md]

cache-dit is optional: without it its column says "not installed". To fill it without
touching the environment: ``pip install --target DIR --no-deps cache-dit==1.5.3`` and run
with ``PYTHONPATH=.:DIR``.

Cells: ✓ works (never-skip bitwise the model, skipping setting finite with fewer attention
calls; for fastcache also remove() restores); "refused" with the reason; ✗ wrong / crash
with the error. Peer cells also: "no effect" (ran right, skipped nothing: the hook found
nothing to cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fastcache._shadow import prefer_installed_kernels  # noqa: E402

prefer_installed_kernels()  # the checkout's kernels/ must not shadow the package transformers imports

from support.reach import (  # noqa: E402
    CACHE_DIT,
    CLASSES,
    PEERS,
    README_COLUMNS,
    SETTINGS,
    STEPS,
    built,
    cache_dit_version,
    readme_block,
    readme_column,
    readme_table,
    run_cell,
    run_peer,
)


def _write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(c) -> str:
    if c.status == "works":
        return "✓"
    if c.status == "refused":
        d = c.detail
        if "needs what a model family file describes" in d:
            return "— (needs a family file)"
        if "consecutive block calls" in d:
            return "refused: no chain of block calls to skip (the model changes the streams between blocks)"
        return f"refused: {d.split('. ')[0][:90]}".replace("|", "/")
    return f"✗ {c.status}: {c.detail[:80]}".replace("|", "/")


class _Notes:
    """Numbered footnotes for peer error texts (one number per distinct text)."""

    def __init__(self):
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        text = " ".join(text.split()).replace("|", "/")
        if len(text) > 400:
            text = text[:400] + " ..."
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _peer_cell(c, notes: _Notes) -> str:
    if c.status == "works":
        return "✓" if c.detail in ("", "registered adapter") else f"✓ {c.detail}"
    if c.status in ("no effect", "not installed"):
        return c.status
    head = "refused" if c.status == "refused" else f"✗ {c.status}"
    return f"{head} {notes.ref(c.detail)}"


def _versions() -> str:
    import diffusers

    cd = cache_dit_version()
    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, cache-dit {cd or 'not installed'}"


def reach(a) -> int:
    names = [n for n in a.classes.split(",") if n] or list(CLASSES)
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise SystemExit(f"--classes: unknown classes {unknown}; known: {', '.join(CLASSES)}")
    methods = list(SETTINGS)
    peers = [] if a.no_peers else [p for p in PEERS if p != CACHE_DIT] + [CACHE_DIT]  # cache-dit last
    t0 = time.time()
    # fastcache's cells first, for every class, then each peer for every class (cache-dit last):
    # nothing a peer does can reach the measurement of another column
    ours = {}
    for name in names:
        ours[name] = [run_cell(name, m) for m in methods]
        print(name, " ".join(c.status for c in ours[name]), flush=True)
    theirs = {name: [] for name in names}
    for p in peers:
        for name in names:
            theirs[name].append(run_peer(name, p))
        print(p, ", ".join(f"{n}: {theirs[n][-1].status}" for n in names), flush=True)
    for name in names:  # the peers worked on copies: the models must be as they were
        case, ref, _ = built(name)
        if not torch.equal(case.sample(steps=STEPS, seed=2), ref):
            raise SystemExit(f"{name}: the uncached model's output changed while the table was measured")
    elapsed = time.time() - t0

    notes = _Notes()
    rows = []
    for name in names:
        cells = [_cell(c) for c in ours[name]] + [_peer_cell(c, notes) for c in theirs[name]]
        rows.append(f"| {name} (`{type(built(name)[0].model).__name__}`) | " + " | ".join(cells) + " |")
    n = len(names)
    works = {m: sum(ours[x][i].status == "works" for x in names) for i, m in enumerate(methods)}
    counts = []
    for j, p in enumerate(peers):
        st = [theirs[x][j].status for x in names]
        parts = [f"{st.count(s)} {s}" for s in ("no effect", "refused", "crash", "wrong", "not installed") if s in st]
        counts.append(f"- {p}: **{st.count('works')}/{n}**" + (f" ({', '.join(parts)})" if parts else ""))
    head = "| class | " + " | ".join(methods + peers) + " |"
    sep = "|---" * (1 + len(methods) + len(peers)) + "|"
    summary = ", ".join(f"{m}: {works[m]}/{n}" for m in methods)
    what = "\n".join(f"- {p}: {PEERS[p].what}." for p in peers)
    text = (
        "# Reach: fastcache's methods, diffusers' hooks and cache-dit on diffusers' transformer classes\n\n"
        "Generated by `PYTHONPATH=.:DIR python bench/reach_table.py`, DIR holding cache-dit "
        "(`pip install --target DIR --no-deps cache-dit==1.5.3`; without it its column says "
        f'"not installed"). {_versions()}. Tiny instances of each class, {STEPS}-step sampling '
        "loops; the same runner as tests/reach/test_reach.py (tests/support/reach.py). "
        f"Measured in {elapsed:.0f} s.\n\n"
        "A cell works (✓) when the never-skip setting is bitwise the uncached model and the "
        "skipping setting runs the loop finite with fewer attention calls than the uncached "
        "loop (for fastcache also: remove() restores the model). Peers run on a deep copy, "
        'applied as a user holding only the transformer would; "no effect": ran right, skipped '
        "nothing (the hook found nothing to cache); refused: raised while being enabled; "
        "✗ crash / wrong: raised in the loop / never-skip not bitwise or non-finite. Numbers in "
        "brackets: the error, below the table.\n\n"
        f"Works, fastcache (of {n} classes): {summary}.\n\n"
        + (f"Works, peers (of {n} classes):\n\n" + "\n".join(counts) + "\n\n" if peers else "")
        + (f"Peer settings:\n\n{what}\n\n" if peers else "")
        + head
        + "\n"
        + sep
        + "\n"
        + "\n".join(rows)
        + "\n"
        + ("\nErrors:\n\n" + "\n".join(f"{i}. {t}" for i, t in enumerate(notes.texts, 1)) + "\n" if notes.texts else "")
    )
    out = os.path.abspath(a.out)
    _write(out, text)
    print(summary)
    print("\n".join(counts))
    print(f"wrote {out} ({elapsed:.0f} s)")
    return 0


def readme(a) -> int:
    path = os.path.abspath(a.readme_file)
    text = open(path, encoding="utf-8").read()
    old = readme_block(text)  # raises, naming the markers, before any measuring
    cells = {}
    for fam in README_COLUMNS.values():
        for config, cell in readme_column(fam).items():
            cells[(config, fam)] = cell
        print(fam, flush=True)
    new = readme_table(cells)  # raises on a ✗ cell: a crash is fixed, not published
    _write(path, text.replace(old, new))
    print(f"wrote {path}: {'unchanged' if new == old else 'table updated'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "reach.md"))
    ap.add_argument("--classes", default="", help="comma-separated short names (default: all)")
    ap.add_argument("--no-peers", action="store_true", help="skip the diffusers and cache-dit columns")
    ap.add_argument("--readme", action="store_true", help="write README.md's methods x models table instead")
    ap.add_argument("--readme-file", default=os.path.join(ROOT, "README.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    return readme(a) if a.readme else reach(a)


if __name__ == "__main__":
    raise SystemExit(main())
