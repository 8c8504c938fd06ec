"""Image pairs to match: exhaustive, sequential, or read from a file (``name0 name1`` lines)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, OutputError


def exhaustive(names: list[str]) -> list[tuple[str, str]]:
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential(names: list[str], k: int) -> list[tuple[str, str]]:
    """Each image with its next ``k`` neighbours in name order (video, ordered captures)."""
    if k < 1:
        raise InputError(f"sequential:{k}: the window must be at least 1")
    return [
        (names[i], names[j])
        for i in range(len(names))
        for j in range(i + 1, min(len(names), i + 1 + k))
    ]


def _split_pair(line: str, known: set[str] | None) -> tuple[str, str] | str:
    """The two names of a pairs-file line, or why it is not two names (quoting the line).

    hloc's format separates the names by whitespace; a name that contains spaces is written
    with a tab between the two (:func:`format_pair`), and with ``known`` names an untabbed
    line splits where both halves are known names."""
    quoted = repr(_shorten(line.strip()))
    if "\t" in line:
        parts = [p.strip() for p in line.split("\t") if p.strip()]
        if len(parts) == 2:
            return parts[0], parts[1]
        return f"expected two tab-separated image names, got {len(parts)}: {quoted}"
    parts = line.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    if len(parts) < 2:
        return f"expected two image names, got {len(parts)}: {quoted}"
    if known is not None:
        splits = [(" ".join(parts[:k]), " ".join(parts[k:])) for k in range(1, len(parts))]
        fits = [(a, b) for a, b in splits if a in known and b in known]
        if len(fits) == 1:
            return fits[0]
        if fits:
            return f"{quoted} splits into two image names in several ways: separate them by a tab"
        return (
            f"{quoted} is not two image names of the features file ({len(parts)} words; "
            "separate names that contain spaces by a tab)"
        )
    return (
        f"expected two image names, got {len(parts)} words (separate names that contain "
        f"spaces by a tab): {quoted}"
    )


def format_pair(a: str, b: str) -> str:
    """One pairs-file line: ``a b`` as hloc writes it, ``a<TAB>b`` when a name has spaces."""
    sep = "\t" if any(c.isspace() for c in a + b) else " "
    return f"{a}{sep}{b}\n"


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text pairs file (binary content)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if "\x00" in text:
        raise InputError(f"{path}: not a text pairs file (binary content)")
    return text


def read_pairs(path: str | Path, known: set[str] | None = None) -> list[tuple[str, str]]:
    """Read a pairs file: one pair a line, two names separated by whitespace (a tab when a
    name contains spaces); blank lines and ``#`` comments are skipped. With ``known``, every
    name must be one of them (and a line of two known names is a pair even when the first
    starts with ``#``). Repeats in either order are dropped.

    Raises InputError naming ``file:line`` for a line that is not two names, an unknown
    name or an image paired with itself, and for a file that is binary or holds no pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pairs file")
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i, line in enumerate(_read_text(path).split("\n"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        pair = _split_pair(line.strip("\r\n "), known)
        if stripped.startswith("#") and (
            known is None or isinstance(pair, str) or not {pair[0], pair[1]} <= known
        ):
            continue  # a comment
        if isinstance(pair, str):
            raise InputError(f"{path}:{i}: {pair}")
        a, b = pair
        unknown = [n for n in (a, b) if known is not None and n not in known]
        if unknown:
            raise InputError(f"{path}:{i}: image {unknown[0]!r} is not in the features file")
        if a == b:
            raise InputError(f"{path}:{i}: pairs an image with itself ({a})")
        if (a, b) in seen or (b, a) in seen:
            continue
        seen.add((a, b))
        pairs.append((a, b))
    if not pairs:
        raise InputError(f"{path}: holds no pairs (empty, or comments only): nothing to match")
    return pairs


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pairs_from_spec(spec: str, names: list[str]) -> list[tuple[str, str]]:
    """``exhaustive``, ``sequential:K`` or a path to a pairs file."""
    if spec == "exhaustive":
        return exhaustive(names)
    if spec.startswith("sequential"):
        _, _, k = spec.partition(":")
        try:
            return sequential(names, int(k) if k else 5)
        except ValueError:
            raise InputError(f"{spec}: expected sequential:K with an integer K") from None
    return read_pairs(spec, set(names))


def write_pairs(path: str | Path, pairs: list[tuple[str, str]]) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(format_pair(a, b) for a, b in pairs))
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return path


def unique_pairs(
    pairs: list[tuple[str, str]], order: list[str] | None = None
) -> list[tuple[str, str]]:
    """Drop self pairs and repeats in either order; with ``order`` (image names), each pair
    is written in that order and the list sorted by it."""
    if order is None:
        seen: set[tuple[str, str]] = set()
        out = []
        for a, b in pairs:
            if a != b and (a, b) not in seen and (b, a) not in seen:
                seen.add((a, b))
                out.append((a, b))
        return out
    rank = {n: i for i, n in enumerate(order)}
    idx = {(min(rank[a], rank[b]), max(rank[a], rank[b])) for a, b in pairs if a != b}
    return [(order[i], order[j]) for i, j in sorted(idx)]


def retrieval(
    features: str | Path,
    k: int,
    names: list[str] | None = None,
    words: int | None = None,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Each image with its ``k`` most similar others by VLAD similarity of its local
    descriptors in ``features`` (see descmatch.retrieval); deduplicated, no self pairs."""
    from .retrieval import DEFAULT_WORDS, global_descriptors, nearest

    if k < 1:
        raise InputError(f"retrieval:{k}: the number of neighbours must be at least 1")
    g = global_descriptors(features, names, words or DEFAULT_WORDS, seed=seed)
    near = nearest(g.similarity(), k)
    return unique_pairs(
        [(g.names[i], g.names[j]) for i, row in enumerate(near) for j in row], g.names
    )


def sequential_with_loops(
    names: list[str],
    k: int,
    loop_closure: int,
    features: str | Path | None = None,
    seed: int = 0,
    words: int | None = None,
) -> list[tuple[str, str]]:
    """``sequential(names, k)`` plus, per image, its ``loop_closure`` most similar images
    outside its sequential window (retrieval on ``features``): loops back to places seen
    before in a video or an ordered capture."""
    import torch

    from .retrieval import DEFAULT_WORDS, global_descriptors, nearest

    pairs = sequential(names, k)
    if loop_closure <= 0:
        return pairs
    if features is None:
        raise InputError("loop closure needs descriptors: pass a features.h5")
    g = global_descriptors(features, names, words or DEFAULT_WORDS, seed=seed)
    n = len(names)
    i = torch.arange(n)
    window = (i[:, None] - i[None, :]).abs() <= k
    near = nearest(g.similarity(), loop_closure, exclude=window)
    extra = [(names[a], names[b]) for a, row in enumerate(near) for b in row]
    return unique_pairs(pairs + extra, names)


def pairs_for(
    spec: str,
    names: list[str],
    features: str | Path | None = None,
    seed: int = 0,
    words: int | None = None,
) -> list[tuple[str, str]]:
    """The pairs that ``spec`` names: ``exhaustive``, ``sequential:K``, a pairs file, or, on
    the descriptors of ``features``, ``retrieval:K`` and ``sequential:K+loops:N`` (VLAD over
    a codebook of ``words`` words learned with ``seed``)."""
    if spec.startswith("retrieval"):
        _, _, k = spec.partition(":")
        try:
            kk = int(k) if k else 10
        except ValueError:
            raise InputError(f"{spec}: expected retrieval:K with an integer K") from None
        if features is None:
            raise InputError(f"{spec}: retrieval needs a features.h5 with descriptors")
        return retrieval(features, kk, names, words=words, seed=seed)
    if spec.startswith("sequential") and "+loops:" in spec:
        head, _, loops = spec.partition("+loops:")
        _, _, k = head.partition(":")
        try:
            kk, nn = int(k) if k else 5, int(loops)
        except ValueError:
            raise InputError(f"{spec}: expected sequential:K+loops:N with integers") from None
        return sequential_with_loops(names, kk, nn, features, seed, words)
    return pairs_from_spec(spec, names)


def write_pairs_commented(path: str | Path, pairs: list[tuple[str, str]], comment: str) -> Path:
    """``write_pairs`` with a first ``# comment`` line (readers skip it): records how the
    pairs were made, so a pipeline can tell whether they are still the ones it wants."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"# {comment}\n" + "".join(format_pair(a, b) for a, b in pairs))
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return path


def pairs_comment(path: str | Path) -> str | None:
    """The first ``# comment`` line of a pairs file (without '# '), or None."""
    try:
        with open(path) as fh:
            first = fh.readline()
    except OSError:
        return None
    return first[1:].strip() if first.startswith("#") else None
