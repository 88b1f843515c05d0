import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from archivecolor.catalog import EMBEDDING, Catalog, index_references, search_image
from archivecolor.errors import CatalogError
from tests.conftest import colour_photos, data_dir, gray_of


@pytest.fixture
def refs(tmp_path):
    """Real colour photos (Kodak24 when present) in a folder tree, plus junk and a gray photo."""
    folder = tmp_path / "refs"
    (folder / "sub").mkdir(parents=True)
    photos = colour_photos(6, (192, 128))
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / ("sub" if i % 2 else ".") / f"photo{i}.jpg", quality=92)
    Image.fromarray(gray_of(photos[0])).convert("RGB").save(folder / "gray.jpg")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "Thumbs.db").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_index_is_incremental_and_finds_moves(refs, tmp_path, models_home):
    db = tmp_path / "cat.sqlite"
    first = index_references(refs, db, collection="kodak", home=models_home)
    assert (first.added, first.refused_gray, first.skipped_junk, first.skipped_non_image) == (6, 1, 2, 1)
    again = index_references(refs, db, collection="kodak", home=models_home)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 7)

    changed = refs / "photo0.jpg"
    Image.fromarray(colour_photos(1, (128, 128))[0][:, ::-1]).save(changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    shutil.move(refs / "sub" / "photo1.jpg", refs / "moved.jpg")
    third = index_references(refs, db, collection="kodak", home=models_home)
    assert (third.updated, third.moved, third.added) == (1, 1, 0)

    (refs / "photo2.jpg").unlink()
    fourth = index_references(refs, db, collection="kodak", prune=True, home=models_home)
    assert fourth.pruned == 1
    with Catalog.open(db) as cat:
        rows = cat.rows()
        assert len(rows) == 6 and sum(r["is_colour"] for r in rows) == 5
        assert any(r["path"].endswith("moved.jpg") for r in rows)
        stats = cat.stats()
        assert stats["backbone"] == "vgg16" and stats["embedding"] == EMBEDDING and stats["schema_version"] == 1
        assert cat.db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_gray_reference_is_never_returned(refs, tmp_path, models_home):
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    matches = search_image(refs / "gray.jpg", db, k=10, home=models_home)
    assert len(matches) == 6 and not any(m.path.endswith("gray.jpg") for m in matches)
    assert matches == sorted(matches, key=lambda m: -m.similarity)


def test_search_finds_the_same_photo_first_and_respects_collections(refs, tmp_path, models_home):
    db = tmp_path / "cat.sqlite"
    index_references(refs / "sub", db, collection="a", home=models_home)
    others = tmp_path / "others"
    others.mkdir()
    for p in refs.glob("photo*.jpg"):
        shutil.copy(p, others / p.name)
    index_references(others, db, collection="b", tags=["street"], home=models_home)
    query = tmp_path / "query.png"
    Image.open(refs / "sub" / "photo3.jpg").convert("L").save(query)
    best = search_image(query, db, k=1, home=models_home)[0]
    assert best.path.endswith("photo3.jpg") and best.similarity > 0.9
    only_b = search_image(query, db, k=5, collection="b", home=models_home)
    assert {m.collection for m in only_b} == {"b"}
    assert {m.collection for m in search_image(query, db, k=5, tag="street", home=models_home)} == {"b"}
    with pytest.raises(CatalogError, match="no colour references in collection"):
        search_image(query, db, collection="nope", home=models_home)


def test_corrupt_and_foreign_catalogues_are_refused_untouched(tmp_path, refs, models_home):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="move it aside"):
        index_references(refs, bad, home=models_home)
    assert bad.read_bytes() == b"this is not sqlite" * 100
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("create table x (y)")
    with pytest.raises(CatalogError, match="not an archivecolor catalogue"):
        Catalog.open(foreign)
    with pytest.raises(CatalogError, match="archivecolor index"):
        Catalog.open(tmp_path / "missing.sqlite")


