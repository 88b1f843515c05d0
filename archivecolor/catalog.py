"""The reference catalogue: a SQLite file (sqlite-utils) of the user's colour photos and their embeddings.

Indexing is incremental (unchanged files are skipped, moved files are found by hash), commits
every batch so an interrupted run loses nothing, and records the backbone and features-graph hash
its embeddings were made with: mixing backbones is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import sqlite_utils
from PIL import Image

from archivecolor.color import is_near_gray
from archivecolor.errors import CatalogError, ImageReadError, failure_reason
from archivecolor.imageio import file_walk, preview_jpeg, printable_path, read_image, to_upright
from archivecolor.models.weights import sha256_file
from archivecolor.pipeline import DEFAULT_WORKING_SIZE, EMBEDDING_OUTPUT, target_l, working_l

SCHEMA_VERSION = 1
# Embeddings are GeM of conv5_3 over the whole picture at the default working size, so that a run's
# own feature pass of a scan gives its query. Catalogues made before this recipe say "gem" (a centre
# square at 224 px): their embeddings are not comparable (`catalog reembed` renews them).
EMBEDDING = "gem-whole-256"
EMBED_SHORT_SIDE = DEFAULT_WORKING_SIZE
THUMB_SIZE = 128
_EXIF_DATE = (0x9003, 0x0132)  # DateTimeOriginal (Exif IFD), DateTime


def default_catalog_path() -> Path:
    from archivecolor.models.store import archivecolor_home

    return archivecolor_home() / "catalog.sqlite"


@dataclass
class Match:
    id: int
    path: str
    sha256: str
    similarity: float
    collection: str | None = None


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0
    pruned: int = 0
    refused_gray: int = 0
    skipped_junk: int = 0
    skipped_non_image: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # catalogued photos whose files are gone (reembed)
    seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return self.added + self.updated


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["photos"].create(
        {
            "id": int, "path": str, "sha256": str, "size": int, "mtime": float, "width": int, "height": int,
            "is_colour": int, "chroma": float, "date_taken": str, "collection": str, "tags": str,
            "thumbnail": bytes, "embedding": bytes, "indexed_at": str,
        },
        pk="id", not_null={"path", "sha256"}, if_not_exists=True,
    )
    db["photos"].create_index(["path"], unique=True, if_not_exists=True)
    db["photos"].create_index(["sha256"], if_not_exists=True)
    db["photos"].create_index(["collection"], if_not_exists=True)


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _migrate_1}


def embedding_input(upright: np.ndarray) -> np.ndarray:
    """What the retrieval embedding is taken of: upright L (H, W) at the default working size, L/100."""
    return working_l(upright, EMBED_SHORT_SIDE)



def _date_taken(exif: bytes | None) -> str | None:
    if not exif:
        return None
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        value = parsed.get_ifd(0x8769).get(_EXIF_DATE[0]) or parsed.get(_EXIF_DATE[1])
    except Exception:  # malformed EXIF must not stop indexing
        return None
    return str(value) if value else None


def top_k(queries: np.ndarray, matrix: np.ndarray, mask: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Exact cosine top-k: one matrix product for the batch of (Q, D) queries against (N, D) rows."""
    scores = queries @ matrix.T
    scores[:, ~mask] = -np.inf
    k = min(k, int(mask.sum()))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    out = []
    for q, cand in enumerate(top):
        order = cand[np.argsort(-scores[q, cand])]
        out.append([(int(j), float(scores[q, j])) for j in order])
    return out


