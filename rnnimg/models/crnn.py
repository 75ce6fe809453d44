"""CRNN: a CNN applied to every frame, then an LSTM/GRU over time, with a clip head and a
per-frame head.

    clip (B, T, C, H, W) -> frame CNN -> (B, T, D) -> LSTM/GRU -> (B, T, R)
                                                         |-> clip head  (last step) -> (B, K)
                                                         |-> frame head (each step) -> (B, T, K)

The per-frame CNN is the small built-in one (``backbone="small"``) or a torchvision ResNet
(``"resnet18"``, ``"resnet34"``, ``"resnet50"``; torchvision is imported only then). Either
keeps a coarse spatial grid (adaptive pooling to ``grid x grid``, then flatten) instead of
global average pooling, so that where things are in the frame reaches the recurrent layer:
motion is a change of position over time.

``forward_features`` returns the recurrent features and ``forward_head`` the logits, so a
labelling job can also write embeddings.

Initial backbone weights (``backbone_weights``) come from a file or store URL the user gives,
never from a model hub: a safetensors file, or a ``torch.save``-d state dict read with
``weights_only=True``. They are loaded when training starts (``load_backbone_weights``); a
trained model's own weights hold the whole network, so loading one never needs them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn

from rnnimg.models.config import JsonConfig


RNN_TYPES = ("lstm", "gru")
RNN_IMPLS = ("torch", "reference")
# torchvision ResNets usable as the per-frame CNN, with the channels of their last stage.
TORCHVISION_BACKBONES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
BACKBONES = ("small", *TORCHVISION_BACKBONES)
# ImageNet statistics, which torchvision's pretrained ResNets expect their input normalised by.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneUnavailable(ImportError, ValueError):
    """The configured backbone needs a package (torchvision) that is not importable here."""


@dataclass(frozen=True)
class CRNNConfig(JsonConfig):
    """Architecture and input layout of a CRNN. Saved next to every checkpoint and table."""

    config_name = "CRNN"
    tuple_fields = ("labels", "cnn_channels")

    labels: tuple[str, ...] = ("left", "right")  # class names; index = class id
    frame_size: int = 64  # frames are resized to frame_size x frame_size before the CNN
    frames_per_clip: int = 8  # frames sampled per clip
    clip_seconds: float = 2.0  # seconds of video one clip covers
    stride_seconds: float = 2.0  # distance between clip starts when labelling
    backbone: str = "small"  # per-frame CNN: "small" (built in) or a torchvision ResNet ("resnet18", "resnet34", "resnet50")
    backbone_weights: str = ""  # file/store URL of the backbone's initial weights (safetensors or weights-only state dict); "" = random init
    cnn_channels: tuple[int, ...] = (16, 32, 64, 64)  # channels of the small CNN's stride-2 stages
    grid: int = 4  # spatial grid kept after the CNN (grid x grid cells, flattened)
    feature_dim: int = 128  # per-frame feature size fed to the recurrent layer
    rnn_type: str = "lstm"  # "lstm" or "gru"
    rnn_impl: str = "torch"  # "torch" (cuDNN/native kernels) or "reference" (rnnimg.nn, from the equations)
    rnn_hidden: int = 128  # hidden size of the recurrent layer
    rnn_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.1  # dropout before the heads
    frame_loss_weight: float = 0.3  # weight of the per-frame head's loss during training

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"labels must name at least 2 classes, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {list(self.labels)}")
        self.check_clip_plan()
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.rnn_impl not in RNN_IMPLS:
            raise ValueError(f"rnn_impl must be one of {RNN_IMPLS}, got {self.rnn_impl!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not isinstance(self.backbone_weights, str):
            raise ValueError(f"backbone_weights must be a file or store URL (or '' for none), got {self.backbone_weights!r}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.rnn_hidden < 1 or self.rnn_layers < 1 or self.feature_dim < 1:
            raise ValueError(
                f"rnn_hidden, rnn_layers and feature_dim must be >= 1, got {self.rnn_hidden}, {self.rnn_layers}, {self.feature_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class SmallCNN(nn.Module):
    """Per-frame CNN: stride-2 conv stages, a ``grid x grid`` pool, flatten, linear.

    Input (N, 3, H, W) float; output (N, feature_dim).
    """

    def __init__(self, channels: tuple[int, ...], grid: int, feature_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(c_in * grid * grid, feature_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stages(x)))  # (N, C, h, w) -> (N, C, g, g) -> (N, D)

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Load a SmallCNN state dict (e.g. the ``backbone.*`` weights of an earlier model), strictly."""
        _load_strict(self, state, "small CNN")


