"""Export a trained model to ONNX for onnxruntime: one graph, and everything a runtime needs in it.

The full graph is ``frames`` (B, T, S, S, 3) uint8 RGB crops → ``probs`` (B, C): the input
centring and scale, the backbone as predict runs it (``FrozenBackbone``: BatchNorm folded), the
features rounded to the cache's storage dtype (the head was trained on float16 features, and
predict's torch path rounds them the same way), and the head with softmax. The decoder and
``resize_frames`` stay outside, as in predict, because resizing depends on the source size.

Clips have a fixed length: T is the checkpoint's seq-len, and clips are never padded, so nothing
needs packed sequences (which do not export, pytorch #49936). A video with fewer than seq-len kept
frames is given with its real length (the time axis accepts 1..seq-len): a head's output on the
unpadded clip is, by the head contract, its output on the padded clip with lengths, which is what
the torch path computes. The boundary between the two parts is the tensor ``features``
(B, T, D), so a runtime can run the backbone once per frame and the head per clip (predict does).
``head_only`` exports just ``features`` (float32) → ``probs``, for users with their own features.

Each part is exported with the dynamo exporter (``torch.export``) and checked against torch on
probe inputs of other batch and clip lengths; where that fails (an operator it cannot translate, a
time axis it fixes, numbers that differ), the TorchScript exporter (``dynamo=False``) is the
fallback, and where both fail, one line names the part and each exporter's reason. ``metadata_props`` carry classes, FrameSpec, frame selection, seq-len, clip sampling,
the head config and provenance, each as JSON; ``read_metadata`` reads them back.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbones import FrozenBackbone
from .config import Exporter, ExportConfig, FrameSelection, FrameSpec, Provenance
from .errors import ConfigError, ExportError
from .files import atomic_write_bytes, ensure_dir, sha256_file
from .heads import HeadConfig
from .model import Model, load_model
from .runtime import autocast_ctx, autocast_on

log = logging.getLogger(__name__)

FORMAT = "action-pipeline-onnx"
FORMAT_VERSION = 1
OPSET = 20
INSTALL_HINT = "pip install 'action-pipeline[onnx]'"


@dataclass(frozen=True)
class OnnxMeta:
    """What an exported graph is and how to feed it, as stored in its ``metadata_props``."""

    graph: Literal["full", "head"]  # full: frames → probs; head: features → probs
    classes: tuple[str, ...]
    frame_spec: FrameSpec
    selection: FrameSelection
    seq_len: int
    eval_clips: int
    head_config: HeadConfig
    provenance: Provenance  # of the features the head was trained on
    checkpoint: dict[str, Any]  # path, sha256, kind, epoch of the source checkpoint
    exporters: dict[str, str]  # part → "dynamo" | "legacy"
    clip_sampling: str = "uniform"  # eval_clips uniform clips per video, probabilities averaged
    feature_dtype: str = "float32"  # features are rounded to this between backbone and head (full graph)
    created: str = ""
    package_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def feature_dim(self) -> int:
        return self.head_config.input_dim

    def to_props(self) -> dict[str, str]:
        """ONNX ``metadata_props``: every value JSON."""
        d = {
            "format": FORMAT, "format_version": self.format_version, "graph": self.graph,
            "classes": list(self.classes), "frame_spec": self.frame_spec.to_dict(),
            "selection": self.selection.to_dict(), "seq_len": self.seq_len, "eval_clips": self.eval_clips,
            "clip_sampling": self.clip_sampling, "feature_dtype": self.feature_dtype,
            "head_config": self.head_config.to_dict(), "provenance": self.provenance.to_dict(),
            "checkpoint": self.checkpoint, "exporters": self.exporters, "created": self.created,
            "package_version": self.package_version, "inputs": _describe_inputs(self), "outputs": {
                "probs": f"(batch, {len(self.classes)}) float32 class probabilities (softmax), in the order of "
                         "'classes'"},
        }
        return {k: json.dumps(v, sort_keys=True) for k, v in d.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> OnnxMeta:
        if props.get("format") != json.dumps(FORMAT):
            raise ExportError(f"{where} has no action-pipeline metadata (not an ONNX model written by `export`); export a "
                              "checkpoint with `python cli.py export CHECKPOINT --out MODEL.onnx`")
        try:
            d = {k: json.loads(v) for k, v in props.items()}
            if int(d["format_version"]) > FORMAT_VERSION:
                raise ExportError(f"{where} was written by a newer action-pipeline (ONNX format "
                                  f"{d['format_version']}, this one reads up to {FORMAT_VERSION}); upgrade")
            return cls(graph=d["graph"], classes=tuple(d["classes"]), frame_spec=FrameSpec.from_dict(d["frame_spec"]),
                       selection=FrameSelection.from_dict(d["selection"]), seq_len=int(d["seq_len"]),
                       eval_clips=int(d["eval_clips"]), head_config=HeadConfig.from_dict(d["head_config"]),
                       provenance=Provenance.from_dict(d["provenance"]), checkpoint=d.get("checkpoint", {}),
                       exporters=d.get("exporters", {}), clip_sampling=d.get("clip_sampling", "uniform"),
                       feature_dtype=d.get("feature_dtype", "float32"), created=d.get("created", ""),
                       package_version=d.get("package_version", ""), format_version=int(d["format_version"]))
        except ExportError:
            raise
        except (KeyError, ValueError, TypeError, ConfigError) as e:  # ConfigError: a head config out of range
            raise ExportError(f"{where}: its action-pipeline metadata is damaged ({type(e).__name__}: {e}); "
                              "export the checkpoint again") from e


def _describe_inputs(m: OnnxMeta) -> dict[str, str]:
    s = m.frame_spec
    if m.graph == "head":
        return {"features": f"(batch, time, {m.feature_dim}) float32 frame features of {m.provenance.backbone}; "
                            f"time = seq_len ({m.seq_len}), or the real length of a shorter clip (never padded)"}
    return {"frames": f"(batch, time, {s.size}, {s.size}, 3) uint8 RGB frames, {s.describe()}, {s.interpolation} "
                      f"antialiased; time = seq_len ({m.seq_len}) frames picked by uniform sampling, or every "
                      "frame of a shorter clip (never padded); normalisation is inside the graph"}


@dataclass
class ExportResult:
    out: Path
    meta: OnnxMeta
    exporters: dict[str, str]
    fallbacks: dict[str, str]  # part → why the dynamo exporter was not used
    max_abs_diff: float  # onnxruntime vs torch probabilities on a random probe batch
    bytes: int
    seconds: float
    inputs: list[str] = field(default_factory=list)
    precision_gap: float | None = None  # vs torch under the features' reduced-precision autocast (predict's)


# ----------------------------------------------------------------------------- the two parts


class FramesToFeatures(nn.Module):
    """(B, T, S, S, 3) uint8 → (B, T, D) float32: predict's backbone, then the storage rounding."""

    def __init__(self, frozen: FrozenBackbone, round_to: torch.dtype | None) -> None:
        super().__init__()
        self.frozen = frozen
        self.round_to = round_to

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[0], frames.shape[1]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).to(torch.float32)  # (B·T, 3, S, S)
        f = self.frozen.net(self.frozen.normalize(x)).float()  # (B·T, D): as FrozenBackbone runs it
        if self.round_to is not None:
            f = f.to(self.round_to).to(torch.float32)
        return f.reshape(b, t, f.shape[-1])  # (B, T, D)


