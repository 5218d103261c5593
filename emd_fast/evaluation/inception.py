"""The FID feature network: Inception-v3 (TensorFlow's inception-2015-12-05 graph) defined here, its weights read as
data from a file the user supplies. Nothing is downloaded and nothing in the file runs.

The network is the one NVlabs' ``inception-2015-12-05.pt`` (StyleGAN2-ADA, EDM, clean-fid) computes, module for
module and under the same state-dict names (``layers.conv.weight``, ``layers.mixed_4.tower_1.conv_2.beta``, ...):
convolutions without bias, each followed by a batch normalisation without scale (beta, mean, var; eps 1e-3) and a
ReLU; uint8 images resized to 299 x 299 as TensorFlow's resize_bilinear does (half-pixel offset, edge clamping), mapped
to [-1, 1) by (x - 128) / 128; the 2048 features after the last average pool.

Weights (``read_inception_weights``): our safetensors file (``convert_inception``: format "emd_fast.inception"), or a
torch file read as data (``emd_fast.safe_pickle``): NVlabs' TorchScript archive itself (its tensors only; its code is
never run) or a ``torch.save``'d state dict with these names. ``python -m emd_fast.fid convert SRC DST`` writes the
safetensors file (docs/security.md: how to get the weights).
"""
from __future__ import annotations

import collections
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..files import read_safetensors, save_safetensors_atomic
from ..safe_pickle import load_torch_file

FORMAT = "emd_fast.inception"
FEATURES = 2048
SIZE = 299
MAX_DEPTH = 16  # module nesting of a TorchScript archive read for its tensors (Inception's: 4)
# how TorchScript archives pickle typed lists and containers (each returns the value it is given)
TORCHSCRIPT_GLOBALS = {("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool", "tensor")}
TORCHSCRIPT_GLOBALS[("torch.jit._pickle", "restore_type_tag")] = lambda value, type_name: value