def import_torchvision(backbone: str):
    """torchvision, imported only for a backbone that needs it.

    Raises:
        BackboneUnavailable: torchvision is not importable here.
    """
    try:
        import torchvision
    except Exception as err:  # noqa: BLE001 - a broken install (ABI mismatch with torch) is as unusable as a missing one
        raise BackboneUnavailable(
            f"backbone {backbone!r} needs torchvision, which is not importable here ({type(err).__name__}: {err}); "
            f"install the torchvision build that matches torch {torch.__version__} (pip install 'rnnimg[vision]'), "
            f"or use backbone 'small'"
        ) from err
    return torchvision


class TorchvisionBackbone(nn.Module):
    """Per-frame torchvision ResNet: ImageNet normalisation, the ResNet stages, a ``grid x grid`` pool,
    flatten, linear (an identity when ``grid == 1`` and the ResNet's width equals ``feature_dim``).

    Input (N, 3, H, W) float in [-0.5, 0.5] (``to_model_input``); output (N, feature_dim).
    """

    def __init__(self, name: str, grid: int, feature_dim: int):
        super().__init__()
        torchvision = import_torchvision(name)
        net = getattr(torchvision.models, name)(weights=None)  # never a download: weights come from backbone_weights
        channels = TORCHVISION_BACKBONES[name]
        net.avgpool = nn.AdaptiveAvgPool2d(grid)
        net.fc = nn.Identity()  # ResNet.forward flattens after the pool: (N, C, g, g) -> (N, C*g*g)
        self.name = name
        self.net = net
        self.proj = (
            nn.Identity() if grid == 1 and channels == feature_dim else nn.Sequential(nn.Linear(channels * grid * grid, feature_dim), nn.ReLU(inplace=True))
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 0.5 - self.mean) / self.std  # [-0.5, 0.5] -> ImageNet-normalised, (N, 3, H, W)
        return self.proj(self.net(x))  # (N, 3, H, W) -> (N, C*g*g) -> (N, D)

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict (its ``fc.*`` classifier is dropped), strictly otherwise."""
        _load_strict(self.net, {k: v for k, v in state.items() if not k.startswith("fc.")}, f"torchvision {self.name}")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"backbone weights do not fit the {what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise ValueError(f"backbone weights do not fit the {what}: shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
    module.load_state_dict(state)


def _make_backbone(config: CRNNConfig) -> nn.Module:
    if config.backbone == "small":
        return SmallCNN(config.cnn_channels, config.grid, config.feature_dim)
    return TorchvisionBackbone(config.backbone, config.grid, config.feature_dim)


def make_rnn(config: CRNNConfig) -> nn.Module:
    """The recurrent layer of a config: torch.nn's LSTM/GRU (``rnn_impl="torch"``) or rnnimg.nn's
    cells written from their equations (``"reference"``), batch first, (B, T, feature_dim) -> (B, T, rnn_hidden)."""
    kwargs = dict(input_size=config.feature_dim, hidden_size=config.rnn_hidden, num_layers=config.rnn_layers, batch_first=True)
    if config.rnn_impl == "reference":
        from rnnimg import nn as reference  # the cells written from their equations

        module = reference
    else:
        module = nn
    return module.LSTM(**kwargs) if config.rnn_type == "lstm" else module.GRU(**kwargs)


class CRNN(nn.Module):
    """Per-frame CNN -> LSTM/GRU -> clip head and per-frame head.

    Shapes:
        input clips: float (B, T, C, H, W), values roughly in [-0.5, 0.5] (see ``to_model_input``)
        forward_features -> (B, T, R), the recurrent outputs (R = rnn_hidden)
        forward_head     -> clip logits (B, K), frame logits (B, T, K)

    On a GPU, ``use_channels_last()`` stores the CNN's weights and frames channels-last, which
    the convolution kernels run fastest on under bf16 autocast. The reference recurrent cells
    (``rnn_impl="reference"``) take their weights' dtype only, so autocast is switched off around them.

    Raises (constructor):
        BackboneUnavailable: a torchvision backbone without torchvision importable.
    """

    def __init__(self, config: CRNNConfig):
        super().__init__()
        self.config = config
        self.backbone = _make_backbone(config)
        self.rnn = make_rnn(config)
        self.dropout = nn.Dropout(config.dropout)
        self.clip_head = nn.Linear(config.rnn_hidden, config.num_classes)
        self.frame_head = nn.Linear(config.rnn_hidden, config.num_classes)
        self.channels_last = False

    def use_channels_last(self) -> "CRNN":
        """Keep the CNN's weights, and the frames fed to it, in channels-last memory format."""
        self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = clips.shape
        frames = clips.reshape(b * t, c, h, w)  # (B, T, C, H, W) -> (B*T, C, H, W)
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)  # same shape, NHWC strides
        per_frame = self.backbone(frames).reshape(b, t, -1)  # (B*T, D) -> (B, T, D)
        if hasattr(self.rnn, "flatten_parameters"):
            self.rnn.flatten_parameters()
        if self.config.rnn_impl == "reference":
            weights_dtype = next(self.rnn.parameters()).dtype
            with torch.autocast(per_frame.device.type, enabled=False):
                sequence, _ = self.rnn(per_frame.to(weights_dtype))  # (B, T, D) -> (B, T, R), in the weights' dtype
        else:
            sequence, _ = self.rnn(per_frame)  # (B, T, D) -> (B, T, R)
        return sequence

    def forward_head(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence = self.dropout(sequence)
        clip_logits = self.clip_head(sequence[:, -1])  # (B, R) at the last step -> (B, K)
        frame_logits = self.frame_head(sequence)  # (B, T, R) -> (B, T, K)
        return clip_logits, frame_logits

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(clips))


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file at any store URL, without unpickling arbitrary objects.

    A ``.safetensors`` file is read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper
    is unwrapped.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: the file holds no tensors by name.
    """
    from rnnimg import storage

    if not storage.exists(uri):
        raise FileNotFoundError(f"no weights file at {uri}")
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a file that is not a state dict
        raise ValueError(f"{uri} is not a safetensors file nor a weights-only torch state dict: {type(err).__name__}: {str(err)[:200]}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{uri} holds no state dict (a mapping of names to tensors)")
    return state


def load_backbone_weights(model: CRNN, uri: str) -> None:
    """Initialise ``model``'s per-frame CNN from a weights file (``CRNNConfig.backbone_weights``).

    For a torchvision backbone, a torchvision state dict of that ResNet (its classifier is
    ignored); for the small CNN, the ``backbone.*`` weights of an earlier model or a SmallCNN
    state dict. A state dict of a whole CRNN (``backbone.`` prefixed keys) is accepted for both.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: the file is not a state dict, or its names or shapes do not fit the backbone.
    """
    state = read_state_dict(uri)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if isinstance(model.backbone, TorchvisionBackbone):
            state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    model.backbone.load_pretrained(state)


def build_model(config: CRNNConfig) -> CRNN:
    return CRNN(config)
