"""peft's LoRA for EDM2's magnitude-preserving layers (``edm2.MPConv``), a custom layer type registered with peft's
``LoraConfig._register_custom_module({MPConv: MPConvLora})`` (``nets.lora.lora_config``). Imports peft: only
``nets.lora`` imports this module, once ``--lora`` is asked for.

What the adapter changes: the stored weight, before the layer normalises it,
    applied weight = gain * n(W + s B A) / sqrt(fan_in)        (s = alpha / rank, n as in ``edm2``)
so a LoRA run trains a low-rank update of the very parameter that the full-copy path trains (its W), and merging is
peft's W <- W + s B A: the merged MPConv computes the adapted layer (the same fp32 sum), which ``nets.lora.merged_copy``
and the export rely on. An update added to the layer's output instead (s B A x beside gain n(W) x / sqrt(fan_in))
cannot be merged into an MPConv: n makes every row of the applied weight shorter than sqrt(fan_in) / gain, and such
a sum leaves that set. The update's effect is relative to W's rows, which are unit rms in EDM2's pickles (EDM2 forces
them to n(W) while training).
Factors: peft's own shapes, so a LoRA file of them reads as peft's: kernel () -> A nn.Linear(in, r), B
nn.Linear(r, out); kernel (k, k) -> A nn.Conv2d(in, r, k), B 1x1 nn.Conv2d(r, out); B A has W's shape. peft's
initialisation (A Kaiming-uniform, B = 0), so at step 0 W + s B A is W bit for bit and the LoRA tree computes
exactly what the full-copy path does. The applied weight is also what ``effective_weight`` gives, which EDM2Denoiser
reads for its label embedding: an adapter there takes part as well. There is no adapter input, so --lora-dropout
(dropout on that input) is refused.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .edm2 import MPConv, mp_weight


class MPConvLora(nn.Module, LoraLayer):
    """An MPConv with peft LoRA adapters on its stored weight (module doc); called as the MPConv: (x, gain)."""

    def __init__(self, base_layer: MPConv, adapter_name: str, config, r: int = 0, lora_alpha: float = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: MPConv) -> tuple[int, int]:
        return module.weight.shape[1], module.weight.shape[0]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        """Add the adapter ``adapter_name`` of rank r, scale lora_alpha / r (peft's contract)."""
        if config.lora_dropout:
            raise ValueError("--lora-dropout: EDM2's adapters change the weight of a layer, no input goes through "
                             "them to drop; leave it out")
        if config.use_dora or config.use_rslora or config.lora_bias or config.init_lora_weights is not True:
            raise ValueError("EDM2's LoRA layers take plain LoRA only (no DoRA, rsLoRA, bias or other init)")
        kernel = tuple(self.get_base_layer().weight.shape[2:])
        if kernel:
            a, b = nn.Conv2d(self.in_features, r, kernel, bias=False), nn.Conv2d(r, self.out_features, 1, bias=False)
        else:
            a, b = nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=False)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.lora_dropout[adapter_name] = nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_bias[adapter_name] = self.use_rslora[adapter_name] = self.use_dora[adapter_name] = False
        self.reset_lora_parameters(adapter_name, True)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s B A in W's shape (out, in, *kernel), the adapters' dtype: B applied to A's rows (the probe
        ``nets.lora.check_adapters_run`` sees B run)."""
        a = self.lora_A[adapter].weight
        return self.lora_B[adapter](a.transpose(0, 1)).transpose(0, 1) * self.scaling[adapter]

    def adapted_weight(self) -> torch.Tensor:
        """W + the active adapters' s B A, fp32 (W itself while adapters are off or merged)."""
        w = self.get_base_layer().weight
        if self.disable_adapters or self.merged:
            return w
        w = w.float()
        for name in self.active_adapters:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).float()
        return w

    def effective_weight(self, gain=1.0) -> torch.Tensor:
        """The weight the layer applies, fp32."""
        return mp_weight(self.adapted_weight(), gain)

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        return MPConv.apply_weight(x, self.effective_weight(gain))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W <- W + s B A for each adapter (peft's contract), summed in fp32 as the forward sums it."""
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            merged = weight.float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging the LoRA adapter {name} gives non-finite weights")
            weight.data = merged.to(weight.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = (weight.float() - self.get_delta_weight(name).float()).to(weight.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
