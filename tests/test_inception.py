"""The FID Inception from weights only: a TorchScript archive built here the way NVlabs' inception-2015-12-05.pt is
(its module tree, names and forward, random weights: the real file is never downloaded) gives the same features run
as TorchScript and read as data into our network; the converter writes safetensors that load back; files that are
not Inception weights, or that carry code, are refused in one line and nothing in them runs."""
import collections
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emd_fast.errors import CheckpointError, FileRefused
from emd_fast.evaluation.inception import InceptionV3, convert_inception, load_inception, tf_resize_bilinear


class Conv2dLayer(nn.Module):
    """NVlabs' layer: parameters weight, beta, mean, var; conv, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kh: int, kw: int, stride: int = 1, padding: list[int] = (0, 0)):
        super().__init__()
        self.stride, self.padding = stride, list(padding)
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta, self.mean, self.var = (nn.Parameter(torch.zeros(cout)) for _ in range(3))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, running_mean=self.mean, running_var=self.var, bias=self.beta, eps=1e-3))


def seq(**layers) -> nn.Sequential:
    return nn.Sequential(collections.OrderedDict(layers))


def avg():
    return nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    def __init__(self, c, t):
        super().__init__()
        self.conv = Conv2dLayer(c, 64, 1, 1)
        self.tower = seq(conv=Conv2dLayer(c, 48, 1, 1), conv_1=Conv2dLayer(48, 64, 5, 5, padding=[2, 2]))
        self.tower_1 = seq(conv=Conv2dLayer(c, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=[1, 1]),
                           conv_2=Conv2dLayer(96, 96, 3, 3, padding=[1, 1]))
        self.tower_2 = seq(pool=avg(), conv=Conv2dLayer(c, t, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class MixedB(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2dLayer(c, 384, 3, 3, stride=2)
        self.tower = seq(conv=Conv2dLayer(c, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=[1, 1]),
                         conv_2=Conv2dLayer(96, 96, 3, 3, stride=2))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class MixedC(nn.Module):
    def __init__(self, c, t):
        super().__init__()
        self.conv = Conv2dLayer(c, 192, 1, 1)
        self.tower = seq(conv=Conv2dLayer(c, t, 1, 1), conv_1=Conv2dLayer(t, t, 1, 7, padding=[0, 3]),
                         conv_2=Conv2dLayer(t, 192, 7, 1, padding=[3, 0]))
        self.tower_1 = seq(conv=Conv2dLayer(c, t, 1, 1), conv_1=Conv2dLayer(t, t, 7, 1, padding=[3, 0]),
                           conv_2=Conv2dLayer(t, t, 1, 7, padding=[0, 3]),
                           conv_3=Conv2dLayer(t, t, 7, 1, padding=[3, 0]),
                           conv_4=Conv2dLayer(t, 192, 1, 7, padding=[0, 3]))
        self.tower_2 = seq(pool=avg(), conv=Conv2dLayer(c, 192, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class MixedD(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tower = seq(conv=Conv2dLayer(c, 192, 1, 1), conv_1=Conv2dLayer(192, 320, 3, 3, stride=2))
        self.tower_1 = seq(conv=Conv2dLayer(c, 192, 1, 1), conv_1=Conv2dLayer(192, 192, 1, 7, padding=[0, 3]),
                           conv_2=Conv2dLayer(192, 192, 7, 1, padding=[3, 0]),
                           conv_3=Conv2dLayer(192, 192, 3, 3, stride=2))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class MixedE(nn.Module):
    def __init__(self, c, use_avg_pool: bool):
        super().__init__()
        self.conv = Conv2dLayer(c, 320, 1, 1)
        self.tower_conv = Conv2dLayer(c, 384, 1, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_1_conv = Conv2dLayer(c, 448, 1, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 3, padding=[1, 1])
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_2_pool = avg() if use_avg_pool else nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.tower_2_conv = Conv2dLayer(c, 192, 1, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


class NVlabsInception(nn.Module):
    """The published structure of inception-2015-12-05.pt, its forward(img, return_features) included."""

    def __init__(self):
        super().__init__()
        self.layers = seq(conv=Conv2dLayer(3, 32, 3, 3, stride=2), conv_1=Conv2dLayer(32, 32, 3, 3),
                          conv_2=Conv2dLayer(32, 64, 3, 3, padding=[1, 1]), pool0=nn.MaxPool2d(3, 2),
                          conv_3=Conv2dLayer(64, 80, 1, 1), conv_4=Conv2dLayer(80, 192, 3, 3), pool1=nn.MaxPool2d(3, 2),
                          mixed=MixedA(192, 32), mixed_1=MixedA(256, 64), mixed_2=MixedA(288, 64), mixed_3=MixedB(288),
                          mixed_4=MixedC(768, 128), mixed_5=MixedC(768, 160), mixed_6=MixedC(768, 160),
                          mixed_7=MixedC(768, 192), mixed_8=MixedD(768), mixed_9=MixedE(1280, True),
                          mixed_10=MixedE(2048, False), pool2=nn.AvgPool2d(8))
        self.output = nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False):
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x -= 128
        x /= 128
        features = self.layers(x).reshape(-1, 2048)
        if return_features:
            return features
        return F.softmax(self.output(features), dim=1)


@pytest.fixture(scope="module")
def torchscript_inception(tmp_path_factory):
    """NVlabs-style TorchScript archive with random weights: convolutions N(0, 2/fan_in), batch-norm statistics that
    keep activations O(1)."""
    torch.manual_seed(0)
    net = NVlabsInception().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.normal_(0, math.sqrt(2 / p[0].numel()))
            elif name.endswith("var"):
                p.uniform_(0.5, 2.0)
            elif name.endswith(("mean", "beta")):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(net).save(str(path))
    return path


def test_our_network_computes_the_torchscript_features(torchscript_inception, tmp_path):
    """Read as data (no TorchScript runs), the weights give the features the archive computes when run (images of
    another size: resized like TensorFlow); converted to safetensors they load back unchanged. (One image: a
    full Inception-v3 forward is slow on a CPU.)"""
    ours = load_inception(torchscript_inception)
    converted = tmp_path / "inception.safetensors"
    convert_inception(torchscript_inception, converted)
    assert all(torch.equal(v, load_inception(converted).state_dict()[k]) for k, v in ours.state_dict().items())
    x = torch.randint(0, 256, (1, 3, 37, 53), dtype=torch.uint8)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # no profiling runs: the graph as written
        want = torch.jit.load(str(torchscript_inception)).eval()(x, return_features=True)
        got = ours(x)
    assert got.shape == (1, 2048) and want.abs().mean() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tf_resize_is_identity_at_299_and_averages_like_tensorflow():
    x = torch.rand(1, 3, 299, 299)
    assert torch.allclose(tf_resize_bilinear(x, 299), x, atol=1e-4)
    # TensorFlow 1 (align_corners off) samples output pixel i at input i * H / size: 2 -> 4 repeats each pixel
    # and interpolates halfway only between the pairs
    small = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = tf_resize_bilinear(small, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))


def test_files_that_are_not_inception_weights_are_refused_in_one_line(torchscript_inception, tmp_path):
    torch.save({"layers.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with torch.device("meta"):
        names = list(InceptionV3().state_dict())
    torch.save({k: torch.zeros(1) for k in names}, tmp_path / "shape.pth")
    (tmp_path / "text.pt").write_text("not weights")
    torch.save({"layers.conv.weight": torch.zeros(1000)}, tmp_path / "stored.pt")
    with zipfile.ZipFile(tmp_path / "stored.pt") as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as dst:
        for info in src.infolist():  # its storage compressed: a record of a size the file does not hold
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    for name, message in (("partial.pth", "not the weights of Inception-v3"), ("shape.pth", r"has shape \(1,\)"),
                          ("text.pt", "is not a readable torch file"), ("deflated.pt", "compressed"),
                          ("absent.pt", "no such file")):
        with pytest.raises((CheckpointError, FileRefused), match=message) as e:
            load_inception(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