def test_mixing_backbones_is_refused(tmp_path, refs, models_home):
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    with Catalog.open(db) as cat:
        cat.set_meta(backbone="vgg19")
    with pytest.raises(CatalogError, match="catalog reembed"):
        index_references(refs, db, home=models_home)


def _embeddings(db: Path) -> dict[str, np.ndarray]:
    with Catalog.open(db) as cat:
        rows = cat.db.execute("select path, embedding from photos where embedding is not null").fetchall()
    return {path: np.frombuffer(blob, dtype=np.float32) for path, blob in rows}


def test_old_embeddings_are_refused_and_reembedded_in_place(refs, tmp_path, models_home):
    """A catalogue of an earlier embedding recipe is refused with the command that fixes it; `catalog reembed`
    gives it the vectors a fresh index would, keeps ids, collections and tags, and lists photos that are gone."""
    from typer.testing import CliRunner

    from archivecolor.cli import app

    fresh = tmp_path / "fresh.sqlite"
    index_references(refs, fresh, home=models_home)
    db = tmp_path / "old.sqlite"
    index_references(refs, db, collection="kodak", tags=["1910"], home=models_home)
    rng = np.random.default_rng(0)
    with Catalog.open(db) as cat:  # what an earlier version's catalogue holds: other vectors under another name
        for (row_id,) in cat.db.execute("select id from photos where is_colour = 1").fetchall():
            vector = rng.normal(size=512).astype(np.float32)
            cat.db["photos"].update(row_id, {"embedding": (vector / np.linalg.norm(vector)).tobytes()})
        cat.set_meta(embedding="gem")
        labels = {r["path"]: (r["id"], r["collection"], r["tags"]) for r in cat.rows()}
    with pytest.raises(CatalogError, match=f"catalog reembed --catalog {db}"):
        search_image(refs / "photo0.jpg", db, home=models_home)

    gone = refs / "sub" / "photo3.jpg"
    gone.unlink()
    result = CliRunner().invoke(app, ["catalog", "reembed", "--catalog", str(db)])
    assert result.exit_code == 0, result.output
    assert "missing: " + str(gone.resolve()) in " ".join(result.output.split())
    with Catalog.open(db) as cat:
        assert cat.meta("embedding") == EMBEDDING
        assert {r["path"]: (r["id"], r["collection"], r["tags"]) for r in cat.rows()} == labels
    now, expected = _embeddings(db), _embeddings(fresh)
    assert set(now) == set(expected) - {str(gone.resolve())}  # the missing photo is no longer retrieved
    for path, vector in now.items():
        np.testing.assert_allclose(vector, expected[path], atol=1e-5)
    matches = search_image(refs / "photo0.jpg", db, k=3, home=models_home)
    assert [m.path for m in matches] == [m.path for m in search_image(refs / "photo0.jpg", fresh, k=3, home=models_home)
                                        if m.path != str(gone.resolve())][:3]

    Image.fromarray(colour_photos(4, (192, 128))[3]).save(gone, quality=92)  # put back: indexing embeds it again
    again = index_references(refs, db, home=models_home)
    assert again.updated == 1 and len(_embeddings(db)) == len(expected)


def test_interrupted_reembed_finishes_on_the_next_call(refs, tmp_path, models_home):
    from archivecolor.catalog import reembed_catalog

    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    with Catalog.open(db) as cat:
        cat.set_meta(embedding="gem")

    def stop_after_three(n, total, path):
        if n > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reembed_catalog(db, home=models_home, batch_size=2, progress=stop_after_three)
    done = len(_embeddings(db))
    assert 2 <= done < 6
    rest = reembed_catalog(db, home=models_home)
    assert rest.embedded == 6 - done and len(_embeddings(db)) == 6


