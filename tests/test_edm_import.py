"""EDM checkpoint import: key mapping round trip, conversion from a pickle, loading, and loud errors."""
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emd_fast.checkpoint import CheckpointError
from emd_fast.edm_import import (RESAMPLE_FILTER, convert_edm_pickle, edm_state_dict_from_ours,
                                 edm_state_dict_to_ours, load_unet, main, save_unet)
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.unet import UNET_CONFIGS, UNetDenoiser

from test_unet import inputs, random_unet


class EDMPrecond(torch.nn.Module):
    """Stand-in for EDM's pickled EDMPrecond: its attributes and a state dict in EDM's naming."""

    def __init__(self, net):
        super().__init__()
        self.img_resolution, self.img_channels = net.img_resolution, net.img_channels
        self.label_dim, self.sigma_data = net.label_dim, net.sigma_data
        self.sd = edm_state_dict_from_ours(net)

    def state_dict(self):
        return self.sd


@pytest.fixture(scope="module")
def net():
    return random_unet()


def test_edm_key_names(net):
    sd = edm_state_dict_from_ours(net)
    for key in ("model.map_layer0.weight", "model.map_layer1.bias", "model.map_label.weight",
                "model.enc.8x8_conv.weight", "model.enc.8x8_block0.norm0.weight", "model.enc.4x4_down.affine.weight",
                "model.enc.4x4_down.conv0.resample_filter", "model.enc.4x4_down.skip.resample_filter",
                "model.enc.4x4_block0.skip.weight", "model.dec.4x4_in0.qkv.weight", "model.dec.4x4_in1.conv1.bias",
                "model.dec.8x8_up.skip.resample_filter", "model.dec.8x8_block1.norm1.weight",
                "model.out_norm.weight", "model.out_conv.weight"):
        assert key in sd, key
    assert sd["model.map_label.weight"].shape == (128, 10)  # Linear(label_dim -> emb, bias=False) on one-hots
    assert set(edm_state_dict_to_ours(sd, "tiny")) == set(net.state_dict())


def test_imagenet64_key_count():
    """ADM ImageNet-64: our parameters plus conv0/skip resample filters of 3 down and 3 up blocks."""
    with torch.device("meta"):
        net = UNetDenoiser(schedule=EDMSchedule(), **UNET_CONFIGS["edm-imagenet64-adm"])
    sd = edm_state_dict_from_ours(net)
    assert len(sd) == len(net.state_dict()) + 12
    assert "model.enc.64x64_conv.weight" in sd and "model.dec.8x8_in0.qkv.weight" in sd
    assert "model.enc.32x32_down.skip.resample_filter" in sd and "model.dec.64x64_up.conv0.resample_filter" in sd


def test_convert_pickle_and_load_give_the_same_network(net, tmp_path):
    pkl, out = tmp_path / "net.pkl", tmp_path / "net.safetensors"
    pkl.write_bytes(pickle.dumps({"ema": EDMPrecond(net)}))
    convert_edm_pickle(pkl, out, config="tiny")
    loaded = load_unet(out)
    assert loaded.arch == net.arch and loaded.schedule.config() == EDMSchedule().config()
    args = inputs(5)
    assert torch.equal(loaded(*args), net(*args))


def test_save_and_load_keep_the_schedule(tmp_path):
    net = random_unet(VPCosine(t_min=0.01))
    save_unet(net, tmp_path / "u.safetensors", "tiny")
    loaded = load_unet(tmp_path / "u.safetensors")
    assert loaded.schedule.config() == net.schedule.config()
    x_t, _, y = inputs(3)
    t = torch.tensor([0.2, 0.5, 0.8])
    assert torch.equal(loaded(x_t, t, y), net(x_t, t, y))


def test_map_augment_is_ignored(net):
    sd = edm_state_dict_from_ours(net) | {"model.map_augment.weight": torch.zeros(32, 9)}
    assert set(edm_state_dict_to_ours(sd, "tiny")) == set(net.state_dict())


@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.pop("model.dec.4x4_in0.qkv.weight"), "1 missing ['model.dec.4x4_in0.qkv.weight']"),
    (lambda sd: sd.update({"model.enc.8x8_extra.weight": torch.zeros(1)}),
     "1 unexpected ['model.enc.8x8_extra.weight']"),
    (lambda sd: sd.update({"model.out_conv.weight": torch.zeros(3, 32, 3, 3)}),
     "model.out_conv.weight has shape (3, 32, 3, 3), the architecture expects (1, 32, 3, 3)"),
    (lambda sd: sd.update({"model.dec.8x8_up.conv0.resample_filter": RESAMPLE_FILTER + 1}),
     "model.dec.8x8_up.conv0.resample_filter is not the [1,1] resampling filter"),
])
def test_edm_state_dict_errors(net, change, match):
    sd = edm_state_dict_from_ours(net)
    change(sd)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        edm_state_dict_to_ours(sd, "tiny")


def test_load_errors(net, tmp_path):
    good = tmp_path / "good.safetensors"
    save_unet(net, good, "tiny")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("truncated", "garbage", "absent"):
        with pytest.raises(CheckpointError, match=f"cannot read U-Net file .*{name}"):
            load_unet(tmp_path / f"{name}.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not an emd_fast U-Net file"):
        load_unet(tmp_path / "foreign.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "out_norm.bias"}
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape("1 missing ['out_norm.bias']")):
        load_unet(tmp_path / "missing.safetensors")


def test_convert_errors(net, tmp_path, capsys):
    pkl = tmp_path / "needs_edm.pkl"
    pkl.write_bytes(b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n.")  # what EDM's pickles refer to
    with pytest.raises(RuntimeError, match="needs NVlabs/EDM's code importable"):
        convert_edm_pickle(pkl, tmp_path / "o.safetensors", "tiny")
    with pytest.raises(SystemExit) as e:
        main([str(pkl), str(tmp_path / "o.safetensors"), "--config", "tiny"])
    assert e.value.code == 2 and "needs NVlabs/EDM's code" in capsys.readouterr().err
    pkl.write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match="is not a readable pickle"):
        convert_edm_pickle(pkl, tmp_path / "o.safetensors", "tiny")
    pkl.write_bytes(pickle.dumps({"ema": net}))
    with pytest.raises(ValueError, match="expected an EDMPrecond network under 'ema', got UNetDenoiser"):
        convert_edm_pickle(pkl, tmp_path / "o.safetensors", "tiny")
    pkl.write_bytes(pickle.dumps({"ema": EDMPrecond(net)}))
    with pytest.raises(ValueError, match="img_resolution=8 but config 'edm-imagenet64-adm' has 64"):
        convert_edm_pickle(pkl, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
