"""The COLMAP 3.x database layout, which the ``colmap`` packages of Linux distributions read.

COLMAP 3.12 and later (and pycolmap 4) write a newer layout: rigs, frames and pose priors
in tables of their own, no pose prior columns in ``images`` and a descriptor type column.
COLMAP 3.11 and older stop on it ("SQL logic error"); the newer versions read the 3.x
layout and add their tables to it when they open it. So a 3.x database serves both: this
module copies a database written by pycolmap into that layout with plain ``sqlite3``.

The tables, as ``colmap database_creator`` 3.8 makes them (blobs are raw little-endian
arrays: keypoints float32 (rows, cols), descriptors uint8, matches uint32 (rows, 2);
``pair_id = image_id1 * 2147483647 + image_id2`` with ``image_id1 < image_id2``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

#: COLMAP's largest image id + 1, the factor of the pair id.
MAX_IMAGE_ID = 2147483647

SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS cameras (
    camera_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    model INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    params BLOB,
    prior_focal_length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    image_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    camera_id INTEGER NOT NULL,
    prior_qw REAL, prior_qx REAL, prior_qy REAL, prior_qz REAL,
    prior_tx REAL, prior_ty REAL, prior_tz REAL,
    CONSTRAINT image_id_check CHECK(image_id >= 0 and image_id < 2147483647),
    FOREIGN KEY(camera_id) REFERENCES cameras(camera_id));
CREATE UNIQUE INDEX IF NOT EXISTS index_name ON images(name);
CREATE TABLE IF NOT EXISTS keypoints (
    image_id INTEGER PRIMARY KEY NOT NULL,
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    data BLOB,
    FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS descriptors (
    image_id INTEGER PRIMARY KEY NOT NULL,
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    data BLOB,
    FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS matches (
    pair_id INTEGER PRIMARY KEY NOT NULL,
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    data BLOB);
CREATE TABLE IF NOT EXISTS two_view_geometries (
    pair_id INTEGER PRIMARY KEY NOT NULL,
    rows INTEGER NOT NULL,
    cols INTEGER NOT NULL,
    data BLOB,
    config INTEGER NOT NULL,
    F BLOB, E BLOB, H BLOB, qvec BLOB, tvec BLOB);
"""

#: Copies from the pycolmap database (attached as ``src``): the columns both layouts share.
_COPIES = (
    "INSERT INTO cameras (camera_id, model, width, height, params, prior_focal_length) "
    "SELECT camera_id, model, width, height, params, prior_focal_length FROM src.cameras",
    "INSERT INTO images (image_id, name, camera_id) SELECT image_id, name, camera_id "
    "FROM src.images",
    "INSERT INTO keypoints SELECT image_id, rows, cols, data FROM src.keypoints",
    "INSERT INTO descriptors SELECT image_id, rows, cols, data FROM src.descriptors",
    "INSERT INTO matches SELECT pair_id, rows, cols, data FROM src.matches",
    "INSERT INTO two_view_geometries SELECT pair_id, rows, cols, data, config, F, E, H, "
    "qvec, tvec FROM src.two_view_geometries",
)


def pair_id(image_id1: int, image_id2: int) -> int:
    """COLMAP's id of an image pair (the same for both orders)."""
    a, b = sorted((int(image_id1), int(image_id2)))
    return a * MAX_IMAGE_ID + b


def write_colmap3(source: str | Path, target: str | Path) -> None:
    """Copy the database ``source`` (pycolmap 4's layout) into a new 3.x-layout database
    ``target`` (which must not exist). Ids, blobs and pair ids are kept as they are: both
    layouts store them alike (two-view rotations as (w, x, y, z) quaternions in both)."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(target)
    con = sqlite3.connect(target)
    try:
        con.executescript(SCHEMA_3)
        con.execute("ATTACH DATABASE ? AS src", (str(source),))
        with con:
            for sql in _COPIES:
                con.execute(sql)
        con.execute("DETACH DATABASE src")
    finally:
        con.close()


def is_colmap3(path: str | Path) -> bool:
    """Whether the database at ``path`` has the 3.x layout (no ``frames`` table)."""
    con = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    return "images" in names and "frames" not in names
