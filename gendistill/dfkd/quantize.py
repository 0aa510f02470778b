"""Quantization-aware students: conv and linear weights fake-quantized to a few bits in forward (FAQD's setting,
Li et al., "Feature Affinity Assisted Knowledge Distillation and Quantization of Deep Neural Networks on Label-Free
Data", IEEE Access 2023).

The trained parameters stay the float weights ``W``; each forward uses their quantized values ``Q(W)`` and the
backward passes the gradient with respect to ``Q(W)`` on to ``W`` unchanged (the straight-through estimator), as
quantization-aware training does. ``Q`` works per output channel c (dim 0 of a conv weight (C_out, C_in/groups,
kh, kw) or of a linear weight (out, in)), with an integer code per weight and one float scale per channel:

- 1 bit: ``Q(W)_c = s_c * sign(W_c)`` with ``s_c = mean |W_c|`` and sign(0) = +1 (codes -1, +1), the binary
  weights of BinaryConnect/XNOR-Net that FAQD's reference code uses (there with one scale per layer);
- b = 2, 4, 8 bits: symmetric uniform levels ``Q(W)_c = s_c * clamp(round(W_c / s_c), -m, m)`` with
  ``m = 2^(b-1) - 1`` and ``s_c = max |W_c| / m`` (codes -m..m: 2^b - 1 levels, ternary at 2 bits). FAQD's
  reference code has the same level sets at 2 bits (ternary) and 4 bits (15 levels) but one scale per layer, fitted
  by a threshold (2 bits) or least squares (4 bits); the max-abs scale here needs no fitting and never clips.

By default the first conv (which sees the raw pixels) and the last linear layer (which makes the logits) stay full
precision, the usual practice in the quantization literature; biases and BatchNorm layers always do. The bit width
and the skip are part of the classifier's ``config.json`` (``quant_bits``, ``quant_skip_first_last``), so
``save_classifier`` / ``load_classifier`` round-trip a quantized student.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .models import QUANT_BITS, Classifier


def _codes_and_scales(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes (int8, the shape of ``weight`` (C_out, ...)) and per-output-channel scales (float32,
    (C_out,)) of ``weight`` at ``bits`` bits; the quantized weight is ``codes * scales`` broadcast over dim 0."""
    flat = weight.detach().float().flatten(1)  # (C_out, fan_in)
    if bits == 1:
        scales = flat.abs().mean(dim=1)
        codes = torch.where(flat >= 0, 1, -1)
    else:
        top = 2 ** (bits - 1) - 1
        scales = flat.abs().amax(dim=1) / top
        # An all-zero channel has scale 0 and codes 0.
        codes = torch.round(flat / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-top, top)
    return codes.to(torch.int8).view(weight.shape), scales