def test_index_while_another_process_reads(tmp_path, refs, models_home):
    db = tmp_path / "cat.sqlite"
    index_references(refs / "sub", db, home=models_home)
    more = tmp_path / "more"
    more.mkdir()
    for i, photo in enumerate(colour_photos(8, (160, 160))):
        Image.fromarray(photo[::-1]).save(more / f"m{i}.png")
    env = dict(os.environ, ARCHIVECOLOR_HOME=str(models_home))
    writer = subprocess.Popen([sys.executable, "-m", "archivecolor", "index", str(more), "--catalog", str(db)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    query = np.random.default_rng(0).normal(size=(1, 512)).astype(np.float32)
    query /= np.linalg.norm(query)
    reads = 0
    while writer.poll() is None:
        with Catalog.open(db) as cat:
            assert len(cat.search(query, k=3)[0]) == 3
        reads += 1
    assert writer.returncode == 0, writer.stderr.read().decode()
    assert reads > 0
    with Catalog.open(db) as cat:
        assert cat.db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert cat.count(colour_only=True) == 3 + 8


@pytest.mark.slow
def test_retrieval_finds_dogs(tmp_path, models_home):
    """Index every 4th ImageNet sample (12% dogs); dog queries outside it get ≥ 3 dogs in the top 5."""
    folder = data_dir("imagenet-1k-samples")
    files = sorted(folder.glob("*.jpg"))
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, f in enumerate(files):
        if i % 4 == 0:
            (refs / f.name).symlink_to(f)
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    is_dog = {f.resolve().as_posix(): 151 <= i <= 268 for i, f in enumerate(files)}
    counts = [sum(is_dog[Path(m.path).as_posix()] for m in search_image(f, db, k=5, home=models_home))
              for i, f in enumerate(files) if 151 <= i <= 268 and i % 4]
    print(f"dog queries: {len(counts)}, mean dogs in top 5: {np.mean(counts):.2f}")
    assert np.mean(counts) >= 3.0



def test_interrupted_index_keeps_committed_batches(tmp_path, refs, models_home):
    db = tmp_path / "cat.sqlite"

    def stop_after_four(n, total, path):
        if n > 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_references(refs, db, batch_size=2, progress=stop_after_four, home=models_home)
    with Catalog.open(db) as cat:
        kept = cat.count()
    assert kept >= 2
    rest = index_references(refs, db, batch_size=2, home=models_home)
    assert rest.unchanged == kept and rest.added + rest.refused_gray + kept == 7


def test_top_k_is_exact():
    from archivecolor.catalog import top_k

    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    mask = rng.random(500) > 0.3
    got = top_k(queries, matrix, mask, 5)
    for q, row in enumerate(got):
        scores = queries[q] @ matrix.T
        scores[~mask] = -np.inf
        assert [j for j, _ in row] == list(np.argsort(-scores)[:5])


def test_catalog_commands_print_usable_answers(refs, tmp_path, models_home):
    import json

    from typer.testing import CliRunner

    from archivecolor.cli import app

    runner = CliRunner()
    db = tmp_path / "cat.sqlite"
    assert runner.invoke(app, ["index", str(refs), "--catalog", str(db), "--collection", "kodak"]).exit_code == 0
    query = refs / "photo0.jpg"
    found = runner.invoke(app, ["catalog", "search", str(query), "--catalog", str(db), "--k", "3", "--json"])
    assert found.exit_code == 0, found.output
    rows = json.loads(found.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(Path(r["path"]).is_file() for r in rows)
    assert str(query.resolve()) not in [r["path"] for r in rows]  # a photo is never its own reference
    assert rows[0]["similarity"] >= rows[-1]["similarity"]
    stats = runner.invoke(app, ["catalog", "stats", "--catalog", str(db)])
    assert stats.exit_code == 0 and "7 photos (6 colour)" in stats.output
    listing = runner.invoke(app, ["catalog", "ls", "--catalog", str(db)])
    assert listing.exit_code == 0 and "photo5.jpg" in listing.output
    removed = runner.invoke(app, ["catalog", "rm", str(refs / "photo4.jpg"), "--catalog", str(db)])
    assert removed.exit_code == 0
    with Catalog.open(db) as cat:
        assert cat.count(colour_only=True) == 5