class FeaturesToProbs(nn.Module):
    """(B, T, D) features, all T steps real → (B, C) probabilities."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(features, None).float(), dim=1)


# ----------------------------------------------------------------------------------- export


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ConfigError(f"export needs the onnx package: {INSTALL_HINT}") from e
    return onnx


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"the onnx runtime needs the onnxruntime package: {INSTALL_HINT}") from e
    return onnxruntime


def ort_session(model: Any, threads: int | None = None, device: str = "cpu"):
    """An onnxruntime session for a ModelProto or a path: every graph optimisation, one intra-op
    thread per core torch uses (the decoders run between batches, as for torch). ``device="cuda"``
    runs it with the CUDA execution provider (onnxruntime-gpu); inputs and outputs stay numpy."""
    ort = _ort()
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("this onnxruntime has no CUDA provider: pip install onnxruntime-gpu, or run the "
                              ".onnx on the CPU (drop --device cuda)")
        providers.insert(0, "CUDAExecutionProvider")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3  # errors only: no warnings on stderr for unused initializers
    if device == "cuda" and hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA/cuDNN from the torch wheels
        ort.preload_dlls()
    path = str(model) if isinstance(model, str | Path) else None
    try:
        with warnings.catch_warnings():  # a provider that cannot start is a warning there; an error below
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(path or model.SerializeToString(), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types, not RuntimeError
        raise ExportError(f"onnxruntime cannot load {path or 'the model'}: {_short(e)}") from e
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        # the package has the provider, but CUDA or cuDNN did not load: it would run on the CPU
        raise ExportError("onnxruntime's CUDA provider did not start (CUDA or cuDNN libraries missing or not "
                          "matching onnxruntime-gpu's build); run the .onnx on the CPU (drop --device cuda)")
    return sess


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


@contextlib.contextmanager
def _fd_to_file(fd: int) -> Iterator[Any]:
    """File descriptor ``fd`` into a temporary file while the block runs (→ the file, read it
    after the block), where C++ code writes past ``sys.stdout``; nothing redirected where ``fd``
    is not open."""
    with tempfile.TemporaryFile() as tmp:
        try:
            saved = os.dup(fd)
        except OSError:
            yield tmp
            return
        try:
            os.dup2(tmp.fileno(), fd)
            yield tmp
        finally:
            os.dup2(saved, fd)
            os.close(saved)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout and warn at length, and the TorchScript exporter
    prints a graph it cannot export (~60 lines for a transformer) from C++, past ``sys.stdout``;
    stdout belongs to results. All of it goes to the debug log."""
    buf = io.StringIO()
    sys.stdout.flush()
    with _fd_to_file(1) as raw:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
                warnings.simplefilter("ignore")
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):  # C stdio's buffer, before the descriptor goes back
                        ctypes.CDLL(None).fflush(None)
        finally:  # also when the export failed: its output says why
            raw.seek(0)
            text = (buf.getvalue() + raw.read().decode("utf-8", "replace")).strip()
            if text:
                log.debug("exporter output:\n%s", text)