class ConvBN(nn.Module):
    """Convolution (no bias), batch norm without scale (eps 1e-3), ReLU: (N, cin, H, W) -> (N, cout, H', W')."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3))


def avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def chain(*convs: tuple) -> nn.Sequential:
    """ConvBN layers named conv, conv_1, conv_2, ... (a tower of the graph); each argument: ConvBN's arguments, or a
    ready module (a pooling) named ``pool``."""
    layers, i = {}, 0
    for c in convs:
        if isinstance(c, nn.Module):
            layers["pool"] = c
            continue
        layers["conv" if i == 0 else f"conv_{i}"] = ConvBN(*c)
        i += 1
    return nn.Sequential(collections.OrderedDict(layers))


class BlockA(nn.Module):  # 35 x 35
    def __init__(self, cin: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = chain((cin, 48, 1), (48, 64, 5, 1, 2))
        self.tower_1 = chain((cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1))
        self.tower_2 = chain(avg_pool(), (cin, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):  # 35 x 35 -> 17 x 17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, 2)
        self.tower = chain((cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):  # 17 x 17, factorised 7 x 7 convolutions
    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = chain((cin, mid, 1), (mid, mid, *row), (mid, 192, *col))
        self.tower_1 = chain((cin, mid, 1), (mid, mid, *col), (mid, mid, *row), (mid, mid, *col), (mid, 192, *row))
        self.tower_2 = chain(avg_pool(), (cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):  # 17 x 17 -> 8 x 8
    def __init__(self, cin: int):
        super().__init__()
        self.tower = chain((cin, 192, 1), (192, 320, 3, 2))
        self.tower_1 = chain((cin, 192, 1), (192, 192, (1, 7), 1, (0, 3)), (192, 192, (7, 1), 1, (3, 0)),
                             (192, 192, 3, 2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):  # 8 x 8, expanded filter banks
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, 1, 1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else avg_pool()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a, b = self.tower_conv(x), self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """uint8 RGB images (N, 3, H, W) -> pool features (N, 2048) float32 (weights: ``load_inception``)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(collections.OrderedDict({
            "conv": ConvBN(3, 32, 3, 2), "conv_1": ConvBN(32, 32, 3), "conv_2": ConvBN(32, 64, 3, 1, 1),
            "pool0": nn.MaxPool2d(3, stride=2), "conv_3": ConvBN(64, 80, 1), "conv_4": ConvBN(80, 192, 3),
            "pool1": nn.MaxPool2d(3, stride=2),
            "mixed": BlockA(192, 32), "mixed_1": BlockA(256, 64), "mixed_2": BlockA(288, 64), "mixed_3": BlockB(288),
            "mixed_4": BlockC(768, 128), "mixed_5": BlockC(768, 160), "mixed_6": BlockC(768, 160),
            "mixed_7": BlockC(768, 192), "mixed_8": BlockD(768), "mixed_9": BlockE(1280, max_pool=False),
            "mixed_10": BlockE(2048, max_pool=True), "pool2": nn.AvgPool2d(8)}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"Inception-v3 takes RGB images (N, 3, H, W), got {tuple(images.shape)}")
        x = tf_resize_bilinear(images.float(), SIZE)
        return self.layers((x - 128) / 128).reshape(n, FEATURES)


def tf_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as TensorFlow 1's resize_bilinear samples (align_corners off: output pixel
    i reads input position i * H / size, edges clamped): a grid shifted by half an input pixel minus half an output
    pixel from torch's align_corners=False convention."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / size], [0.0, 1.0, 1 / h - 1 / size]], device=x.device)
    grid = F.affine_grid(theta.to(x.dtype).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _ScriptObject:
    """An object of a TorchScript archive read as data: its class name and attributes (nothing of its code)."""

    def __init__(self, class_name: str):
        self.class_name, self.state = class_name, {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


def script_class(module: str, name: str):
    """The stand-in of a TorchScript archive's class ``__torch__.*`` (None for any other global: refused)."""
    if module != "__torch__" and not module.startswith("__torch__."):
        return None
    return type("ScriptObject", (_ScriptObject,), {"__new__": lambda cls: _ScriptObject(f"{module}.{name}")})


def script_tensors(root, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an object tree read from a TorchScript archive (attributes, submodules), by dotted name;
    CheckpointError where it is not a tree at most MAX_DEPTH deep."""
    out, seen, level = {}, {id(root)}, [("", root)]
    for _ in range(MAX_DEPTH):
        below = []
        for prefix, obj in level:
            for name, value in obj.state.items():
                if isinstance(value, torch.Tensor):
                    out[prefix + str(name)] = value
                elif isinstance(value, _ScriptObject):
                    if id(value) in seen:
                        raise CheckpointError(f"{source}: module {prefix}{name} appears twice (not a tree)")
                    seen.add(id(value))
                    below.append((f"{prefix}{name}.", value))
        if not below:
            return out
        level = below
    raise CheckpointError(f"{source}: modules nested more than {MAX_DEPTH} deep")


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The feature weights (our state-dict names) of an Inception file: our safetensors, or a torch file (a
    TorchScript archive or a state dict) read as data. CheckpointError / FileRefused (one line) otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, FORMAT, "Inception weights", "an emd_fast Inception weights")[1]
    data = load_torch_file(path, "Inception weights", TORCHSCRIPT_GLOBALS, script_class)
    if isinstance(data, _ScriptObject):
        tensors = script_tensors(data, str(path))
    elif isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        tensors = dict(data)
    else:
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not Inception-v3 weights (a TorchScript "
                              f"archive or a state dict)")
    return {k: v for k, v in tensors.items() if not k.startswith("output.")}  # the classifier: not a feature


def load_inception(path: str | Path, device="cpu") -> InceptionV3:
    """InceptionV3 in eval mode with the weights of ``path`` (every feature weight present, of its shape)."""
    tensors = read_inception_weights(path)
    with torch.device("meta"):
        net = InceptionV3()
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: not the weights of Inception-v3 (inception-2015-12-05): {len(missing)} "
                              f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, Inception-v3's is "
                                  f"{tuple(v.shape)}")
    net.load_state_dict({k: v.float().contiguous() for k, v in tensors.items()}, assign=True)
    return net.to(device).eval()


def convert_inception(src: str | Path, dst: str | Path) -> InceptionV3:
    """Write the Inception weights of ``src`` (any file ``load_inception`` reads) to our safetensors ``dst``."""
    net = load_inception(src)
    save_safetensors_atomic(net.state_dict(), Path(dst), {"format": FORMAT, "source": Path(src).name})
    return net