def _dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes`` (C_out, ...) times the per-channel ``scales`` (C_out,), in float32."""
    return codes.float() * scales.view(-1, *[1] * (codes.dim() - 1))


class _FakeQuantize(torch.autograd.Function):
    """Forward: the quantized weight ``codes * scales`` (the dtype of the weight); backward: the incoming gradient,
    unchanged (straight-through), so the float weight receives the gradient with respect to the quantized one."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:
        return _dequantize(*_codes_and_scales(weight, bits)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _QuantConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose forward convolves with its weight fake-quantized to ``bits`` bits."""

    bits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        return self._conv_forward(x, _FakeQuantize.apply(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


class _QuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses its weight fake-quantized to ``bits`` bits."""

    bits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, _FakeQuantize.apply(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


_CONVS, _LINEARS = (nn.Conv2d, _QuantConv2d), (nn.Linear, _QuantLinear)


def _converted(module: nn.Module, bits: int | None) -> nn.Module:
    """A conv/linear layer of the same shape as ``module`` holding the same parameter objects: fake-quantizing to
    ``bits`` bits, or plain ``nn.Conv2d``/``nn.Linear`` when ``bits`` is None. Built on the meta device, so nothing
    is initialized or drawn from the RNG."""
    bias = module.bias is not None
    if type(module) in _CONVS:
        cls = nn.Conv2d if bits is None else _QuantConv2d
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
            padding_mode=module.padding_mode,
            device="meta",
        )
    else:
        cls = nn.Linear if bits is None else _QuantLinear
        new = cls(module.in_features, module.out_features, bias=bias, device="meta")
    new.weight = module.weight
    if bias:
        new.bias = module.bias
    if bits is not None:
        new.bits = bits
    return new.train(module.training)


def _quantize_layers(net: nn.Module, bits: int, *, skip_first_last: bool) -> nn.Module:
    """``net`` with every ``nn.Conv2d`` and ``nn.Linear`` (exactly those types, in module order) replaced in place by
    one that fake-quantizes its weight to ``bits`` bits, except the first conv and the last linear layer when
    ``skip_first_last``. The replacements keep the module names and the parameter objects (the state dict is
    unchanged); hooks registered on the replaced modules do not carry over. Layers already quantized are set to the
    requested bit width (or back to full precision when skipped). Returns the net (a new object only when ``net``
    itself is such a layer)."""
    layers = [(name, m) for name, m in net.named_modules() if type(m) in _CONVS + _LINEARS]
    skipped = set()
    if skip_first_last:
        convs = [name for name, m in layers if type(m) in _CONVS]
        linears = [name for name, m in layers if type(m) in _LINEARS]
        skipped = set(convs[:1] + linears[-1:])
    if len(layers) == len(skipped):
        found = ", ".join(name or "(the net itself)" for name, _ in layers) or "none"
        kept = "; the first conv and the last linear layer stay full precision" if skip_first_last else ""
        raise UsageError(
            f"{type(net).__name__} has no nn.Conv2d or nn.Linear layer to quantize (found: {found}{kept})"
        )
    for name, module in layers:
        replacement = _converted(module, None if name in skipped else bits)
        if not name:
            return replacement
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, replacement)
    return net


def quantize_classifier(model: Classifier, bits: int, *, skip_first_last: bool = True) -> Classifier:
    """A quantization-aware copy of ``model``: the same float weights, with every ``nn.Conv2d`` and ``nn.Linear``
    layer fake-quantizing its weight to ``bits`` bits (1, 2, 4 or 8; see the module docstring for the quantizer) in
    forward, with the straight-through gradient to the float weight. With ``skip_first_last`` (the default, the usual
    practice) the first conv and the last linear layer stay full precision. ``model`` is not changed; the copy is
    on its device and in its train/eval mode, with the same ``feature_layer`` and module names, and its config
    records ``quant_bits`` and ``quant_skip_first_last`` (saved in ``config.json``). A quantized ``model`` is
    re-quantized from its float weights. Images (B, C, H, W) in [0, 1] -> logits (B, K), as ``model``."""
    if not isinstance(model, Classifier):
        raise UsageError(f"quantize_classifier takes a Classifier, got {type(model).__name__}")
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise UsageError(f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    if not isinstance(skip_first_last, bool):
        raise UsageError(f"skip_first_last must be True or False, got {skip_first_last!r}")
    config = dataclasses.replace(model.config, quant_bits=bits, quant_skip_first_last=skip_first_last)
    quantized = Classifier(copy.deepcopy(model.net), config, feature_layer=model.feature_layer)
    quantized.mean, quantized.std = model.mean, model.std  # on the model's device
    return quantized.train(model.training)


@torch.no_grad()
def quantized_weight_codes(model: Classifier) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What integer hardware would store for a quantized classifier's quantized layers: module name (as in
    ``model.named_modules()``, e.g. ``"net.conv2"``) -> ``(codes, scales)``, with ``codes`` int8 of the weight's
    shape (C_out, ...) (in {-1, +1} at 1 bit, in [-(2^(b-1) - 1), 2^(b-1) - 1] at b bits) and ``scales`` float32
    (C_out,), on the weight's device. ``codes * scales`` (broadcast over dim 0, in float32) is exactly the weight
    the layer's forward uses. Layers kept full precision (the first conv and last linear with skip_first_last),
    biases and BatchNorm are not included."""
    if not isinstance(model, Classifier):
        raise UsageError(f"quantized_weight_codes takes a Classifier, got {type(model).__name__}")
    if model.config.quant_bits is None:
        raise UsageError("this classifier is full precision (quant_bits is None); quantize_classifier it first")
    return {
        name: _codes_and_scales(module.weight, module.bits)
        for name, module in model.named_modules()
        if isinstance(module, (_QuantConv2d, _QuantLinear))
    }