class Catalog:
    """An open catalogue file. Create with :meth:`open`."""

    def __init__(self, path: Path, db: sqlite_utils.Database) -> None:
        self.path = path
        self.db = db
        self._matrix: tuple[np.ndarray, list[dict]] | None = None

    @classmethod
    def open(cls, path: Path | None = None, create: bool = False) -> Catalog:
        path = Path(path or default_catalog_path())
        if not path.exists() and not create:
            raise CatalogError(f"{path}: no catalogue here; build one with `archivecolor index REF_DIR --catalog {path}`")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, timeout=30)
            db = sqlite_utils.Database(conn)
            db.execute("PRAGMA busy_timeout = 30000")
            for attempt in range(60):  # two processes creating one catalogue: the loser waits for the winner
                try:
                    cls._prepare(db, path)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 59:
                        raise
                    time.sleep(0.5)
        except sqlite3.DatabaseError as exc:
            raise CatalogError(
                f"{path}: not a readable catalogue ({exc}); move it aside and re-run `archivecolor index`"
            ) from exc
        return cls(path, db)

    @classmethod
    def _prepare(cls, db: sqlite_utils.Database, path: Path) -> None:
        """Check that ``db`` is a catalogue, switch it to WAL and bring its schema up to date."""
        tables = set(db.table_names())
        if tables and "meta" not in tables:
            raise CatalogError(f"{path}: a SQLite file but not an archivecolor catalogue; pass another --catalog")
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.enable_wal()
        version = cls._version(db)
        if version > SCHEMA_VERSION:
            raise CatalogError(f"{path}: schema version {version} is newer than this archivecolor ({SCHEMA_VERSION}); "
                               f"upgrade archivecolor")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with db.conn:
                if cls._version(db) >= v:  # another process migrated meanwhile
                    continue
                MIGRATIONS[v](db)
                db["meta"].upsert({"key": "schema_version", "value": str(v)}, pk="key")

    @staticmethod
    def _version(db: sqlite_utils.Database) -> int:
        if "meta" not in db.table_names():
            return 0
        row = db.execute("select value from meta where key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- metadata -------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("select value from meta where key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        with self.db.conn:
            for key, value in values.items():
                self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    @property
    def precision(self) -> str:
        """The precision of the features graph that made the embeddings (fp32 or int8)."""
        return self.meta("precision") or "fp32"

    def check_model(self, backbone: str, features_sha256: str, embedding: str, precision: str = "fp32") -> None:
        """Refuse embeddings from another backbone, features graph, precision or embedding kind."""
        stored = (self.meta("backbone"), self.meta("features_sha256"), self.meta("embedding"))
        if stored == (None, None, None) or self.count() == 0:
            self.set_meta(backbone=backbone, features_sha256=features_sha256, embedding=embedding, precision=precision)
            return
        if stored != (backbone, features_sha256, embedding):
            hint = (f"run with --precision {self.precision}, or " if precision != self.precision else "")
            raise CatalogError(
                f"{self.path}: built with {stored[0]} / {self.precision} features {str(stored[1])[:12]} / {stored[2]} "
                f"embeddings, but this run uses {backbone} / {precision} features {features_sha256[:12]} / {embedding}; "
                f"{hint}re-embed it in place with `archivecolor catalog reembed --catalog {self.path} "
                f"--precision {precision}` (collections and tags are kept)"
            )

    def count(self, colour_only: bool = False) -> int:
        where = " where is_colour = 1" if colour_only else ""
        return self.db.execute(f"select count(*) from photos{where}").fetchone()[0]

    # --- indexing -------------------------------------------------------------------------------
    def index(
        self,
        ref_dir: Path,
        embed: Callable[[np.ndarray], np.ndarray],
        collection: str | None = None,
        tags: list[str] | None = None,
        prune: bool = False,
        batch_size: int = 16,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> IndexReport:
        """Index the colour photos under ``ref_dir``. ``embed`` maps (B, 1, h, w) L/100 to (B, 512)."""
        started = time.perf_counter()
        report = IndexReport()
        self._embed_photos(self.plan_folder(ref_dir, collection, tags, report, progress), embed, batch_size, report)
        if prune:
            report.pruned = self.prune()
        report.seconds = time.perf_counter() - started
        return report

    def reembed(self, embed: Callable[[np.ndarray], np.ndarray], backbone: str, features_sha256: str, precision: str,
                batch_size: int = 16, progress: Callable[[int, int, str], None] | None = None) -> IndexReport:
        """Embed every colour photo again with ``embed`` (after a change of features graph or embedding
        recipe), in place: ids, collections and tags are kept. Photos whose files are gone lose their
        embedding (so they are not retrieved) and are listed in ``report.missing``. Resumable: an
        interrupted call leaves the photos still to do without an embedding, and the next call does them."""
        started = time.perf_counter()
        report = IndexReport()
        current = (backbone, features_sha256, EMBEDDING, precision)
        if (self.meta("backbone"), self.meta("features_sha256"), self.meta("embedding"), self.precision) != current:
            with self.db.conn:
                self.db.execute("update photos set embedding = null where is_colour = 1")
                for key, value in zip(("backbone", "features_sha256", "embedding", "precision"), current):
                    self.db["meta"].upsert({"key": key, "value": value}, pk="key")
            self._matrix = None
        todo = self.db.execute("select id, path from photos where is_colour = 1 and embedding is null "
                               "order by id").fetchall()

        def planned() -> Iterator[tuple[Path, dict]]:
            for n, (row_id, stored) in enumerate(todo, 1):
                if progress:
                    progress(n, len(todo), stored)
                path = Path(stored)
                try:
                    st = path.stat()
                    digest = sha256_file(path)
                except FileNotFoundError:
                    report.missing.append(stored)
                    continue
                except OSError as exc:
                    report.failed.append((stored, failure_reason(exc, stored)))
                    continue
                yield path, {"id": row_id, "path": stored, "sha256": digest, "size": st.st_size, "mtime": st.st_mtime,
                             "indexed_at": datetime.now(UTC).isoformat()}

        self._embed_photos(planned(), embed, batch_size, report)
        report.seconds = time.perf_counter() - started
        return report

    def _embed_photos(self, planned: Iterator[tuple[Path, dict]], embed: Callable[[np.ndarray], np.ndarray],
                      batch_size: int, report: IndexReport) -> None:
        """Read each planned photo, embed the colour ones in batches, and save them (a commit per batch)."""
        pending: list[tuple[dict, np.ndarray]] = []

        def flush() -> None:
            for shape in dict.fromkeys(x.shape for _, x in pending):  # photos of one shape share a batch
                group = [(record, x) for record, x in pending if x.shape == shape]
                vectors = embed(np.concatenate([x for _, x in group]))
                self._save_embedded([(record, vec) for (record, _), vec in zip(group, vectors)])
            pending.clear()

        for path, record in planned:
            try:
                fields, lightness = prepare_photo(path)
            except Exception as exc:  # one failure boundary per file
                report.failed.append((printable_path(path), failure_reason(exc, printable_path(path))))
                continue
            self.add_prepared({**record, **fields}, report, lightness, pending)
            if len(pending) >= batch_size:
                flush()
        flush()

    def plan_folder(self, ref_dir: Path, collection: str | None, tags: list[str] | None, report: IndexReport,
                    progress: Callable[[int, int, str], None] | None = None) -> Iterator[tuple[Path, dict]]:
        """Walk ``ref_dir`` and yield each photo that needs reading, with its record so far; settled ones
        (unchanged, re-labelled, moved) and unreadable ones are counted in ``report``."""
        entries = list(file_walk(ref_dir))
        images = [p for p, kind in entries if kind == "image"]
        report.skipped_junk = sum(kind == "junk" for _, kind in entries)
        report.skipped_non_image = sum(kind == "other" for _, kind in entries)
        tag_text = json.dumps(sorted(tags or []))
        for n, path in enumerate(images, 1):
            if progress:
                progress(n, len(images), str(path))
            try:
                record = self.plan_photo(path, collection, tags, tag_text, report)
            except (sqlite3.OperationalError, CatalogError):
                raise  # the catalogue itself cannot be written: stop, keeping committed batches
            except Exception as exc:  # one failure boundary per file
                report.failed.append((printable_path(path), failure_reason(exc, printable_path(path))))
                continue
            if record is not None:
                yield path, record

    def plan_photo(self, path: Path, collection: str | None, tags: list[str] | None, tag_text: str,
                   report: IndexReport) -> dict | None:
        """The catalogue's part of indexing one photo, without decoding it: None when it is settled
        (unchanged, re-labelled, or moved), else the record to complete with :func:`prepare_photo`."""
        resolved = str(path.resolve())
        if resolved != os.fsencode(resolved).decode("utf-8", "replace"):
            raise ImageReadError(f"{printable_path(path)}: the file name is not valid UTF-8; rename the file to index it")
        st = path.stat()
        row = self.db.execute("select id, size, mtime, is_colour = 1 and embedding is null from photos where path = ?",
                              [resolved]).fetchone()
        if row and row[1] == st.st_size and row[2] == st.st_mtime and not row[3]:  # row[3]: a reembed still owes it
            report.unchanged += 1
            if collection is not None or tags:  # re-labelling without re-embedding
                with self.db.conn:
                    self.db["photos"].update(row[0], {"collection": collection, "tags": tag_text})
            return None
        digest = sha256_file(path)
        if row is None:
            moved = self._moved_from(digest)
            if moved is not None:
                with self.db.conn:
                    self.db["photos"].update(moved, {"path": resolved, "mtime": st.st_mtime, "size": st.st_size,
                                                     "collection": collection, "tags": tag_text})
                report.moved += 1
                return None
        record = {"path": resolved, "sha256": digest, "size": st.st_size, "mtime": st.st_mtime,
                  "collection": collection, "tags": tag_text, "indexed_at": datetime.now(UTC).isoformat()}
        if row is not None:
            record["id"] = row[0]
        return record

    def add_prepared(self, record: dict, report: IndexReport, lightness: np.ndarray | None = None,
                     pending: list[tuple[dict, np.ndarray]] | None = None, embedding: np.ndarray | None = None) -> None:
        """Save a gray photo (``record["is_colour"]`` 0) as refused, and a colour one with its ``embedding``,
        or queue its retrieval input ``lightness`` in ``pending`` to be embedded in a batch."""
        if not record["is_colour"]:
            report.refused_gray += 1
            record["embedding"] = None
            with self.db.conn:
                self._save(record)
            return
        report.updated += "id" in record
        report.added += "id" not in record
        if embedding is None:
            assert pending is not None and lightness is not None
            pending.append((record, lightness))
            return
        self._save_embedded([(record, embedding)])

    def _save_embedded(self, items: list[tuple[dict, np.ndarray]]) -> None:
        with self.db.conn:
            for record, vector in items:
                record["embedding"] = np.asarray(vector, dtype=np.float32).tobytes()
                self._save(record)
        self._matrix = None

    def _save(self, record: dict) -> None:
        if "id" not in record:
            # Another indexer may have added this path since we looked: update its row instead. The look-up
            # and the insert it decides share one write lock (a transaction that has written holds it already),
            # or a concurrent indexer can insert the same path between them.
            if not self.db.conn.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            existing = self.db.execute("select id from photos where path = ?", [record["path"]]).fetchone()
            if existing is not None:
                record = {**record, "id": existing[0]}
        if "id" in record:
            self.db["photos"].upsert(record, pk="id")
        else:
            self.db["photos"].insert(record)

    def _moved_from(self, digest: str) -> int | None:
        for row_id, old in self.db.execute("select id, path from photos where sha256 = ?", [digest]).fetchall():
            if not Path(old).exists():
                return row_id
        return None

    def prune(self) -> int:
        gone = [row_id for row_id, path in self.db.execute("select id, path from photos").fetchall()
                if not Path(path).exists()]
        with self.db.conn:
            for row_id in gone:
                self.db["photos"].delete(row_id)
        self._matrix = None
        return len(gone)

    def remove(self, paths_or_ids: list[str]) -> int:
        removed = 0
        with self.db.conn:
            for item in paths_or_ids:
                if item.isdigit():
                    cur = self.db.execute("delete from photos where id = ?", [int(item)])
                else:
                    cur = self.db.execute("delete from photos where path = ?", [str(Path(item).resolve())])
                removed += cur.rowcount
        self._matrix = None
        return removed

    # --- retrieval ------------------------------------------------------------------------------
    def _load(self) -> tuple[np.ndarray, list[dict]]:
        """All colour embeddings as one (N, D) matrix, loaded once per catalogue object."""
        if self._matrix is None:
            rows = self.db.execute(
                "select id, path, sha256, collection, tags, embedding from photos "
                "where is_colour = 1 and embedding is not null order by id"
            ).fetchall()
            info = [{"id": r[0], "path": r[1], "sha256": r[2], "collection": r[3], "tags": json.loads(r[4] or "[]")}
                    for r in rows]
            matrix = (np.frombuffer(b"".join(r[5] for r in rows), dtype=np.float32).reshape(len(rows), -1)
                      if rows else np.zeros((0, 512), dtype=np.float32))
            self._matrix = (matrix, info)
        return self._matrix

    def search(
        self, queries: np.ndarray, k: int = 5, collection: str | None = None, tag: str | None = None,
        exclude_sha256: set[str] | None = None,
    ) -> list[list[Match]]:
        """Top-k cosine neighbours for each query embedding (Q, D), L2-normalised."""
        matrix, info = self._load()
        mask = np.ones(len(info), dtype=bool)
        if collection is not None:
            mask &= np.array([i["collection"] == collection for i in info], dtype=bool)
        if tag is not None:
            mask &= np.array([tag in i["tags"] for i in info], dtype=bool)
        if exclude_sha256:
            mask &= np.array([i["sha256"] not in exclude_sha256 for i in info], dtype=bool)
        if not mask.any():
            where = f" in collection {collection!r}" if collection else ""
            raise CatalogError(f"{self.path}: no colour references{where}; index some with `archivecolor index`")
        ranked = top_k(np.asarray(queries, dtype=np.float32), matrix, mask, k)
        return [[Match(info[j]["id"], info[j]["path"], info[j]["sha256"], score, info[j]["collection"])
                 for j, score in row] for row in ranked]

    def fingerprint(self, collection: str | None = None) -> str:
        """sha256 of what retrieval can return (the searchable photos' ids, hashes and labels, and the
        embedding model): while it stays the same, the same scan retrieves the same references."""
        _, info = self._load()
        digest = hashlib.sha256(f"{self.meta('features_sha256')}:{self.meta('embedding')}".encode())
        for item in info:
            if collection is None or item["collection"] == collection:
                digest.update(f"\n{item['id']}:{item['sha256']}:{item['path']}".encode())
        return digest.hexdigest()

    def rows(self, collection: str | None = None) -> list[dict]:
        sql = "select id, path, sha256, width, height, is_colour, collection, tags, date_taken from photos"
        args: list = []
        if collection:
            sql += " where collection = ?"
            args.append(collection)
        cur = self.db.execute(sql + " order by id", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def stats(self) -> dict:
        by_collection = self.db.execute(
            "select coalesce(collection, ''), count(*), sum(is_colour) from photos group by 1 order by 1").fetchall()
        return {
            "path": str(self.path), "photos": self.count(), "colour": self.count(colour_only=True),
            "backbone": self.meta("backbone"), "embedding": self.meta("embedding"), "precision": self.precision,
            "features_sha256": self.meta("features_sha256"), "schema_version": self._version(self.db),
            "bytes_on_disk": sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*")),
            "collections": [{"collection": c, "photos": n, "colour": int(k or 0)} for c, n, k in by_collection],
        }




def prepare_photo(path: Path) -> tuple[dict, np.ndarray | None]:
    """What indexing reads from a photo's pixels: size, date, thumbnail, whether it is colour, and for
    a colour photo the retrieval input (its L at ``EMBED_SHORT_SIDE``; None for a gray one)."""
    scan = read_image(path)
    colour = scan.pixels.ndim == 3 and not is_near_gray(scan.pixels)
    fields = {"width": scan.width, "height": scan.height, "date_taken": _date_taken(scan.exif), "is_colour": int(colour),
              "thumbnail": preview_jpeg(to_upright(scan.pixels, scan.orientation), THUMB_SIZE, quality=80)}
    return fields, target_l(scan, EMBED_SHORT_SIDE) if colour else None


def catalogue_precision(path: Path | None) -> str | None:
    """The precision a catalogue's embeddings were made at; None where it does not exist yet or is empty."""
    path = Path(path or default_catalog_path())
    if not path.is_file():
        return None
    with Catalog.open(path) as cat:
        return cat.precision if cat.count() else None


def embed_with(session, l_batch: np.ndarray) -> np.ndarray:
    """Retrieval embeddings (B, 512), L2-normalised, of L/100 batches (B, 1, h, w) by a features-graph session."""
    return session.run({"l": l_batch}, [EMBEDDING_OUTPUT])[0]


def _features_session(provider: str, home: Path | None, precision: str = "fp32"):
    from archivecolor.models.registry import DEFAULT_BACKBONE, features_name
    from archivecolor.models.session import open_precision

    return open_precision(features_name(DEFAULT_BACKBONE), precision, provider, home)


def index_references(
    ref_dir: Path,
    catalog: Path | None = None,
    collection: str | None = None,
    tags: list[str] | None = None,
    prune: bool = False,
    rebuild: bool = False,
    provider: str = "auto",
    home: Path | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int, str], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    precision: str = "auto",
) -> IndexReport:
    """Index the colour photos under ``ref_dir`` into the catalogue (created if absent).

    ``engine="ray"`` reads and embeds the photos on a pool of Ray actors (``workers``, joining the cluster
    at ``ray_address`` or starting a local one); this process plans and writes the catalogue.
    ``precision`` int8 embeds with the int8 VGG (`models pull --int8`); runs with it need such a catalogue.
    ``auto`` keeps an existing catalogue's precision, and picks int8 on the CPU for a new one where installed.
    """
    from archivecolor.errors import UsageError
    from archivecolor.models.registry import DEFAULT_BACKBONE

    if not Path(ref_dir).is_dir():
        raise UsageError(f"{ref_dir}: not a folder; pass the folder of colour reference photos")
    from archivecolor.models.session import resolve_precision

    precision = resolve_precision(precision, provider, home, None if rebuild else catalogue_precision(catalog))
    session = _features_session(provider, home, precision)
    with Catalog.open(catalog, create=True) as cat:
        if rebuild:
            with cat.db.conn:
                cat.db.execute("delete from photos")
        cat.check_model(DEFAULT_BACKBONE, session.model.sha256, EMBEDDING, precision)

        if engine == "ray":
            from archivecolor.ray_engine import index_with_ray

            return index_with_ray(cat, Path(ref_dir), collection, tags, prune, progress, provider, home,
                                  ray_address, workers, gpus_per_worker, precision)
        if engine != "local":
            raise UsageError(f"--engine {engine!r}: choose local or ray")
        return cat.index(Path(ref_dir), partial(embed_with, session), collection, tags, prune, batch_size, progress)


def reembed_catalog(
    catalog: Path | None = None,
    provider: str = "auto",
    home: Path | None = None,
    precision: str = "auto",
    batch_size: int = 16,
    progress: Callable[[int, int, str], None] | None = None,
) -> IndexReport:
    """Embed every colour photo of an existing catalogue again with the installed features graph and this
    version's embedding recipe, keeping ids, collections and tags (see :meth:`Catalog.reembed`).
    ``precision`` ``auto`` keeps the catalogue's."""
    from archivecolor.models.registry import DEFAULT_BACKBONE
    from archivecolor.models.session import resolve_precision

    with Catalog.open(catalog) as cat:
        precision = resolve_precision(precision, provider, home, cat.precision if cat.count() else None)
        session = _features_session(provider, home, precision)
        return cat.reembed(partial(embed_with, session), DEFAULT_BACKBONE, session.model.sha256, precision, batch_size,
                           progress)


def search_image(
    image: Path, catalog: Path | None = None, k: int = 5, collection: str | None = None, tag: str | None = None,
    provider: str = "auto", home: Path | None = None,
) -> list[Match]:
    """The catalogue's nearest references to ``image`` (its gray L), best first."""
    return search_images([image], catalog, k, collection, tag, provider, home)[0]


def search_images(
    images: list[Path], catalog: Path | None = None, k: int = 5, collection: str | None = None, tag: str | None = None,
    provider: str = "auto", home: Path | None = None,
) -> list[list[Match]]:
    """The catalogue's nearest references to each image (its gray L), best first, never the image itself.
    The query runs at the precision the catalogue was built with."""
    from archivecolor.models.registry import DEFAULT_BACKBONE

    with Catalog.open(catalog) as cat:
        session = _features_session(provider, home, cat.precision)
        cat.check_model(DEFAULT_BACKBONE, session.model.sha256, EMBEDDING, cat.precision)
        results = []
        for image in images:
            scan = read_image(image)
            query = embed_with(session, target_l(scan, EMBED_SHORT_SIDE))
            results.append(cat.search(query, k, collection=collection, tag=tag, exclude_sha256={sha256_file(image)})[0])
        return results
