"""The training path on a tiny generated data folder: pairs, a real optimisation step, resume, export."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import DOWNLOADS, colour_photos

torch = pytest.importorskip("torch")


@pytest.fixture
def data_root(tmp_path):
    from training.config import TRAIN_FOLDERS

    root = tmp_path / "data"
    photos = colour_photos(8, (96, 80))
    for i, photo in enumerate(photos):
        folder = root / TRAIN_FOLDERS[i % len(TRAIN_FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(folder / f"p{i}.jpg")
    (root / "kodak24").mkdir()
    Image.fromarray(photos[0]).save(root / "kodak24" / "test.png")  # a test set: never used
    return root


def test_train_resume_and_export(data_root, tmp_path):
    from export.onnx_export import export_all
    from training.config import CONFIGS, TEST_FOLDERS, TRAIN_FOLDERS
    from training.data import list_photos
    from training.train import Trainer

    assert not set(TRAIN_FOLDERS) & set(TEST_FOLDERS)
    assert all("kodak24" not in p.parts for p in list_photos(data_root))
    config = replace(CONFIGS["cpu-small"], size=48, width=8, epochs=2, batch_size=2, validation_every=4)
    out = tmp_path / "run"
    (out).mkdir()
    (out / "downloads").symlink_to(DOWNLOADS)
    trainer = Trainer(config, data_root, out, device="cpu")
    assert len(trainer.train_photos) == 6 and trainer.val_rows
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit(1)
    assert history[0]["epoch"] == 1 and np.isfinite(history[0]["val_psnr"])
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert (out / "last.pt").exists()
    (tmp_path / "epoch1.pt").write_bytes((out / "last.pt").read_bytes())  # a second network, for the ensemble

    resumed = Trainer(config, data_root, out, device="cpu")
    assert resumed.resume() and resumed.epoch == 1
    resumed.fit(2)
    assert [h["epoch"] for h in resumed.history] == [1, 2]

    assets = tmp_path / "assets"
    assets.mkdir()
    registry = export_all(out / "last.pt", assets)
    unet = registry["models"]["unet"]
    assert unet["width"] == 8 and unet["epochs"] == 2 and unet["float16_storage"]
    import onnxruntime as ort

    from archivecolor.models.store import widen_float16

    session = ort.InferenceSession(widen_float16((assets / "unet.onnx").read_bytes()), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x13", "tf3", "tf4", "tf5"]  # with the semantic prior
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 13, 48, 64)).astype(np.float32)
    semantic = [rng.uniform(0, 4, (1, c, 48 // s, 64 // s)).astype(np.float32) for c, s in ((256, 4), (512, 8), (512, 16))]
    with torch.no_grad():
        expected = resumed.model.eval()(torch.from_numpy(x), *map(torch.from_numpy, semantic))[0].numpy()
    feeds = {"x13": x, "tf3": semantic[0], "tf4": semantic[1], "tf5": semantic[2]}
    got, trust = session.run(["ab", "trust"], feeds)
    assert np.abs(got - expected).max() < 5e-3  # float16 storage

    # A chroma gain scales the colours the graph gives, and only them; the graph says which gain it has.
    import onnx

    from archivecolor.models.layout import CHROMA_GAIN_PROP

    assert export_all(out / "last.pt", assets, graphs=("unet",), chroma_gain=1.25)["models"]["unet"]["chroma_gain"] == 1.25
    data = widen_float16((assets / "unet.onnx").read_bytes())
    assert {p.key: p.value for p in onnx.load_from_string(data).metadata_props}[CHROMA_GAIN_PROP] == "1.25"
    bolder, same_trust = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["ab", "trust"], feeds)
    assert np.abs(bolder - 1.25 * got).max() < 1e-5 and np.array_equal(same_trust, trust)

    # An ensemble: the graph just written (epoch 2, gain 1.25) and epoch 1's network, at one gain of 1.5.
    # Each row goes to the network its `member` names, and each network's colours are rescaled to 1.5.
    from export.onnx_export import load_unet

    member = tmp_path / "member.onnx"
    member.write_bytes((assets / "unet.onnx").read_bytes())
    entry = export_all(tmp_path / "epoch1.pt", assets, graphs=("unet",), chroma_gain=1.5,
                       ensemble_with=(member,))["models"]["unet"]
    assert entry["inputs"][-1] == "member" and entry["chroma_gain"] == 1.5
    assert [m.get("chroma_gain") for m in entry["members"]] == [1.25, None] and entry["members"][1]["epochs"] == 1
    ensemble = ort.InferenceSession(widen_float16((assets / "unet.onnx").read_bytes()), providers=["CPUExecutionProvider"])
    rows = {k: np.concatenate([v, v[..., ::-1, :], v[..., ::-1], v]) for k, v in feeds.items()}  # four rows
    mixed, mixed_trust = ensemble.run(["ab", "trust"], {**rows, "member": np.array([0, 1, 1, 0], dtype=np.int64)})
    first, first_trust = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["ab", "trust"], rows)
    with torch.no_grad():
        second, second_trust = (t.numpy() for t in load_unet(tmp_path / "epoch1.pt")[0](*map(torch.from_numpy, rows.values())))
    assert np.abs(mixed[[0, 3]] - first[[0, 3]] * 1.5 / 1.25).max() < 1e-4
    assert np.abs(mixed[[1, 2]] - second[[1, 2]] * 1.5).max() < 5e-3  # float16 storage
    assert np.abs(mixed_trust[[1, 2]] - second_trust[[1, 2]]).max() < 5e-3
    assert np.abs(first[[1, 2]] / 1.25 - second[[1, 2]]).max() > 1e-2  # the two networks differ
    # Judged on the validation photos as the pipeline runs them: each retrieved reference takes a turn, the turns
    # are averaged; a graph's own gain is taken out, so the export scores as its checkpoint does.
    from training.judge import judge
    from training.train import psnr_rgb

    verdicts = judge([out / "last.pt", member, assets / "unet.onnx"], resumed.pairs, [1.0, 1.5])
    by = {(v.candidate.rsplit("/", 1)[-1], v.gain): v for v in verdicts}
    assert abs(by["member.onnx", 1.0].psnr - by["last.pt", 1.0].psnr) < 0.02
    assert by["last.pt", 1.5].chroma_ratio == pytest.approx(1.5 * by["last.pt", 1.0].chroma_ratio, rel=1e-3)
    rows = resumed.val_rows  # two retrieved references per validation photo, in order
    assert len(rows) == 2 * len(by["last.pt", 1.0].per_photo)
    batch = resumed._batch(resumed.pairs, rows)
    with torch.no_grad():
        turns = {name: load_unet(path)[0](batch.x, *batch.inputs())[0]
                 for name, path in (("epoch2", out / "last.pt"), ("epoch1", tmp_path / "epoch1.pt"))}
    l01, truth = batch.x[0::2, :1], batch.ab[0::2]
    alone = psnr_rgb(l01, (turns["epoch2"][0::2] + turns["epoch2"][1::2]) / 2, truth)
    np.testing.assert_allclose(by["last.pt", 1.0].per_photo, alone.numpy(), atol=1e-3)
    # What bounds a candidate: gray; its colours as one mean colour per photo; its colours moved to the truth's
    # mean colour; and the photo's own colours as its lone reference (the self reference, its own second opinion).
    bounds = {v.candidate.rsplit("/", 1)[-1]: v for v in judge([out / "last.pt"], resumed.pairs, [1.0], ceilings=True)}
    averaged = (turns["epoch2"][0::2] + turns["epoch2"][1::2]) / 2
    cast = averaged.mean(dim=(2, 3), keepdim=True)
    own_rows = [row - 1 for row in rows[0::2]]  # each photo's self reference precedes its retrieved ones
    own = resumed._batch(resumed.pairs, own_rows)
    with torch.no_grad():
        from_own = load_unet(out / "last.pt")[0](own.x, *own.inputs())[0]
    for name, ab in (("gray", torch.zeros_like(truth)), ("last.pt", averaged),
                     ("last.pt [its mean colour only]", cast.expand_as(averaged)),
                     ("last.pt [the truth's mean colour]", averaged - cast + truth.mean(dim=(2, 3), keepdim=True)),
                     ("last.pt [own colours as reference]", from_own)):
        np.testing.assert_allclose(bounds[name].per_photo, psnr_rgb(l01, ab.contiguous(), truth).numpy(), atol=1e-3)
    # Colourfulness as the benchmark measures it, the RGB made by the pipeline's own colour conversion.
    from archivecolor.bench.metrics import colorfulness
    from archivecolor.color import lab_to_rgb as pipeline_rgb

    def colourfulness(ab: torch.Tensor) -> float:
        lab = torch.cat([l01 * 100, ab * 128], dim=1).permute(0, 2, 3, 1).numpy().astype(np.float64)
        return float(np.mean([colorfulness(np.round(pipeline_rgb(image) * 255).astype(np.uint8)) for image in lab]))

    assert bounds["last.pt"].colourfulness_ratio == pytest.approx(colourfulness(averaged) / colourfulness(truth), rel=0.01)
    assert bounds["gray"].colourfulness_ratio < 0.01
    # An ensemble colours a lone reference with every network and averages them.
    ensemble_own = [v for v in judge([assets / "unet.onnx"], resumed.pairs, [1.0], ceilings=True)
                    if v.candidate.endswith("[own colours as reference]")]
    with torch.no_grad():
        from_own_first = load_unet(tmp_path / "epoch1.pt")[0](own.x, *own.inputs())[0]
    both = psnr_rgb(l01, (from_own + from_own_first) / 2, truth).numpy()
    np.testing.assert_allclose(ensemble_own[0].per_photo, both, atol=0.05)  # float16 storage
    # the ensemble: the first turn by epoch 2's network, the second by epoch 1's
    mixed = psnr_rgb(l01, (turns["epoch2"][0::2] + turns["epoch1"][1::2]) / 2, truth)
    np.testing.assert_allclose(by["unet.onnx", 1.0].per_photo, mixed.numpy(), atol=0.05)  # float16 storage
    assert np.abs(mixed.numpy() - alone.numpy()).max() > 0.01
    from export.__main__ import app as export_app
    from training.__main__ import app as training_app

    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = CliRunner().invoke(training_app, ["judge", str(tmp_path / "notes.pt"), "--pairs", str(out / "pairs-48")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "notes.pt: not a U-Net training checkpoint" in result.output

    # An ensemble cannot be a member, and the CLI says so without a traceback.
    with pytest.raises(ValueError, match=f"{assets / 'unet.onnx'}: .*an ensemble cannot be a member"):
        export_all(out / "last.pt", tmp_path / "assets", graphs=("unet",), ensemble_with=(assets / "unet.onnx",))
    result = CliRunner().invoke(export_app, ["--ensemble-with", str(member)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "add --checkpoint" in result.output and "Traceback" not in result.output

    # The mean of epochs 1 and 2: every weight and BatchNorm statistic halfway, stored as float16, and exportable.
    from training.train import average_checkpoints, load_checkpoint

    averaged = average_checkpoints([tmp_path / "epoch1.pt", out / "last.pt"], tmp_path / "average.pt")
    assert averaged["averaged_epochs"] == [1, 2] and "optimiser" not in averaged
    one, two = (load_checkpoint(p)["model"] for p in (tmp_path / "epoch1.pt", out / "last.pt"))
    mean = load_checkpoint(tmp_path / "average.pt")["model"]
    for name in ("enc.0.0.weight", "enc.0.1.running_var", "head.bias"):
        assert torch.allclose(mean[name].float(), (one[name] + two[name]) / 2, rtol=2e-3, atol=1e-4), name
    assert not torch.equal(one["head.bias"], two["head.bias"])
    assert export_all(tmp_path / "average.pt", assets, graphs=("unet",))["models"]["unet"]["epochs"] == 2
    other = tmp_path / "other.pt"  # another network's checkpoint cannot join the mean
    from archivecolor.nets.unet import ColorUNet

    torch.save({"model": ColorUNet(width=4, semantic=False).state_dict(), "epoch": 1}, other)
    result = CliRunner().invoke(training_app, ["average", str(tmp_path / "bad.pt"), str(other), str(out / "last.pt")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2 and f"{other}: another network" in result.output and not (tmp_path / "bad.pt").exists()


def test_histogram_distance_is_zero_for_the_same_colours_and_largest_for_gray():
    from archivecolor.color import normalise_ab, rgb_to_lab
    from training.train import histogram_distance, soft_histogram

    photos = [rgb_to_lab(p) for p in colour_photos(2, (64, 48))]
    ab = torch.from_numpy(np.stack([normalise_ab(lab[..., 1:]).transpose(2, 0, 1) for lab in photos])).float()
    assert torch.allclose(soft_histogram(ab).sum(dim=1), torch.ones(2))
    assert histogram_distance(ab, ab).item() < 1e-6
    muted = histogram_distance(ab * 0.5, ab).item()
    gray = histogram_distance(torch.zeros_like(ab), ab).item()
    assert 0.0 < muted < gray <= 2.0
    # The mirror image has the same colours: a distribution loss does not care where they are.
    assert histogram_distance(ab.flip(-1), ab).item() < 1e-5
    pred = (ab * 0.5).requires_grad_(True)
    histogram_distance(pred, ab).backward()
    assert pred.grad.abs().sum() > 0


def test_a_bundle_carries_smaller_photos_and_weights_that_train(data_root, tmp_path, models_home):
    from archivecolor.models.weights import load_backbone_weights
    from training.bundle import WEIGHTS_NAME, make_bundle
    from training.config import CONFIGS
    from training.data import list_photos
    from training.train import Trainer

    with pytest.raises(ValueError, match="more than 1.0 MiB"):
        make_bundle(data_root, tmp_path / "too-big", short_side=64, max_bytes=2**20)
    assert not (tmp_path / "too-big").exists()  # refused before writing anything

    made = make_bundle(data_root, tmp_path / "bundle", short_side=64, quality=85)
    data = tmp_path / "bundle" / "data"
    assert made.photos == 8 and [p.relative_to(data) for p in list_photos(data)] == \
        [p.relative_to(data_root) for p in list_photos(data_root)]  # same folders and names: the same split
    assert all(min(Image.open(p).size) == 64 for p in list_photos(data))
    assert not (data / "kodak24").exists()  # never a test set
    original, _ = load_backbone_weights("vgg16")
    bundled, source = load_backbone_weights("vgg16", tmp_path / "bundle" / WEIGHTS_NAME)
    assert source.kind == "file" and set(bundled) == set(original)
    assert all(np.allclose(bundled[k], original[k], rtol=1e-3, atol=1e-4) for k in original)

    config = replace(CONFIGS["cpu-small"], size=48, width=8, epochs=1, batch_size=2, validation_every=4)
    trainer = Trainer(config, data, tmp_path / "run", device="cpu", weights=tmp_path / "bundle" / WEIGHTS_NAME)
    assert np.isfinite(trainer.fit(1)[0]["val_psnr"])


def test_two_branch_loss_judges_retrieved_references_by_deep_features_only(data_root, tmp_path):
    from training.config import CONFIGS, LossSpec
    from training.train import Batch, Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "downloads").symlink_to(DOWNLOADS)
    branch = CONFIGS["cpu-branch"].schedule[0][1]
    assert branch.retrieved_pixel_weight == 0.0 and branch.deep_perceptual_weight > 0
    config = replace(CONFIGS["cpu-branch"], size=48, width=8, batch_size=2, validation_every=4, perceptual_weight=0.0)
    trainer = Trainer(config, data_root, out, device="cpu")
    trainer.epoch = 0
    rows = [trainer.train_photos[0] * 3 + k for k in range(3)]  # a self reference, then two retrieved ones
    batch = trainer._batch(trainer.pairs, rows)
    assert batch.retrieved.tolist() == [False, True, True]

    def loss_of(rows: list[int], spec: LossSpec) -> torch.Tensor:
        trainer.config = replace(config, schedule=((10**6, spec),))
        return trainer.loss(Batch(batch.x[rows], batch.ab[rows], [f[rows] for f in batch.semantic],
                                  batch.retrieved[rows]))[0]

    no_deep = replace(branch, deep_perceptual_weight=0.0)
    # A retrieved pair pays no pixel term: without the deep term its loss is zero ...
    assert loss_of([1, 2], no_deep).item() == 0.0
    # ... but a pixel weight brings it back, and the deep term alone gives it a gradient.
    assert loss_of([1, 2], replace(no_deep, retrieved_pixel_weight=1.0)).item() > 0
    deep = loss_of([1, 2], branch)
    assert deep.item() > 0 and deep.requires_grad
    deep.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
    # A self pair pays its pixel term in full and no deep term.
    own = loss_of([0], no_deep).item()
    assert own > 0 and loss_of([0], branch).item() == pytest.approx(own)


def test_online_pairs_are_fresh_views_with_real_references(data_root, tmp_path):
    import random

    from training.config import CONFIGS
    from training.data import OnlinePairs, list_photos, split
    from training.train import Trainer

    photos = list_photos(data_root)
    _, val = split(photos, 4)
    config = replace(CONFIGS["gpu-online"], size=48, width=8, batch_size=2, validation_every=4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "downloads").symlink_to(DOWNLOADS)
    trainer = Trainer(config, data_root, out, device="cpu")
    online = trainer.online
    assert isinstance(online, OnlinePairs)
    held = {i for i, p in enumerate(online.colour) if p in set(val)}
    assert held and all(not held & set(ranks[:5]) for ranks in online.ranked)  # validation colours stay unseen
    first = online.batch([0, 1, 2, 3], 0.5, random.Random(1), semantic=True)
    again = online.batch([0, 1, 2, 3], 0.5, random.Random(2), semantic=True)
    assert first.x.shape == (4, 13, 48, 48) and [f.shape[1] for f in first.semantic] == [256, 512, 512]
    assert not torch.equal(first.ab, again.ab)  # another crop of the same photos
    # The U-Net input starts with the target's own L, and the truth is that crop's colours.
    from archivecolor.nets.colour import lab_to_rgb

    assert torch.all(lab_to_rgb(first.x[:, :1], first.ab) >= 0)
    assert first.retrieved.dtype == torch.bool
    both = online.batch(list(range(4)) * 4, 0.5, random.Random(3), semantic=False)
    assert both.retrieved.any() and not both.retrieved.all() and both.semantic == []
    # Drawn in forked worker processes, the batches are the same as drawn here: each comes from its own seed.
    chunks, seeds = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2]], [7, 8, 9]
    here = list(online.batches(chunks, seeds, 0.5, True, second_opinion=True))
    pooled = list(online.batches(chunks, seeds, 0.5, True, second_opinion=True, workers=2))
    assert len(pooled) == 3 and not torch.equal(here[0].ab, here[1].ab)
    for a, b in zip(here, pooled):
        assert torch.equal(a.x, b.x) and torch.equal(a.ab, b.ab) and torch.equal(a.second, b.second)
        assert torch.equal(a.retrieved, b.retrieved) and all(torch.equal(f, g) for f, g in zip(a.semantic, b.semantic))
    history = trainer.fit(1)
    assert np.isfinite(history[0]["val_psnr"]) and history[0]["train_loss"] > 0
    # `matched_colour`: the same draws, the U-Net reading the matched colour (smooth, a mean over the reference's
    # 8×8 cells) in place of the warped ab; L and the similarity maps unchanged.
    matched = OnlinePairs(photos, set(val), replace(config, matched_colour=True), trainer.vgg, torch.device("cpu"))
    warped, colour = (p.batch([0, 1, 2, 3], 0.5, random.Random(1), semantic=False).x for p in (online, matched))
    assert torch.equal(warped[:, :1], colour[:, :1]) and torch.equal(warped[:, 3:], colour[:, 3:])
    roughness = [(x[:, 1:3, 1:] - x[:, 1:3, :-1]).abs().mean() for x in (warped, colour)]
    assert roughness[1] < roughness[0], roughness
    # A pair cache holds one kind of colour: a run of the other kind refuses it rather than train on the wrong one.
    from training.data import build_pairs

    folder = next(out.glob("pairs-*-val"))
    with pytest.raises(SystemExit, match="the warped ab, --config gpu-online trains on the matched colour"):
        build_pairs(photos, folder, replace(config, matched_colour=True), trainer.vgg, torch.device("cpu"))


def test_online_runs_precompute_only_the_validation_pairs_and_they_are_the_full_caches(data_root, tmp_path):
    from training.config import CONFIGS
    from training.train import Trainer

    def run(name):
        out = tmp_path / name
        out.mkdir()
        (out / "downloads").symlink_to(DOWNLOADS)
        return out

    small = dict(size=48, width=8, batch_size=2, validation_every=4)
    full = Trainer(replace(CONFIGS["cpu-second"], **small), data_root, run("full"), device="cpu",
                   pairs_dir=tmp_path / "pairs")
    online = Trainer(replace(CONFIGS["gpu-online"], **small), data_root, run("online"), device="cpu")
    cache = online.pairs
    assert cache.validation_only and not full.pairs.validation_only
    assert {pair["split"] for pair in cache.meta} == {"val"} and len(cache.meta) == 2 * 3
    assert len(online.train_photos) == 6 and len(online.val_rows) == len(full.val_rows) == 4
    # Row for row, the validation pairs are those of the full cache.
    for mine, theirs in zip(online.val_rows, full.val_rows):
        assert cache.meta[mine] == full.pairs.meta[theirs]
        assert np.array_equal(cache.x[mine], full.pairs.x[theirs])
        assert np.array_equal(cache.x[cache.second_of(mine)], full.pairs.x[full.pairs.second_of(theirs)])
    assert online.validate()["val_psnr"] == pytest.approx(
        Trainer(replace(CONFIGS["gpu-online"], **small), data_root, run("online2"), device="cpu",
                pairs_dir=tmp_path / "pairs").validate()["val_psnr"], abs=1e-4)
    # A run on precomputed pairs cannot train on a validation-only cache; the message names the folder.
    with pytest.raises(SystemExit, match="pairs-48-val"):
        Trainer(replace(CONFIGS["cpu-second"], **small), data_root, run("x"), device="cpu",
                pairs_dir=tmp_path / "online" / "pairs-48-val")


def test_a_run_fitted_to_its_time_scales_its_schedule_and_finishes_it(data_root, tmp_path):
    from training.config import CONFIGS
    from training.train import Trainer, load_checkpoint

    config = CONFIGS["gpu-online"]
    assert config.scaled_to(30).decay_from == 15 and config.scaled_to(30).epochs == 30
    half = config.scaled_to(30)
    assert half.lr_at(29) == pytest.approx(config.lr * config.final_lr_fraction)  # the decay still ends at the floor
    assert half.lr_at(14) == config.lr

    config = replace(config, size=48, width=8, batch_size=2, validation_every=4, epochs=20, decay_from=6)
    out = tmp_path / "run"
    out.mkdir()
    (out / "downloads").symlink_to(DOWNLOADS)
    trainer = Trainer(config, data_root, out, device="cpu", workers=2)
    # No time at all: the second epoch (the first warms up) shows that only one more fits, and the run still
    # ends its schedule, with the decay scaled to it.
    history = trainer.fit(max_minutes=0, fit_to_time=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert trainer.config.epochs == 3 and trainer.config.decay_from == 1
    assert history[-1]["lr"] == pytest.approx(config.lr * config.final_lr_fraction)
    saved = load_checkpoint(out / "last.pt")["config"]
    assert saved["epochs"] == 3 and saved["decay_from"] == 1
    resumed = Trainer(config, data_root, out, device="cpu")
    assert resumed.resume() and resumed.config.epochs == 3 and resumed.config.decay_from == 1


@pytest.mark.slow  # about two minutes: three epochs of the real gpu-finetune configuration on a CPU
def test_the_device_job_trains_and_brings_back_a_model_that_exports(tmp_path, models_home):
    import os
    import subprocess
    import sys

    from export.onnx_export import export_all
    from tests.conftest import ROOT
    from training.bundle import make_bundle
    from training.config import TRAIN_FOLDERS

    data = tmp_path / "data"
    for i, photo in enumerate(colour_photos(24, (96, 80))):
        folder = data / TRAIN_FOLDERS[i % len(TRAIN_FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(folder / f"p{i}.jpg")
    make_bundle(data, tmp_path / "bundle", short_side=80)
    out = tmp_path / "out"
    # on the packaged model, as a lease would fine-tune it
    env = {**os.environ, "DEVICE": "cpu", "BUNDLE": str(tmp_path / "bundle"), "RUN_DIR": str(tmp_path / "run"),
           "PYTHON": sys.executable, "CONFIG": "gpu-finetune", "INIT": str(models_home / "models" / "unet.onnx")}
    done = subprocess.run(["bash", str(ROOT / "training" / "device_job.sh"), str(out), "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "3 epochs fit in 0.0 minutes" in log and "started from the weights of" in log  # no time: the least run
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and history[0]["train_loss"] > 0
    best = max(history, key=lambda h: h["val_psnr"])["epoch"]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == best
    assert torch.load(out / "average.pt", weights_only=True)["averaged_epochs"] == [1, 2, 3]  # fewer than AVERAGE
    slim = torch.load(out / "model.pt", weights_only=True)
    assert "optimiser" not in slim and slim["config"]["name"] == "gpu-finetune" and slim["config"]["frozen_batchnorm"]
    assert (out / "model.pt").stat().st_size < (tmp_path / "run" / "last.pt").stat().st_size / 2
    assets = tmp_path / "assets"
    assets.mkdir()
    assert export_all(out / "model.pt", assets, graphs=("unet",))["models"]["unet"]["config"] == "gpu-finetune"


def test_a_run_starts_from_an_exported_graph_with_its_batchnorms_frozen(data_root, tmp_path, models_home):
    """The packaged U-Net (whose training checkpoint may be gone) can be trained on: the network starts out computing
    what the graph computes, and its folded BatchNorms keep their statistics while it trains, after a resume too."""
    import onnxruntime as ort

    from archivecolor.models.layout import CHROMA_GAIN_PROP
    from training.config import CONFIGS
    from training.train import Trainer, load_checkpoint

    graph = models_home / "models" / "unet.onnx"
    config = replace(CONFIGS["cpu-second"], size=48, epochs=1, batch_size=2, validation_every=4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "downloads").symlink_to(DOWNLOADS)
    trainer = Trainer(config, data_root, out, device="cpu")
    trainer.initialise(graph)
    assert trainer.config.frozen_batchnorm

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gain = float(session.get_modelmeta().custom_metadata_map[CHROMA_GAIN_PROP])
    rng = np.random.default_rng(0)
    feeds = {"x13": rng.uniform(-1, 1, (2, 13, 48, 64)), "tf3": rng.uniform(0, 4, (2, 256, 12, 16)),
             "tf4": rng.uniform(0, 4, (2, 512, 6, 8)), "tf5": rng.uniform(0, 4, (2, 512, 3, 4)),
             "second_ab": rng.uniform(-0.5, 0.5, (2, 2, 48, 64))}
    feeds = {name: f.astype(np.float32) for name, f in feeds.items()}
    with torch.no_grad():
        start = trainer.model.eval()(*map(torch.from_numpy, feeds.values()))[0].numpy()
    assert np.abs(start * gain - session.run(["ab"], feeds)[0]).max() < 1e-4

    bn = trainer.model.enc[0][1]
    statistics = bn.running_mean.clone(), bn.running_var.clone()
    before = trainer.model.enc[0][0].weight.detach().clone()
    trainer.fit(1)
    assert torch.equal(bn.running_mean, statistics[0]) and torch.equal(bn.running_var, statistics[1])
    assert not torch.equal(trainer.model.enc[0][0].weight, before)  # it trained
    assert load_checkpoint(out / "last.pt")["config"]["frozen_batchnorm"]
    resumed = Trainer(replace(config, epochs=2), data_root, out, device="cpu")
    assert resumed.resume() and resumed.config.frozen_batchnorm

    # A configuration of another shape, or an ensemble, is refused, naming the file.
    other = Trainer(replace(CONFIGS["cpu-small"], size=48, epochs=1, batch_size=2, validation_every=4), data_root,
                    tmp_path / "other", device="cpu", pairs_dir=out / "pairs-48")
    with pytest.raises(SystemExit, match=f"{graph}: a U-Net of width 32, .* second opinion True; --config cpu-small"):
        other.initialise(graph)
    from tests.conftest import small_ensemble

    small_ensemble(tmp_path / "ensemble.onnx")
    with pytest.raises(SystemExit, match="ensemble.onnx: an ensemble of several networks"):
        trainer.initialise(tmp_path / "ensemble.onnx")


def test_a_second_opinion_starts_as_the_model_it_widens_and_reads_the_other_reference(data_root, tmp_path):
    """--init widens the first convolution with zeros; each retrieved pair's second opinion is the photo's other
    retrieved reference, a self pair's its own warp; the export reads `second_ab` and follows it."""
    import random

    from export.onnx_export import export_all
    from training.config import CONFIGS
    from training.train import Trainer

    def run(name, config):
        out = tmp_path / name
        out.mkdir()
        (out / "downloads").symlink_to(DOWNLOADS)
        return Trainer(config, data_root, out, device="cpu", pairs_dir=tmp_path / "pairs")

    small = dict(size=48, width=8, batch_size=2, validation_every=4)
    plain = run("plain", replace(CONFIGS["cpu-small"], **small))
    plain.fit(1)
    second = run("second", replace(CONFIGS["cpu-second"], **small))
    second.initialise(tmp_path / "plain" / "last.pt")

    cache = second.pairs
    rows = list(range(len(cache.meta)))
    batch = second._batch(cache, rows)
    for i, row in enumerate(rows):
        other = cache.second_of(row)
        assert cache.photo_of(other) == cache.photo_of(row)
        if cache.meta[row]["kind"] == "self":
            assert other == row
        else:
            assert other != row and cache.meta[other]["kind"] == "retrieved"
        assert torch.equal(batch.second[i], torch.from_numpy(np.asarray(cache.x[other, 1:3], np.float32)))

    plain.model.eval()
    second.model.eval()
    with torch.no_grad():
        narrow = plain.model(batch.x, *batch.semantic)[0]
        widened = second.model(batch.x, *batch.inputs())[0]
    assert torch.equal(narrow, widened)  # the new channels start at zero

    history = second.fit(1)
    assert np.isfinite(history[0]["val_psnr"])
    assert second.model.enc[0][0].weight[:, 13:].abs().sum() > 0  # and it learnt to read them

    online = replace(CONFIGS["gpu-online"], **small)
    pairs = run("online", online).online.batch([0, 1, 2, 3] * 3, 0.5, random.Random(0), semantic=True, second_opinion=True)
    assert pairs.second.shape == (12, 2, 48, 48)
    own = ~pairs.retrieved
    assert own.any() and pairs.retrieved.any()
    assert torch.equal(pairs.second[own], pairs.x[own, 1:3])  # a self pair stands alone
    assert not torch.equal(pairs.second[pairs.retrieved], pairs.x[pairs.retrieved, 1:3])

    assets = tmp_path / "assets"
    assets.mkdir()
    registry = export_all(tmp_path / "second" / "last.pt", assets)
    assert registry["models"]["unet"]["second_opinion"]
    import onnxruntime as ort

    from archivecolor.models.store import widen_float16

    session = ort.InferenceSession(widen_float16((assets / "unet.onnx").read_bytes()), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x13", "tf3", "tf4", "tf5", "second_ab"]
    feeds = {"x13": batch.x[:2].numpy(), **{n: f[:2].numpy() for n, f in zip(("tf3", "tf4", "tf5"), batch.semantic)}}
    with torch.no_grad():
        expected = second.model.eval()(batch.x[:2], *[f[:2] for f in batch.inputs()])[0].numpy()
    agree = session.run(["ab"], {**feeds, "second_ab": batch.second[:2].numpy()})[0]
    assert np.abs(agree - expected).max() < 5e-3
    differ = session.run(["ab"], {**feeds, "second_ab": -batch.second[:2].numpy()})[0]
    assert (differ != agree).any()  # the graph reads it (after one tiny epoch its weights are still small)
