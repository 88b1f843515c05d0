"""int8 versions of the VGG-16 features and the U-Net, made on the user's machine by `models pull --int8`.

Static quantisation (QDQ: per-channel int8 weights, uint8 activations, convolutions only), calibrated
on the packaged calibration photos (public-domain Prokudin-Gorskii colour reconstructions, 192 px).
Each photo's L is a target and the next photo its reference; they run through the installed float32
graphs, so the U-Net is calibrated on real correspondence inputs. The VGG weights come from the
user's weight source, so the int8 files cannot ship in the package.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from archivecolor.errors import ModelNotFound
from archivecolor.models.registry import ASSET_DIR, DEFAULT_BACKBONE, features_name
from archivecolor.models.session import INT8_SUFFIX
from archivecolor.models.store import InstalledModel, install_file, is_current, read_manifest, verified_path, write_manifest
from archivecolor.models.weights import sha256_file

CALIBRATION_DIR = ASSET_DIR / "calibration"
CALIBRATION_SHORT_SIDE = 192


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def calibration_photos() -> list[Path]:
    photos = sorted(CALIBRATION_DIR.glob("*.jpg"))
    if len(photos) < 2:
        raise ModelNotFound(f"{CALIBRATION_DIR}: the packaged calibration photos are missing; reinstall archivecolor")
    return photos


def calibration_feeds(home: Path | None = None, backbone: str = DEFAULT_BACKBONE,
                      unet_path: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Inputs of the features graph and of the U-Net (the installed one, or ``unet_path``) for every calibration
    pair, from the float32 graphs."""
    from archivecolor.pipeline import Models, load_reference, unet_rows

    # never through an existing (stale) twin
    models = Models.open("cpu", home, backbone, precision="fp32", unet_path=unet_path)
    prepared = [load_reference(path, path.name, CALIBRATION_SHORT_SIDE) for path in calibration_photos()]
    features_feeds, unet_feeds = [], []
    for i, target in enumerate(prepared):
        reference = prepared[(i + 1) % len(prepared)]
        reference.features = reference.features or models.features_of(reference.l)
        features_feeds.append({"l": target.l})
        # every row the U-Net runs for this target: an ensemble's members each colour it once
        unet_feeds.append(unet_rows(models, target.l, [[reference]], models.target_features(target.l)).feeds)
    return features_feeds, unet_feeds


def quantize_file(source: Path, feeds: list[dict], target: Path) -> None:
    quantize_static(str(source), str(target), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"])


def pull_int8(home: Path | None = None, backbone: str = DEFAULT_BACKBONE, force: bool = False,
              progress=None) -> list[tuple[InstalledModel, bool]]:
    """Install int8 twins of the installed features graph and U-Net (``models pull`` must have run).

    A twin is current while the float32 file it was made from and the calibration photos are the same, and for the
    U-Net the correspondence graph, which makes the inputs it is calibrated on.
    """
    say = progress or (lambda message: None)
    manifest = read_manifest(home)
    calibration = {p.name: sha256_file(p) for p in calibration_photos()}
    names = (features_name(backbone), "unet")
    sources = {name: verified_path(name, home) for name in names}
    done: list[tuple[InstalledModel, bool]] = []
    stale = []
    correspondence = verified_path("correspondence", home)[1].sha256
    for name in names:
        wanted = {"quantized_from": sources[name][1].sha256, "calibration": calibration}
        if name == "unet":
            wanted["calibrated_through"] = correspondence
        twin = manifest.get(name + INT8_SUFFIX)
        if not force and is_current(twin, home, wanted):
            done.append((twin, False))
        else:
            stale.append((name, wanted))
    if not stale:
        return done
    say("calibrating int8 models on the packaged photos")
    features_feeds, unet_feeds = calibration_feeds(home, backbone)
    feeds = {features_name(backbone): features_feeds, "unet": unet_feeds}
    with tempfile.TemporaryDirectory(prefix="archivecolor-int8-") as scratch:
        for name, wanted in stale:
            say(f"quantizing {name}")
            out = Path(scratch) / f"{name}.onnx"
            quantize_file(sources[name][0], feeds[name], out)
            entry = install_file(name + INT8_SUFFIX, out.read_bytes(),
                                 wanted | {"method": "static QDQ, per-channel int8 weights, uint8 activations, Conv"},
                                 home)
            manifest[entry.name] = entry
            done.append((entry, True))
    write_manifest(manifest, home)
    return done
