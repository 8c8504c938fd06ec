"""Keys of image pairs in matches.h5: hloc's key wherever it is unambiguous, an escaped key
that cannot collide where it is not.

hloc names a pair ``name0.replace('/', '-') + '/' + name1.replace('/', '-')`` (two levels),
so ``x/y.jpg`` and ``x-y.jpg`` give one key with a third image ``z.jpg``. Such pairs (every
pair whose hloc key another pair of the run or of the file also has) are stored under the
escaped key ``e(name0) + '|' + e(name1)``, where ``e`` replaces ``%`` by ``%25``, ``/`` by
``%2F`` and ``|`` by ``%7C``: one level (no ``/``), so it is never an hloc key, and ``e``
can be undone, so no two pairs share one. Every pair group also records its two image
names (attributes ``name0``, ``name1``), so a reader can tell whose an hloc key is.

A pair written under its hloc key before a colliding image joined the collection is moved
to its escaped key when the colliding pair is written, so hloc never reads the wrong pair
(it finds no key for the colliding pairs instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Pair = tuple[str, str]


def pair_key(name0: str, name1: str) -> str:
    """hloc's pair naming: slashes in image names become dashes."""
    return name0.replace("/", "-") + "/" + name1.replace("/", "-")


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F").replace("|", "%7C")


def _unescape(part: str) -> str:
    return part.replace("%7C", "|").replace("%2F", "/").replace("%25", "%")


def escaped_pair_key(name0: str, name1: str) -> str:
    """The key of a pair whose hloc key collides: one level, never an hloc key."""
    return _escape(name0) + "|" + _escape(name1)


def parse_escaped_key(key: str) -> Pair | None:
    """(name0, name1) of an escaped key, None for any other key."""
    if "/" in key or key.count("|") != 1:
        return None
    a, b = key.split("|")
    return _unescape(a), _unescape(b)


@dataclass
class KeyPlan:
    """Where each pair to match goes, and which stored pairs move.

    ``keys``: the key of every pair still to match (in the orientation given); ``done``:
    pairs already stored (either orientation); ``renames``: stored keys that now collide,
    to their escaped keys."""

    keys: dict[Pair, str] = field(default_factory=dict)
    done: set[Pair] = field(default_factory=set)
    renames: dict[str, str] = field(default_factory=dict)


def plan_keys(pairs: list[Pair], stored: Mapping[str, Pair | None]) -> KeyPlan:
    """Assign keys to ``pairs`` given the ``stored`` keys of the output and their pairs (None
    where a group does not name its images: a file of hloc or of older versions)."""
    known: dict[frozenset[str], tuple[Pair, str]] = {}  # stored pairs we can name
    unnamed: set[str] = set()
    for key, owner in stored.items():
        pair = parse_escaped_key(key) or owner
        if pair is None:
            unnamed.add(key)
        else:
            known[frozenset(pair)] = (pair, key)

    def oriented(p: Pair) -> Pair:
        k = known.get(frozenset(p))
        return k[0] if k is not None else p

    groups: dict[str, set[frozenset[str]]] = {}
    for p in [oriented(p) for p in pairs] + [pair for pair, _ in known.values()]:
        groups.setdefault(pair_key(*p), set()).add(frozenset(p))
    colliding = {fs for g in groups.values() if len(g) > 1 for fs in g}

    plan = KeyPlan()
    for pair, key in known.values():  # stored under an hloc key that now collides: move
        if frozenset(pair) in colliding and parse_escaped_key(key) is None:
            plan.renames[key] = escaped_pair_key(*pair)
    for p in pairs:
        fs = frozenset(p)
        if fs in known:
            plan.done.add(p)
            continue
        if fs not in colliding and (pair_key(*p) in unnamed or pair_key(p[1], p[0]) in unnamed):
            plan.done.add(p)  # an unnamed group under the pair's own, unambiguous, key
            continue
        plan.keys[p] = escaped_pair_key(*p) if fs in colliding else pair_key(*p)
    return plan
