"""int8 inference of the learned nets on the CPU, through ONNX Runtime.

A net's int8 model is the net with batch norm folded, exported to ONNX and statically
quantised: every convolution takes int8 weights (one scale per output channel) and uint8
activations whose ranges were calibrated once, on training patches, and shipped beside the
weights as ``<weights>.int8.onnx``. Everything else stays in float32 inside the model: the
per-patch normalisation of the input, the central-surround crop and pooling, the L2
normalisations and the frame refiner's bounded outputs. On CPUs with int8 dot-product
instructions (AVX512-VNNI, AVX-VNNI, Arm dot product) ONNX Runtime runs these convolutions
several times faster than float32.

An int8 model names the sha256 of the weights it was made from; loading it for other
weights is an error, so a model can never describe with ranges calibrated for another net.
``python -m descmatch.quantize`` makes one (it needs the ``onnx`` package too).

ONNX Runtime is optional: ``pip install 'descmatch[int8]'``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .nets.fold import fold_batchnorm

log = logging.getLogger(__name__)

#: What follows a weights file's stem in the name of its int8 model.
INT8_SUFFIX = ".int8.onnx"
#: The ONNX metadata key that names the sha256 of the weights a model was made from.
SOURCE_KEY = "descmatch_weights_sha256"
_INSTALL = "pip install 'descmatch[int8]'"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"--precision int8 needs onnxruntime: {_INSTALL}") from None
    return onnxruntime


def int8_path(weights: Path) -> Path:
    """Where the int8 model of a weights file lives: ``name.pt`` -> ``name.int8.onnx``."""
    return weights.with_name(weights.stem + INT8_SUFFIX)


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (x86 VNNI, Arm dot product), the
    ones that make int8 convolutions faster than float32; False where it cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})
    return False


class Int8Net:
    """A net's int8 model behind the torch net's call: patches in, the net's outputs out
    (float32 torch tensors on the CPU). ``patch_size`` is the net's.

    ``expected_sha256``: the weights the model must have been made from (else WeightsError).
    ``threads``: ONNX Runtime's intra-op threads (default: torch's). Its threads do not spin
    between calls, so they leave the cores to the patch sampling in between.

    Shape: (N,1,P,P) float in [0,1] -> (N,D) or, for the frame refiner, (theta (N,), rho (N,)).
    """

    def __init__(
        self,
        path: Path,
        patch_size: int,
        expected_sha256: str | None = None,
        threads: int | None = None,
    ) -> None:
        ort = _ort()
        if not path.is_file():
            raise ConfigError(
                f"--precision int8: no int8 model {path} for these weights; make one with "
                f"`python -m descmatch.quantize --method METHOD --images TRAINING_IMAGES`"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise WeightsError(f"{path}: not a readable ONNX model: {first}") from None
        source = self.session.get_modelmeta().custom_metadata_map.get(SOURCE_KEY, "")
        if expected_sha256 is not None and source != expected_sha256:
            raise WeightsError(
                f"{path}: an int8 model of other weights (sha256 {source[:12] or 'unknown'}, "
                f"not {expected_sha256[:12]}); make it again with `python -m descmatch.quantize`"
            )
        self.path = path
        self.source_sha256 = source
        self.patch_size = patch_size
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, patches: torch.Tensor) -> Any:
        x = np.ascontiguousarray(patches.detach().to("cpu", torch.float32).numpy())
        out = [torch.from_numpy(o) for o in self.session.run(self.outputs, {self.input_name: x})]
        return out[0] if len(out) == 1 else tuple(out)


class _Outputs(nn.Module):
    """The net's inference outputs alone: a descriptor net's descriptors (without the
    intermediate feature maps), a frame net's (theta, rho)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)


def export_onnx(net: nn.Module, path: Path, input_shape: tuple[int, ...]) -> list[str]:
    """Write ``net`` (batch norm folded, eval mode) as a float32 ONNX model with a dynamic
    batch; returns its output names. Shape: input ``patches`` (N, *input_shape), e.g. (N,1,P,P)."""
    model = _Outputs(fold_batchnorm(net.eval())).eval()
    example = torch.rand(2, *input_shape)
    with torch.inference_mode():
        n_out = len(out) if isinstance(out := model(example), tuple) else 1
    names = ["desc"] if n_out == 1 else [f"out{i}" for i in range(n_out)]
    with warnings.catch_warnings():  # the tracer's notes on shapes it fixes; none apply
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["patches"],
            output_names=names,
            dynamic_axes={"patches": {0: "n"}, **{n: {0: "n"} for n in names}},
            opset_version=17,
            dynamo=False,
        )
    return names


def quantize_net(
    net: nn.Module,
    calibration: torch.Tensor,
    out: Path,
    source_sha256: str,
    batch_size: int = 256,
) -> Path:
    """Make ``net``'s int8 model at ``out`` (written through a temporary file and renamed):
    static quantisation of every convolution (int8 weights per output channel, uint8
    activations, QDQ form), the activation ranges calibrated on ``calibration`` patches
    (min-max); the rest of the graph stays float32. The model records ``source_sha256``.

    Shape: calibration (N,1,P,P) float in [0,1], patches the net would see in use.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(
                {"patches": calibration[i : i + batch_size].float().numpy()}
                for i in range(0, len(calibration), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="descmatch-int8-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        q = Path(tmp) / "int8.onnx"
        export_onnx(net, fp32, tuple(calibration.shape[1:]))
        quantize_static(
            str(fp32),
            str(q),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        model = onnx.load(str(q))
        onnx.helper.set_model_props(model, {SOURCE_KEY: source_sha256})
        part = out.with_name(out.name + ".part")
        onnx.save(model, str(part))
        part.replace(out)
    log.info("wrote %s (calibrated on %d patches)", out, len(calibration))
    return out
