"""ONNX Runtime sessions: one per graph per process, on the provider that really runs.

ONNX Runtime falls back to CPU silently, so after creating a session we read back
``get_providers()``, report it, and fail loudly when CUDA was asked for and is not there.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from archivecolor.errors import ModelNotFound, ProviderUnavailable, UsageError
from archivecolor.models.layout import CHROMA_GAIN_PROP, MEMBER, MEMBERS_PROP, OPTIONAL_INPUTS
from archivecolor.models.registry import FLOAT16_MARK
from archivecolor.models.store import InstalledModel, model_dir, read_manifest, verified_path, widen_float16
from archivecolor.models.weights import sha256_bytes

PROVIDER_CHOICES = ("auto", "cuda", "cpu")
INT8_SUFFIX = "_int8"
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_cuda_loaded: bool | None = None
# Graphs that ONNX Runtime's optimizer cannot speed up: the correspondence is thousands of small
# gathers and elementwise ops on dynamic shapes, and optimizing it took 0.9 s of the 1.2 s start-up
# for the same run time (the warped ab agrees within 0.002 of ab/128; the 224 benchmark is unchanged).
_UNOPTIMIZED = {"correspondence"}
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def gpu_present() -> bool:
    """Whether an NVIDIA driver is loadable here (checked without asking ONNX Runtime for CUDA)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def preload_cuda_libraries() -> bool:
    """Load the CUDA 13 and cuDNN 9 libraries that pip's nvidia wheels install, which ORT cannot find."""
    global _cuda_loaded
    if _cuda_loaded is not None:
        return _cuda_loaded
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    folders = [site / "cu13" / "lib", site / "cudnn" / "lib"]
    loaded = False
    for folder in folders:
        for lib in sorted(glob.glob(str(folder / "lib*.so*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                loaded = True
            except OSError:
                continue
    _cuda_loaded = loaded
    return loaded


def provider_list(provider: str) -> list:
    if provider not in PROVIDER_CHOICES:
        raise UsageError(f"--provider {provider!r}: choose one of {', '.join(PROVIDER_CHOICES)}")
    cuda = (_CUDA, {"cudnn_conv_algo_search": "HEURISTIC"})
    if provider == "cpu":
        return [_CPU]
    if provider == "cuda":
        if _CUDA not in ort.get_available_providers():
            raise ProviderUnavailable("--provider cuda: this onnxruntime build has no CUDA provider; "
                                      "install onnxruntime-gpu (and not onnxruntime beside it)")
        if not gpu_present():
            raise ProviderUnavailable("--provider cuda: no NVIDIA GPU driver (libcuda.so.1) found; use --provider cpu")
        preload_cuda_libraries()
        return [cuda, _CPU]
    if _CUDA in ort.get_available_providers() and gpu_present():
        preload_cuda_libraries()
        return [cuda, _CPU]
    return [_CPU]


def use_shared_cpu_arena(options: ort.SessionOptions) -> None:
    """Let a session allocate from one CPU arena that every session of the process shares.

    Each session's own arena keeps its peak for good, so three graphs held the sum of their peaks
    (3.1 GB on 24 scans of 1536x1024); one shared arena holds about the largest (1.9 GB), at the same speed.
    """
    global _shared_arena_registered
    with _shared_arena_lock:
        if not _shared_arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's defaults, no cap
            _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


@dataclass
class ModelSession:
    """A verified graph loaded in ONNX Runtime."""

    name: str
    model: InstalledModel
    session: ort.InferenceSession

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


def check_signature(name: str, path: Path, session: ort.InferenceSession) -> None:
    """Refuse a graph whose input and output names are not the ones this version's registry lists
    (models installed by another version, or a user's own export with other names)."""
    from archivecolor.models.registry import load_registry

    spec = load_registry().get(name)
    if spec is None:
        return
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    optional = set(OPTIONAL_INPUTS.get(name, ()))
    if set(inputs) - optional != set(spec.inputs) - optional or not set(spec.outputs) <= set(outputs):
        raise ModelNotFound(f"{path}: inputs {inputs} and outputs {outputs} are not this version's "
                            f"({list(spec.inputs)} -> {list(spec.outputs)}); run `archivecolor models pull --force`")


def open_session(name: str, provider: str = "auto", home: Path | None = None, threads: int = 0,
                 path: Path | None = None) -> ModelSession:
    """Verify ``name``'s file against the manifest and open it on ``provider`` (auto, cuda or cpu).

    ``path``: a user's own export of that graph instead of the installed one (its sha256 is recorded;
    its input and output names must be this version's).
    """
    source: str | bytes
    if path is None:
        path, entry = verified_path(name, home)
        source = str(path)
    else:
        if not Path(path).is_file():
            raise UsageError(f"--model-path {path}: no such file; pass an ONNX U-Net exported with `python -m export`")
        data = Path(path).read_bytes()
        entry = InstalledModel(name, str(path), sha256_bytes(data), len(data), {"user_file": str(path)})
        # `python -m export` stores weights as float16, as the package ships them; `models pull` widens
        # installed files, and a user's own export is widened here, in memory.
        source = widen_float16(data) if FLOAT16_MARK.encode() in data else data
    providers = provider_list(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    use_shared_cpu_arena(options)
    if name in _UNOPTIMIZED:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    elif os.environ.get("ARCHIVECOLOR_THREADS"):
        options.intra_op_num_threads = int(os.environ["ARCHIVECOLOR_THREADS"])
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors
        if provider == "cuda":
            raise ProviderUnavailable(f"{path}: cannot start on CUDA ({exc}); use --provider cpu") from exc
        raise ProviderUnavailable(f"{path}: ONNX Runtime cannot load it ({exc}); run `archivecolor models pull --force`") from exc
    check_signature(name, path, session)
    actual = session.get_providers()
    if provider == "cuda" and _CUDA not in actual:
        raise ProviderUnavailable(f"{path}: CUDA was requested but ONNX Runtime fell back to {actual[0]}; "
                                  f"check the CUDA 13 / cuDNN 9 libraries or use --provider cpu")
    return ModelSession(name, entry, session)


def networks_in(session: ort.InferenceSession) -> int:
    """How many networks a U-Net graph holds: more than one for an ensemble (which reads ``member``)."""
    if not any(i.name == MEMBER for i in session.get_inputs()):
        return 1
    return int(session.get_modelmeta().custom_metadata_map.get(MEMBERS_PROP, "1"))


def chroma_gain_in(session: ort.InferenceSession) -> float:
    """The chroma gain a U-Net graph scales its output ab by (1 where it says none)."""
    return float(session.get_modelmeta().custom_metadata_map.get(CHROMA_GAIN_PROP, 1.0))


PRECISIONS = ("auto", "fp32", "int8")


def resolve_precision(precision: str, provider: str = "auto", home: Path | None = None,
                      catalog_precision: str | None = None) -> str:
    """fp32 or int8 for ``precision``. ``auto``: the precision of the catalogue the references are retrieved
    from (``catalog_precision``, so that a catalogue keeps working), else int8 on the CPU where ``models
    pull`` made the int8 twins, else fp32 (on CUDA, or without the twins)."""
    from archivecolor.models.registry import DEFAULT_BACKBONE, features_name

    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if catalog_precision is not None:
        return catalog_precision
    if provider_list(provider) != [_CPU]:
        return "fp32"
    manifest = read_manifest(home)
    return "int8" if all(current_twin(manifest, name) for name in (features_name(DEFAULT_BACKBONE), "unet")) else "fp32"


def current_twin(manifest: dict[str, InstalledModel], name: str) -> bool:
    """Whether ``name``'s int8 twin is installed and was made from the float file installed now (an
    upgrade that replaces the float file leaves the old twin stale until the next ``models pull``)."""
    twin, source = manifest.get(name + INT8_SUFFIX), manifest.get(name)
    return twin is not None and source is not None and twin.source.get("quantized_from") == source.sha256


def open_precision(name: str, precision: str, provider: str = "auto", home: Path | None = None, threads: int = 0,
                   path: Path | None = None) -> ModelSession:
    """``name`` at ``precision``: fp32, int8 (the twin that ``models pull --int8`` quantizes) or auto."""
    precision = resolve_precision(precision, provider, home)
    if precision == "fp32" or path is not None:
        return open_session(name, provider, home, threads, path=path)
    if name + INT8_SUFFIX in (manifest := read_manifest(home)) and not current_twin(manifest, name):
        raise ModelNotFound(f"{model_dir(home) / (name + INT8_SUFFIX)}.onnx was quantized from another {name} than the "
                            f"one installed; run `archivecolor models pull` to make it again")
    try:
        return open_session(name + INT8_SUFFIX, provider, home, threads)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{exc}; the int8 models are made by `archivecolor models pull --int8`") from exc
