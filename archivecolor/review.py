"""The review gallery: a self-contained static site in OUT_DIR/review that shows each scan beside its
colorized output, the references used and the catalogue's other candidates, and exports the user's
decisions as a mapping CSV that ``run --mapping`` reads.

Thumbnails and previews are named by the sha256 of the image they show, so a rebuild makes only the
new ones. Nothing in the page reaches the network: images are relative files, CSS and JavaScript are
inline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from archivecolor.errors import ArchivecolorError, UsageError, failure_reason
from archivecolor.imageio import atomic_write_bytes, preview_jpeg, printable_path, read_upright_preview
from archivecolor.provenance import REVIEW_IMAGES, review_image_name, sidecars

REVIEW_DIR = REVIEW_IMAGES[0]
THUMB_SIDE = 360  # card images
PREVIEW_SIDE = 1600  # the full-size view: large enough to judge, small enough to mail
REFERENCE_SIDE = 240
CANDIDATES = 5
LOW_MATCH = 0.35  # a share-weighted match below this is flagged for a second look


@dataclass
class ReviewReport:
    index: Path
    cards: int = 0
    failed: int = 0
    images_made: int = 0
    images_reused: int = 0
    candidates_computed: int = 0
    problems: list[str] = field(default_factory=list)  # sidecars or images that could not be read


@dataclass
class _Image:
    """One picture the page shows, made once from ``source`` and named by its content."""

    source: Path
    sha256: str
    side: int
    kind: str  # t (card), p (full-size preview), r (reference)

    @property
    def name(self) -> str:
        return f"{REVIEW_IMAGES[1]}/{review_image_name(self.sha256, self.kind)}"


def review_id(out_dir: Path) -> str:
    """The key under which the browser keeps this review's decisions (the same across rebuilds)."""
    return hashlib.sha256(str(out_dir.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _folder(rel: str) -> str:
    parent = PurePosixPath(rel).parent.as_posix()
    return "" if parent == "." else parent


def _weighted_match(references: list[dict]) -> float | None:
    scored = [(r.get("share", 0.0), r["match"]) for r in references if r.get("match") is not None]
    total = sum(share for share, _ in scored)
    if not scored or total <= 0:
        return None
    return round(sum(share * match for share, match in scored) / total, 4)


def _read_failures(out_dir: Path) -> list[dict]:
    from archivecolor.runner import LEDGER_NAME, Ledger

    if not (out_dir / LEDGER_NAME).is_file():
        return []
    ledger = Ledger(out_dir / LEDGER_NAME)
    try:
        return ledger.rows(status="failed")
    finally:
        ledger.close()


def build_review(
    out_dir: Path,
    catalog: Path | None = None,
    candidates: bool = True,
    provider: str = "auto",
    home: Path | None = None,
    jobs: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> ReviewReport:
    """Write ``out_dir/review/index.html`` and its images; returns what was done.

    Scans whose sidecar has no recorded candidates (fixed or mapped references) get them from the
    catalogue when ``candidates`` is true and the catalogue exists (one VGG pass each).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: no such output folder; pass the OUT_DIR of an `archivecolor run`")
    review_dir = out_dir / REVIEW_DIR
    report = ReviewReport(index=review_dir / "index.html")
    images: dict[str, _Image] = {}

    def picture(path: Path, sha256: str, side: int, kind: str) -> str:
        image = _Image(path, sha256, side, kind)
        images.setdefault(image.name, image)
        return image.name

    cards: list[dict] = []
    for record in sidecars(out_dir, report.problems):
        source = out_dir / record.source.root / record.source.path
        output = out_dir / record.output.path
        card = {
            "scan": record.source.path, "folder": _folder(record.source.path), "status": "done",
            "output": record.output.path, "reason": "", "warnings": record.warnings,
            "match": _weighted_match(record.references),
            "source_missing": not source.is_file(),
            "after": picture(output, record.output.sha256, THUMB_SIDE, "t"),
            "after_full": picture(output, record.output.sha256, PREVIEW_SIDE, "p"),
            "before": picture(source, record.source.sha256, THUMB_SIDE, "g") if source.is_file() else None,
            "before_full": picture(source, record.source.sha256, PREVIEW_SIDE, "q") if source.is_file() else None,
            "references": [
                {"path": r["path"], "name": Path(r["path"]).name, "sha256": r["sha256"], "share": r.get("share"),
                 "match": r.get("match"), "similarity": r.get("similarity"),
                 "thumb": picture(Path(r["path"]), r["sha256"], REFERENCE_SIDE, "r")}
                for r in record.references
            ],
            "candidates": record.candidates,
            "source_path": source,
        }
        cards.append(card)
    missing = [c for c in cards if not c["candidates"]]
    if candidates and missing:
        _retrieve_candidates(missing, catalog, provider, home, report)
    for card in cards:
        used = {r["sha256"] for r in card["references"]}
        card["candidates"] = [
            {"path": c["path"], "name": Path(c["path"]).name, "similarity": c["similarity"],
             "used": c["sha256"] in used, "thumb": picture(Path(c["path"]), c["sha256"], REFERENCE_SIDE, "r")}
            for c in card["candidates"][:CANDIDATES]
        ]
        del card["source_path"]
        card["flagged"] = card["match"] is not None and card["match"] < LOW_MATCH
    for row in _read_failures(out_dir):
        cards.append({"scan": row["source"], "folder": _folder(row["source"]), "status": "failed",
                      "reason": row.get("reason") or "failed", "warnings": [], "match": None, "references": [],
                      "candidates": [], "flagged": False, "source_missing": False, "output": None})
        report.failed += 1
    report.cards = len(cards)
    if not cards:
        raise UsageError(f"{out_dir}: no archivecolor outputs here (no sidecars, no ledger); pass the --out folder of "
                         f"`archivecolor run`")
    _make_images(list(images.values()), review_dir, jobs, report, progress)
    for card in cards:  # a picture that could not be made is left out, not shown broken
        for key in ("after", "after_full", "before", "before_full"):
            if card.get(key) and not (review_dir / card[key]).is_file():
                card[key] = None
        for ref in card["references"] + card["candidates"]:
            if not (review_dir / ref["thumb"]).is_file():
                ref["thumb"] = None
    cards.sort(key=lambda c: c["scan"])
    for number, card in enumerate(cards):
        card["id"] = number
    html = render_page(cards, out_dir, report)
    atomic_write_bytes(report.index, html.encode("utf-8", "surrogateescape"))
    return report


def _retrieve_candidates(cards: list[dict], catalog: Path | None, provider: str, home: Path | None,
                         report: ReviewReport) -> None:
    from archivecolor.catalog import Catalog, default_catalog_path, search_images

    path = Path(catalog or default_catalog_path())
    if not path.is_file():
        if catalog is not None:
            raise UsageError(f"{path}: no such catalogue; index references with `archivecolor index`, or pass --no-candidates")
        return
    with Catalog.open(path) as cat:
        if cat.count(colour_only=True) == 0:
            return
    sources = [c for c in cards if c["source_path"].is_file()]
    try:
        found = search_images([c["source_path"] for c in sources], path, CANDIDATES, provider=provider, home=home)
    except ArchivecolorError as exc:
        report.problems.append(f"candidates not retrieved: {exc}")
        return
    for card, matches in zip(sources, found):
        card["candidates"] = [{"path": m.path, "sha256": m.sha256, "similarity": round(m.similarity, 4)} for m in matches]
        report.candidates_computed += 1


def _make_images(images: list[_Image], review_dir: Path, jobs: int, report: ReviewReport,
                 progress: Callable[[int, int], None] | None) -> None:
    """Make each picture not already there; the previews of one file are made from one decode."""
    todo: dict[Path, list[_Image]] = {}
    for image in images:
        if (review_dir / image.name).is_file():
            report.images_reused += 1
        else:
            todo.setdefault(image.source, []).append(image)

    def make(source: Path, wanted: list[_Image]) -> str | None:
        try:
            pixels = read_upright_preview(source, max(i.side for i in wanted))
            for image in wanted:
                atomic_write_bytes(review_dir / image.name, preview_jpeg(pixels, image.side))
        except Exception as exc:  # one unreadable picture leaves a gap, not a failed review
            return f"{printable_path(source)}: {failure_reason(exc)}"
        return None

    (review_dir / REVIEW_IMAGES[1]).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [(pool.submit(make, source, wanted), len(wanted)) for source, wanted in todo.items()]
        for done, (future, count) in enumerate(futures, 1):
            problem = future.result()
            if problem:
                report.problems.append(problem)
            else:
                report.images_made += count
            if progress:
                progress(done, len(futures))


def render_page(cards: list[dict], out_dir: Path, report: ReviewReport) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("archivecolor", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    # The card data also travels as JSON for the script; "</" is escaped so that no name can end the <script>.
    data = json.dumps(cards, ensure_ascii=True).replace("</", "<\\/")
    folders = sorted({c["folder"] for c in cards})
    return env.get_template("review.html.j2").render(
        cards=cards, data=data, folders=folders, review_id=review_id(out_dir), out_dir=printable_path(out_dir.resolve()),
        report=report, low_match=LOW_MATCH,
    )
