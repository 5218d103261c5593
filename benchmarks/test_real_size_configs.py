"""The real-size networks of benchmarks/real_size_configs.py build on the meta device with their published weight
counts (within 1%; all five are exact), and one forward's inputs fit them (run on the meta device: shapes only)."""
import pytest
import torch

import real_size_configs as rs

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(rs.REAL_SIZE))
def test_real_size_network_has_its_published_weight_count(name):
    with torch.device("meta"):
        net = rs.build(name)
        assert all(p.is_meta for p in net.parameters())
        count = rs.weight_count(net)
        published = rs.published_weights(name)
        assert abs(count - published) <= 0.01 * published, (count, published)
        out = net(**rs.forward_inputs(name, batch=2), return_dict=False)[0]
    latent = rs.REAL_SIZE[name].pixels // 8
    want = (2, 4096, 64) if name == "flux.1-dev" else (2, 4 if name == "sdxl" else 16, latent, latent)
    assert tuple(out.shape) == want and out.is_meta