def _clear_rnn_dispatch_cache() -> None:
    """The dynamo exporter exports LSTMs and GRUs with a dynamic time axis by swapping in a
    while-loop decomposition (``torch.export._patches``) through ``py_kernels``, but it does not
    invalidate the operators' dispatch cache: after one export in a process, later ones get the
    cached unrolled decomposition and a time axis fixed to the example's length (seen with torch
    2.14). Clearing the cache around each export gives every export the decomposition it asks for."""
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        cache = getattr(op, "_dispatch_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _export_once(module: nn.Module, example: torch.Tensor, name: str, out: str, axes: dict[int, str],
                 kind: str, max_time: int) -> Any:
    onnx = _onnx()
    out_axes = {0: "batch", 1: "time"} if out == "features" else {0: "batch"}
    with _quiet(), torch.no_grad():
        if kind == "dynamo":
            dims = {a: torch.export.Dim(n, min=1, max=max_time) if n == "time" else torch.export.Dim(n, min=1)
                    for a, n in axes.items()}
            _clear_rnn_dispatch_cache()
            try:
                prog = torch.onnx.export(module, (example,), None, dynamo=True, input_names=[name],
                                         output_names=[out], dynamic_shapes=(dims,), opset_version=OPSET,
                                         verbose=False)
            finally:
                _clear_rnn_dispatch_cache()
            model = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(module, (example,), buf, dynamo=False, input_names=[name], output_names=[out],
                              dynamic_axes={name: axes, out: out_axes}, opset_version=OPSET,
                              do_constant_folding=True)
            model = onnx.load_from_string(buf.getvalue())
    inp = model.graph.input[0]
    for a, n in axes.items():
        dim = inp.type.tensor_type.shape.dim[a]
        if not dim.dim_param:
            raise ExportError(f"the {n} axis came out fixed to {dim.dim_value}")
        dim.dim_param = n
    for o in model.graph.output:
        for a, dim in enumerate(o.type.tensor_type.shape.dim):
            if dim.dim_param:
                dim.dim_param = out_axes.get(a, dim.dim_param)
    return model


MERGED_TOL = 1e-2  # the whole graph against the model, in probability: its parts were each checked closer


