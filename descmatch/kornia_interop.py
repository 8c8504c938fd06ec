"""descmatch inside kornia: nets as kornia patch descriptors, keypoints as kornia LAFs, and
descmatch's detector as a kornia detector.

Frames. A descmatch keypoint (centre ``xy``, OpenCV ``size`` and ``angle`` in degrees,
clockwise on screen) is described from a square window of side ``mr_size x size`` turned
by ``angle``. A kornia LAF ``[A | c]`` samples the patch over ``c + A [-1, 1]^2``, so the
same window is the LAF with centre ``xy``, scale ``mr_size x size / 2`` and orientation
``-angle`` (kornia's angles turn counter-clockwise on screen). Both put the centre of the
top-left pixel at (0, 0). Central-surround nets (``sosnet-cs``, ``l2net-cs``) see twice the
window: :class:`LAFDescriptor` widens the LAFs by the net's ``window_factor`` for them.

    import kornia.feature as KF
    from descmatch.kornia_interop import LAFDescriptor, KorniaDetector
    feature = KF.LocalFeature(KorniaDetector(max_keypoints=2000), LAFDescriptor("sosnet"))
    lafs, responses, descs = feature(image)  # image (1,1,H,W) float in [0,1]

Shapes: LAFs (B,N,2,3); patches (B,1,P,P) -> descriptors (B,D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .detect import Keypoints, SiftDetector
from .errors import ConfigError, InputError
from .nets import DescriptorNet
from .patches import DEFAULT_MR_SIZE
from .weights import load_net


def _kornia() -> Any:
    import kornia.feature as KF

    return KF


def lafs_from_keypoints(
    kps: Keypoints, mr_size: float = DEFAULT_MR_SIZE, window_factor: float = 1.0
) -> torch.Tensor:
    """kornia LAFs of descmatch keypoints: the windows descmatch cuts their patches from
    (``window_factor`` widens them, as for central-surround nets).

    Shape: N keypoints -> (1,N,2,3) float32.
    """
    KF = _kornia()
    xy = torch.as_tensor(np.asarray(kps.xy, np.float32)).reshape(1, -1, 2)
    scale = torch.as_tensor(np.asarray(kps.size, np.float32)) * (mr_size * window_factor / 2)
    ori = -torch.as_tensor(np.asarray(kps.angle, np.float32))
    return KF.laf_from_center_scale_ori(xy, scale.view(1, -1, 1, 1), ori.view(1, -1, 1))


def keypoints_from_lafs(
    lafs: torch.Tensor,
    responses: torch.Tensor | None = None,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: float = 1.0,
) -> Keypoints:
    """descmatch keypoints of one image's LAFs (the inverse of :func:`lafs_from_keypoints`):
    size from the LAF's scale ``sqrt(|det A|)``, angle from its orientation, in [0, 360).
    An affine LAF keeps its scale and orientation; its anisotropy is dropped.

    Shape: lafs (1,N,2,3) or (N,2,3); responses (1,N), (N,) or None -> N keypoints.
    """
    KF = _kornia()
    lafs = lafs.detach().float().cpu()
    if lafs.ndim == 3:
        lafs = lafs[None]
    if lafs.ndim != 4 or lafs.shape[0] != 1 or tuple(lafs.shape[2:]) != (2, 3):
        raise InputError(f"LAFs of one image expected, (1,N,2,3); got {tuple(lafs.shape)}")
    n = lafs.shape[1]
    xy = KF.get_laf_center(lafs)[0].numpy()
    scale = KF.get_laf_scale(lafs).reshape(n).numpy()
    angle = np.mod(-KF.get_laf_orientation(lafs).reshape(n).numpy(), 360.0)
    resp = (
        np.zeros(n, np.float32)
        if responses is None
        else responses.detach().float().cpu().reshape(n).numpy()
    )
    size = 2.0 * scale / (mr_size * window_factor)
    return Keypoints(
        np.ascontiguousarray(xy, np.float32),
        size.astype(np.float32),
        angle.astype(np.float32),
        resp.astype(np.float32),
    )


class PatchDescriptor(nn.Module):
    """A descmatch net as a kornia-style patch descriptor (as ``kornia.feature.HardNet``):
    patches in [0, 1] to L2-normalised descriptors, per-patch normalisation inside, in eval
    mode. ``patch_size`` and ``window_factor`` come from the net.

    Shape: (B,1,P,P) -> (B,D).
    """

    def __init__(self, net: DescriptorNet) -> None:
        super().__init__()
        if isinstance(net.window_factor, tuple):
            raise ConfigError(
                f"{net.name}: sees {len(net.window_factor)} patches a keypoint; kornia's "
                "LAFDescriptor cuts one, so use descmatch's describer for this net"
            )
        self.net = net.eval()
        self.patch_size = int(net.patch_size)
        self.window_factor = float(net.window_factor)
        self.dim = int(net.dim)
        self.eval()

    @classmethod
    def load(cls, method: str, weights: str | Path | None = None) -> PatchDescriptor:
        """A shipped or user net: ``method`` with ``weights`` (a path or shipped name)."""
        return cls(load_net(method, weights).net)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, p, p):
            raise InputError(
                f"{self.net.name}: patches (B,1,{p},{p}) expected, got {tuple(patches.shape)}"
            )
        return self.net(patches)


class LAFDescriptor(nn.Module):
    """``kornia.feature.LAFDescriptor`` of a descmatch net (``method`` and ``weights`` as the
    CLI takes them, or a :class:`PatchDescriptor`): describes the patches of LAFs, widened by
    the net's ``window_factor`` for central-surround nets. Usable as the descriptor of
    ``kornia.feature.LocalFeature``.

    Shape: forward(img (B,1,H,W) in [0,1], lafs (B,N,2,3)) -> (B,N,D).
    """

    def __init__(
        self,
        method: str | PatchDescriptor = "sosnet",
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        KF = _kornia()
        desc = (
            method if isinstance(method, PatchDescriptor) else PatchDescriptor.load(method, weights)
        )
        self.patch_descriptor = desc
        self.inner = KF.LAFDescriptor(desc, patch_size=desc.patch_size, grayscale_descriptor=True)
        self.eval()

    def forward(self, img: torch.Tensor, lafs: torch.Tensor) -> torch.Tensor:
        if self.patch_descriptor.window_factor != 1.0:
            lafs = _kornia().scale_laf(lafs, self.patch_descriptor.window_factor)
        return self.inner(img, lafs)


class KorniaDetector(nn.Module):
    """descmatch's DoG detector (OpenCV SIFT keypoints, strongest ``max_keypoints``) as a
    kornia detector: an image to LAFs of the descmatch windows (``mr_size``) and responses.

    Shape: forward(img (1,1,H,W) in [0,1]) -> lafs (1,N,2,3), responses (1,N).
    """

    def __init__(
        self,
        max_keypoints: int = 4000,
        mr_size: float = DEFAULT_MR_SIZE,
        upright: bool = False,
    ) -> None:
        super().__init__()
        self.detector = SiftDetector(max_keypoints=max_keypoints, upright=upright)
        self.mr_size = float(mr_size)

    def forward(
        self, img: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if img.ndim != 4 or img.shape[0] != 1 or img.shape[1] != 1:
            raise InputError(f"one gray image (1,1,H,W) expected, got {tuple(img.shape)}")
        kps = self.detector(img[0, 0].detach().float().cpu().numpy())
        lafs = lafs_from_keypoints(kps, self.mr_size).to(img.device)
        responses = torch.as_tensor(kps.response, device=img.device).reshape(1, -1)
        return lafs, responses
