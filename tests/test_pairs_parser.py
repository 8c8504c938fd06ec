"""The pairs-file parser: every malformed file is a one-line error naming the file (and the
line); what format_pair writes, read_pairs reads back exactly (property-based)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MainResult
from hypothesis import given, settings
from hypothesis import strategies as st

from descmatch.errors import InputError
from descmatch.pairs import format_pair, read_pairs, write_pairs


def _write(tmp_path: Path, content: str | bytes, name: str = "pairs.txt") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def _error(p: Path, known: set[str] | None = None) -> str:
    with pytest.raises(InputError) as e:
        read_pairs(p, known)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)),  # not UTF-8
        b"\x89HDF\r\n\x1a\n" + bytes(200),  # an HDF5 file given as pairs
        b"a.jpg\x00b.jpg\n",  # NUL bytes: binary
    ],
)
def test_binary_file_is_one_line_error(tmp_path: Path, content: bytes) -> None:
    assert "binary" in _error(_write(tmp_path, content))


@pytest.mark.parametrize("known", [None, {"a.jpg", "b.jpg", "c.jpg"}])
def test_three_names_on_a_line_name_the_file_and_line(
    tmp_path: Path, known: set[str] | None
) -> None:
    p = _write(tmp_path, "a.jpg b.jpg\na.jpg b.jpg c.jpg\n")
    msg = _error(p, known)
    assert f"{p}:2:" in msg and "3 words" in msg and "c.jpg" in msg
    p = _write(tmp_path, "a.jpg\tb.jpg\tc.jpg\n", "tabs.txt")
    assert f"{p}:1:" in _error(p, known)


def test_one_name_on_a_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.jpg b.jpg\n\nc.jpg\n")
    assert f"{p}:3:" in _error(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "# only a comment\n# and another\n"])
def test_empty_pairs_file_is_an_error(tmp_path: Path, content: str) -> None:
    assert "holds no pairs" in _error(_write(tmp_path, content))


def test_names_with_spaces_by_tab_or_by_known_names(tmp_path: Path) -> None:
    known = {"my photo.jpg", "b.jpg", "c d.jpg"}
    p = _write(tmp_path, "my photo.jpg\tb.jpg\nmy photo.jpg c d.jpg\n")
    assert read_pairs(p, known) == [("my photo.jpg", "b.jpg"), ("my photo.jpg", "c d.jpg")]
    # Without the known names the untabbed line is ambiguous: an error, not a guess.
    assert f"{p}:2:" in _error(p)


def test_ambiguous_split_is_an_error(tmp_path: Path) -> None:
    known = {"a", "b c", "a b", "c"}
    assert "several ways" in _error(_write(tmp_path, "a b c\n"), known)


def test_unknown_name_and_self_pair(tmp_path: Path) -> None:
    known = {"a.jpg", "b.jpg"}
    assert "'z.jpg' is not in the features file" in _error(_write(tmp_path, "a.jpg z.jpg\n"), known)
    assert "with itself" in _error(_write(tmp_path, "a.jpg a.jpg\n", "self.txt"), known)


def test_comment_lines_and_a_name_starting_with_hash(tmp_path: Path) -> None:
    p = _write(tmp_path, "# made by hand\n#1.jpg b.jpg\nb.jpg #1.jpg\n")
    assert read_pairs(p, {"#1.jpg", "b.jpg"}) == [("#1.jpg", "b.jpg")]  # a pair, repeated
    with pytest.raises(InputError, match="holds no pairs"):
        read_pairs(_write(tmp_path, "# made by hand\n#1.jpg b.jpg\n", "c.txt"))


def test_crlf_and_repeats(tmp_path: Path) -> None:
    p = _write(tmp_path, b"a b\r\nb a\r\nb c\r\n")
    assert read_pairs(p) == [("a", "b"), ("b", "c")]


_name_chars = st.characters(
    blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\t\n\r\x85"
)
_names = st.text(_name_chars, min_size=1, max_size=20).filter(
    lambda n: n == n.strip() and not n.startswith("#")
)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_names, _names), min_size=1, max_size=12))
def test_written_pairs_read_back_exactly(
    pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    wanted, seen = [], set()
    for a, b in pairs:
        if a != b and (a, b) not in seen and (b, a) not in seen:
            seen.add((a, b))
            wanted.append((a, b))
    if not wanted:
        return
    p = write_pairs(tmp_path_factory.mktemp("pairs") / "p.txt", wanted)
    known = {n for pair in wanted for n in pair}
    assert read_pairs(p, known) == wanted
    if not any(c.isspace() for pair in wanted for n in pair for c in n):
        assert read_pairs(p) == wanted  # hloc's plain format needs no known names
    assert all(format_pair(a, b).count("\n") == 1 for a, b in wanted)


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=300))
def test_any_bytes_give_pairs_or_one_line_error(
    content: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "pairs.txt"
    p.write_bytes(content)
    try:
        pairs = read_pairs(p)
    except InputError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
    else:
        assert pairs and all(a != b and a and b for a, b in pairs)


# -- through the CLI -------------------------------------------------------------------------
def test_match_with_a_binary_pairs_file(
    tmp_path: Path, example_features: Path, call_main: Callable[..., MainResult]
) -> None:
    p = _write(tmp_path, bytes(range(256)) * 8, "pairs.bin")
    out = tmp_path / "m.h5"
    code, _, err = call_main("match", str(example_features), str(out), "--pairs", str(p))
    assert code == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"error: {p}: not a text pairs file (binary content)"
    ]
    assert not out.exists()


def test_match_with_an_empty_or_three_name_pairs_file(
    tmp_path: Path, example_features: Path, call_main: Callable[..., MainResult]
) -> None:
    out = tmp_path / "m.h5"
    empty = _write(tmp_path, "# nothing yet\n", "empty.txt")
    code, _, err = call_main("match", str(example_features), str(out), "--pairs", str(empty))
    assert code == 2 and "holds no pairs" in err and not out.exists()
    three = _write(tmp_path, "view1.jpg view2.jpg view3.jpg\n", "three.txt")
    code, _, err = call_main("match", str(example_features), str(out), "--pairs", str(three))
    assert code == 2 and f"{three}:1:" in err and not out.exists()