def _check(model: Any, module: nn.Module, name: str, probes: list[torch.Tensor], tol: float) -> float:
    """Max |onnxruntime − torch| over ``probes``; raises on a wrong shape or a relative error
    (‖got − want‖ / ‖want‖) above ``tol``. The check is for wrong graphs (a fixed axis, a lost
    branch), which are off by O(1): float noise differs between networks (a random-init
    EfficientNet differs from itself by 3e-4 between memory formats in torch alone)."""
    sess = ort_session(model)
    worst = 0.0
    for x in probes:
        with torch.no_grad():
            want = module(x).numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime gave shape {tuple(got.shape)} for input {tuple(x.shape)}, torch "
                              f"{tuple(want.shape)}")
        if not np.isfinite(got).all() and np.isfinite(want).all():
            raise ExportError(f"onnxruntime gave non-finite values on input {tuple(x.shape)}")
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        rel = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))
        if rel > tol:
            raise ExportError(f"onnxruntime differs from torch (max {diff:.3g}, relative {rel:.2g}) on input "
                              f"{tuple(x.shape)}")
        worst = max(worst, diff)
    return worst


def export_part(module: nn.Module, example: torch.Tensor, probes: list[torch.Tensor], *, what: str, name: str,
                out: str, axes: dict[int, str], exporter: Exporter = "auto", max_time: int = 1024,
                tol: float = 1e-3) -> tuple[Any, str, str | None]:
    """Export ``module`` (one input ``name`` → one output ``out``) and check it against torch on
    ``probes`` in onnxruntime → (ModelProto, exporter used, why dynamo was not used). Where every
    exporter fails: one line naming ``what`` and why."""
    module = module.eval()
    kinds = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    why: list[str] = []
    for kind in kinds:
        t = time.perf_counter()
        try:
            model = _export_once(module, example, name, out, axes, kind, max_time)
            _check(model, module, name, probes, tol)
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways; each becomes one reason
            why.append(f"{kind} exporter: {_short(e)}")
            log.debug("%s: %s exporter failed", what, kind, exc_info=True)
            continue
        log.debug("%s: exported with the %s exporter in %.1f s", what, kind, time.perf_counter() - t)
        return model, kind, "; ".join(why) or None
    raise ExportError(f"{what} cannot be exported to ONNX: {'; '.join(why)}")


def _merge(backbone: Any, head: Any) -> Any:
    """One graph: the backbone part's ``features`` output feeds the head part's ``features`` input."""
    onnx = _onnx()
    from onnx import compose

    ir = max(backbone.ir_version, head.ir_version)
    backbone.ir_version = head.ir_version = ir
    merged = compose.merge_models(backbone, head, io_map=[("features", "features")], prefix1="backbone/",
                                  prefix2="head/", producer_name="action-pipeline", producer_version=__version__)
    names = {"backbone/frames": "frames", "backbone/features": "features", "head/probs": "probs"}
    g = merged.graph
    for n in g.node:
        n.input[:] = [names.get(i, i) for i in n.input]
        n.output[:] = [names.get(o, o) for o in n.output]
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = names.get(v.name, v.name)
    onnx.checker.check_model(merged)
    return merged


def _round_dtype(prov: Provenance) -> torch.dtype | None:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(prov.dtype)


def probe_frames(b: int, t: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(b, t, size, size, 3) uint8 frames with a photo's statistics: smooth colour regions with
    some grain. Uniform noise is far from what a network was calibrated on: a BatchNorm-recalibrated
    random EfficientNet gives features up to ~1300 on it (under 1 on real frames), where float32
    rounding alone is 2.6 % off, and the check refused a graph that is right on real frames."""
    coarse = torch.rand(b * t, 3, max(2, size // 8), max(2, size // 8), generator=g) * 255
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=g) * 6
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(b, t, size, size, 3).contiguous()


def export_model(cfg: ExportConfig) -> ExportResult:
    """Export a checkpoint to one ONNX file with its metadata; checked against torch."""
    t0 = time.perf_counter()
    onnx = _onnx()
    _ort()
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out}/model.onnx")
    if out.suffix.lower() != ".onnx":  # predict tells an export from a checkpoint by the name, and
        # an existing checkpoint or cache given by mistake must not be replaced
        raise ConfigError(f"--out {out}: give a file name ending in .onnx, such as {out.with_suffix('.onnx')}")
    ensure_dir(out.parent, "--out folder")
    model = load_model(cfg.checkpoint)
    seq_len, d = model.seq_len, model.head_config.input_dim
    g = torch.Generator().manual_seed(0)
    time_axes = {0: "batch", 1: "time"} if seq_len > 1 else {0: "batch"}

    head = FeaturesToProbs(model.head.eval())
    feats = lambda b, t: torch.randn(b, t, d, generator=g)  # noqa: E731
    probes = [feats(3, seq_len), feats(2, 1), feats(1, max(1, seq_len // 2))]
    head_proto, head_kind, head_why = export_part(
        head, feats(2, seq_len), probes, what=f"the {model.head_config.arch} head", name="features", out="probs",
        axes=time_axes, exporter=cfg.exporter, max_time=seq_len)
    exporters, fallbacks = {"head": head_kind}, {"head": head_why} if head_why else {}

    spec = model.frame_spec
    if cfg.head_only:
        proto, full, name = head_proto, head, "features"
        probe = feats(2, seq_len)
    else:
        bb = model.backbone(cfg.weights)
        frozen = FrozenBackbone(bb.net.eval(), spec, channels_last=False, copy=False)
        part = FramesToFeatures(frozen, _round_dtype(model.provenance)).eval()
        frames = lambda b, t: probe_frames(b, t, spec.size, g)  # noqa: E731
        bb_proto, bb_kind, bb_why = export_part(
            part, frames(2, 3), [frames(3, 2), frames(1, 1)], what=f"the backbone {model.provenance.backbone}",
            name="frames", out="features", axes={0: "batch", 1: "time"}, exporter=cfg.exporter, tol=1e-2)
        exporters["backbone"] = bb_kind
        if bb_why:
            fallbacks["backbone"] = bb_why
        proto = _merge(bb_proto, head_proto)
        full = nn.Sequential(part, head).eval()
        name, probe = "frames", frames(2, min(seq_len, 16))

    with torch.no_grad():
        want = full(probe).numpy()
    session = ort_session(proto)
    got = session.run(None, {name: probe.numpy()})[0]
    max_diff = float(np.abs(got - want).max())
    if not max_diff <= MERGED_TOL:  # each part passed its check: this would be a wrong join of the two
        raise ExportError(f"the exported graph's probabilities differ from the model's by {max_diff:.3g} "
                          f"(more than {MERGED_TOL:g}); nothing was written to {out}")

    gap = None
    if not cfg.head_only and model.provenance.precision in ("bfloat16", "float16"):
        small = probe[:1, :4]  # the autocast forward runs ~10x slower than float32 on a CPU
        gap = _precision_gap(part, head, small, session.run(None, {name: small.numpy()})[0], model.provenance.precision)
        where = ("predict with the checkpoint computes them so on a CPU too" if model.provenance.precision == "bfloat16"
                 else "predict with the checkpoint computes them so on a GPU; on a CPU, in float32 as the graph does")
        log.warning("the features were computed under %s autocast (%s); the ONNX graph computes the backbone in "
                    "float32, so its probabilities differ%s, and borderline labels can differ. For the same numbers "
                    "in both, extract the features with --precision fp32", model.provenance.precision, where,
                    "" if gap is None else f" by up to {gap:.2g} on a sample clip (measured under that autocast on "
                    "this CPU)")

    meta = OnnxMeta(
        graph="head" if cfg.head_only else "full", classes=tuple(model.classes), frame_spec=spec,
        selection=model.selection, seq_len=seq_len, eval_clips=model.eval_clips, head_config=model.head_config,
        provenance=model.provenance, checkpoint=_checkpoint_info(model), exporters=exporters,
        feature_dtype="float32" if cfg.head_only else model.provenance.dtype,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    proto.doc_string = (f"action-pipeline {__version__}: {'features' if cfg.head_only else 'uint8 frames'} → class "
                        f"probabilities of {model.head_config.arch} on {model.provenance.backbone}; see metadata_props")
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta.to_props())
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return ExportResult(out=out, meta=meta, exporters=exporters, fallbacks=fallbacks, max_abs_diff=max_diff,
                        bytes=len(data), seconds=time.perf_counter() - t0, inputs=[name], precision_gap=gap)


def _precision_gap(part: nn.Module, head: nn.Module, probe: torch.Tensor, got: np.ndarray, precision: str
                   ) -> float | None:
    """For features computed under bfloat16/float16 autocast: the largest difference between the
    exported graph's probabilities ``got`` on ``probe`` and torch's with the backbone under that
    autocast on this CPU and the head in float32, as predict runs a checkpoint (onnxruntime has no
    such mode); None where this torch cannot autocast to that dtype on a CPU (it disables it)."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns where it disables an autocast it cannot run
        with autocast_ctx(torch.device("cpu"), dtype):
            if not autocast_on("cpu"):
                return None
            feats = part(probe)
        want = head(feats.float()).numpy()
    return float(np.abs(got - want).max())


def _checkpoint_info(model: Model) -> dict[str, Any]:
    return {"path": str(model.path.resolve()), "sha256": sha256_file(model.path), "kind": model.kind,
            "epoch": model.ckpt.get("epoch"), "metrics": _plain(model.ckpt.get("metrics", {}))}


def _plain(v: Any) -> Any:
    """JSON-safe copy of checkpoint metrics (numbers, strings, lists, dicts)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, bool | int | str) or v is None:
        return v
    try:
        f = float(v)
        return f if np.isfinite(f) else None
    except (TypeError, ValueError):
        return str(v)


def read_metadata(model: str | Path | Any, where: str | Path | None = None) -> OnnxMeta:
    """The metadata of an exported file (a path) or a loaded ModelProto (read from ``where``); one
    line if it is not ours."""
    where = str(model) if isinstance(model, str | Path) else str(where or "the ONNX model")
    if isinstance(model, str | Path):
        model = load_onnx(model)
    meta = OnnxMeta.from_props({p.key: p.value for p in model.metadata_props}, where)
    _check_against_graph(meta, model, where)
    return meta


def _check_against_graph(meta: OnnxMeta, model: Any, where: str) -> None:
    """The metadata fits the graph it describes: as many classes as probabilities, the frame size
    or feature size of its input, clip lengths of at least one step. An edited file is refused
    here, in one line, not in onnxruntime's shape errors."""
    def dims(values: Any, name: str) -> list[int | None] | None:
        v = next((v for v in values if v.name == name), None)
        return None if v is None else [d.dim_value if d.HasField("dim_value") else None
                                       for d in v.type.tensor_type.shape.dim]

    g = model.graph
    wrong = []
    if meta.seq_len < 1 or meta.eval_clips < 1:
        wrong.append(f"seq_len {meta.seq_len} and eval_clips {meta.eval_clips} must be at least 1")
    probs = dims(g.output, "probs")
    if probs is not None and len(probs) == 2 and probs[1] not in (None, len(meta.classes)):
        wrong.append(f"{len(meta.classes)} classes for {probs[1]} probabilities")
    if meta.graph == "full" and (frames := dims(g.input, "frames")) is not None and len(frames) == 5:
        if any(d not in (None, meta.frame_spec.size) for d in frames[2:4]):
            wrong.append(f"frame size {meta.frame_spec.size} for an input of {frames[2]}x{frames[3]}")
    if meta.graph == "head" and (feats := dims(g.input, "features")) is not None and len(feats) == 3:
        if feats[2] not in (None, meta.feature_dim):
            wrong.append(f"feature size {meta.feature_dim} for an input of {feats[2]}")
    if wrong:
        raise ExportError(f"{where}: its action-pipeline metadata does not fit its graph ({'; '.join(wrong)}); "
                          "export the checkpoint again")


def load_onnx(path: str | Path) -> Any:
    """An ONNX ModelProto, or one line saying why ``path`` is not one."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf decode errors, truncated files
        raise ExportError(f"{path} is not a readable ONNX file ({_short(e)}); export it again") from e


def split_model(model: Any) -> tuple[Any, Any]:
    """The full graph as its two parts: ``frames`` → ``features`` and ``features`` → ``probs``."""
    from onnx.utils import Extractor

    ex = Extractor(model)
    return ex.extract_model(["frames"], ["features"]), ex.extract_model(["features"], ["probs"])
