"""
LoRA: low-rank adapters on the UNet's linear and convolution layers (Hu et al. 2021, "LoRA", eq. 3).

A frozen linear layer W (out x in) gets a trainable low-rank update:

    h = W x + b + (alpha / r) * B A x,      A: (r x in),  B: (out x r),  B = 0 at init

so the adapted model starts exactly at the base model. DDPO trains only A and B (~0.8M parameters for rank 4 on
the SD attention projections instead of ~860M). LoRALinear *is* an nn.Linear that keeps .weight/.bias, so the
base keys of the UNet state dict stay in diffusers layout; the adapter adds "<path>.lora_A.weight" and
"<path>.lora_B.weight" (PEFT/diffusers naming). The same base weights with the adapters switched off
(`disabled`) are the reference policy for a KL penalty, and folding B A into W (`merged`) gives plain-Linear
speed for rollouts. A convolution gets the same update on its kernel, W (out x in*k*k) + (alpha / r) * B A, with A a
k x k convolution to r channels and B a 1 x 1 convolution back (LoRAConv2d, PEFT's layout): on SD the attention
holds enough of the model, on a toy UNet most weights are in the ResNet convolutions.

Public API
    LoRALinear(in_features, out_features, bias=True, *, rank, alpha=None)  nn.Linear + lora_A/lora_B/scale
    LoRAConv2d(in_ch, out_ch, kernel_size, stride, padding, bias, *, rank, alpha)  the same for nn.Conv2d (PEFT's)
    add_lora(model, rank=4, alpha=None, targets=DEFAULT_TARGETS) -> list[Parameter]  adapters on matching layers
    lora_parameters(model) -> list[Parameter]       the adapter parameters (A then B, module order)
    lora_state_dict(model, prefix="unet.") -> dict  "<prefix><path>.lora_A.weight" / ".lora_B.weight"
    save_lora(path, model, metadata=None)           safetensors + {"format": "nanoddpo-lora", rank, alpha, targets}
    save_diffusers_lora(folder, model) -> path      pytorch_lora_weights.safetensors for diffusers/peft, scale in B
    load_lora(model, path, prefix="unet.") -> dict  adds adapters if missing, copies A/B, returns the metadata
    merged(model)      context manager: W <- W + scale B A for fast inference; original W restored bit-exactly
    disabled(model)    context manager: adapters off (the base / reference policy)
    merge_and_remove(model) -> model                permanent merge, LoRA layers -> plain layers (for export)
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "nanoddpo-lora"


class _LoRA:
    """What a LoRA layer adds to its base layer: rank, alpha, scale, the fp32 adapters lora_A / lora_B (built by
    the subclass), the switch for the reference policy and the slot for merged()."""

    def _init_lora(self, rank: int, alpha: float | None) -> None:
        if rank < 1:
            raise ValueError(f"lora.py: rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / self.rank
        self.lora_enabled = True
        self._unmerged_weight = None  # the original weight tensor while merged() is active

    def reset_lora_parameters(self) -> None:
        # PEFT's default: A like a fresh layer (kaiming-uniform, a=sqrt(5)), B = 0 -> identity at init
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def wrap(cls, layer: nn.Module, rank: int, alpha: float | None = None):
        """Wrap an existing layer, sharing (not copying) its weight and bias Parameters."""
        w = layer.weight
        new = cls(*cls._shape_args(layer), bias=layer.bias is not None, rank=rank, alpha=alpha, device="meta",
                  dtype=w.dtype)
        new.weight, new.bias = layer.weight, layer.bias
        new.lora_A.to_empty(device=w.device)
        new.lora_B.to_empty(device=w.device)
        new.reset_lora_parameters()
        new.train(layer.training)
        return new

    @property
    def is_merged(self) -> bool:
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, in the base weight's shape: (out, in), or (out, in, k, k) for a convolution."""
        b, a = self.lora_B.weight.float().flatten(1), self.lora_A.weight.float().flatten(1)
        return (b @ a).view(self.weight.shape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.lora_enabled and not self.is_merged:
            # the adapter path runs in the input's dtype (autocast casts it anyway); .to() keeps the fp32 grads
            out = out + self._adapter(x, self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)) * self.scale
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(_LoRA, nn.Linear):
    """nn.Linear plus a low-rank update scale * B(A(x)). A: Linear(in -> r), B: Linear(r -> out), no biases."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 alpha: float | None = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha)
        # adapters are trained in fp32 even when the frozen base weight is bf16/fp16
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @staticmethod
    def _shape_args(layer: nn.Linear) -> tuple:
        return layer.in_features, layer.out_features

    def _adapter(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def plain(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")


class LoRAConv2d(_LoRA, nn.Conv2d):
    """nn.Conv2d plus a low-rank update (PEFT's Conv2d LoRA, LoCon): A is a k x k convolution in -> r with the base
    layer's stride and padding, B a 1 x 1 convolution r -> out, so B A is a rank-r update of the (out, in*k*k)
    kernel. On a small UNet most weights sit in the ResNet convolutions, not in the attention."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True, *,
                 rank: int, alpha: float | None = None, device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=bias, device=device,
                           dtype=dtype)
        self._init_lora(rank, alpha)
        self.lora_A = nn.Conv2d(in_channels, rank, kernel_size, stride, padding, bias=False, device=device,
                                dtype=torch.float32)
        self.lora_B = nn.Conv2d(rank, out_channels, 1, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @staticmethod
    def _shape_args(layer: nn.Conv2d) -> tuple:
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError(f"lora.py: LoRA supports plain convolutions only (groups 1, dilation 1, zero padding), "
                             f"not {layer}")
        return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding

    def _adapter(self, x, a, b):
        return F.conv2d(F.conv2d(x, a, None, self.stride, self.padding), b)

    def plain(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None, device="meta")


LORA_LAYERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _lora_modules(model: nn.Module) -> list[tuple[str, _LoRA]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LoRA)]


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             targets=DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Replace every nn.Linear or nn.Conv2d whose module path ends with one of `targets` by its LoRA layer
    (sharing its weight/bias). Returns the new adapter parameters (fp32, requires_grad=True). Leaves requires_grad
    of the base weights alone: freeze them yourself (model.requires_grad_(False) before calling) for LoRA
    training."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("lora.py: add_lora got no targets; pass module-path suffixes such as ('to_q', 'to_k')")
    chosen = []
    for name, m in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(m, _LoRA):
            raise ValueError(f"lora.py: {name} already has a LoRA adapter; call add_lora once per model "
                             "(or load_lora on a model without adapters)")
        if type(m) not in LORA_LAYERS:
            raise ValueError(f"lora.py: target {name} is {type(m).__name__}; LoRA supports nn.Linear and nn.Conv2d "
                             "only: remove it from targets")
        chosen.append((name, m))
    if not chosen:
        raise ValueError(f"lora.py: no nn.Linear or nn.Conv2d in {type(model).__name__} matches targets "
                         f"{list(targets)}; targets are module-path suffixes such as 'to_q', 'ff.net.2' or 'conv1'")
    params = []
    for name, m in chosen:
        new = LORA_LAYERS[type(m)].wrap(m, rank, alpha)
        _set_submodule(model, name, new)
        params += [new.lora_A.weight, new.lora_B.weight]
    prev = getattr(model, "lora_targets", ())
    model.lora_targets = tuple(prev) + tuple(t for t in targets if t not in prev)
    return params


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All adapter parameters of the model, A then B per module, in module order."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The adapter weights with PEFT/diffusers names: "<prefix><path>.lora_A.weight" [r,in], lora_B [out,r]."""
    sd = {}
    for name, m in _lora_modules(model):
        sd[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def _lora_config(model: nn.Module) -> tuple[int, float]:
    mods = _lora_modules(model)
    if not mods:
        raise ValueError(f"lora.py: {type(model).__name__} has no LoRA adapters; call add_lora first")
    ranks = {(m.rank, m.alpha) for _, m in mods}
    if len(ranks) != 1:
        raise ValueError(f"lora.py: adapters with mixed (rank, alpha) {sorted(ranks)} cannot be saved as one file")
    return ranks.pop()


def save_lora(path, model: nn.Module, metadata: dict | None = None, prefix: str = "unet.") -> None:
    """Write the adapters to a safetensors file with metadata {"format", "rank", "alpha", "targets", ...caller's}.
    Metadata values that are not strings are stored as JSON."""
    rank, alpha = _lora_config(model)
    meta = {"format": FORMAT, "rank": str(rank), "alpha": repr(alpha),
            "targets": json.dumps(list(getattr(model, "lora_targets", [n for n, _ in _lora_modules(model)])))}
    for k, v in (metadata or {}).items():
        if k in ("format", "rank", "alpha", "targets"):
            raise ValueError(f"lora.py: save_lora metadata key '{k}' is reserved (set from the model)")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model, prefix).items()}
    save_file(tensors, str(path), metadata=meta)


DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"   # what pipe.load_lora_weights(folder) looks for


def save_diffusers_lora(folder, model: nn.Module, prefix: str = "unet.") -> Path:
    """folder/pytorch_lora_weights.safetensors in the layout diffusers' pipe.load_lora_weights(folder) and
    unet.load_lora_adapter(...) read (PEFT keys, "unet." prefix). diffusers builds its PEFT adapters with
    lora_alpha = rank, i.e. scale 1, whatever alpha we trained with; so the scale alpha / r is folded into B here
    (B' = (alpha / r) B, the same product B' A), and the file loads at exactly our strength."""
    path = Path(folder) / DIFFUSERS_LORA_NAME
    tensors = {}
    for name, m in _lora_modules(model):
        tensors[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        tensors[f"{prefix}{name}.lora_B.weight"] = (m.lora_B.weight.detach().float() * m.scale).contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_lora(model: nn.Module, path, prefix: str = "unet.") -> dict:
    """Load adapters saved by save_lora (or a PEFT/diffusers file with the same key naming) into `model`.
    Adds adapters with the stored rank/alpha/targets when the model has none. Returns the file's metadata."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"lora.py: LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    if not a_keys or any(not k.startswith(prefix) for k in tensors):
        raise ValueError(f"lora.py: {path} is not a LoRA file with keys '{prefix}<module>.lora_A.weight' / "
                         f"'.lora_B.weight' (first key: {next(iter(tensors), None)})")
    if "format" in meta and meta["format"] != FORMAT:
        raise ValueError(f"lora.py: {path} has format '{meta['format']}', expected '{FORMAT}'")
    paths = [k[len(prefix):-len(".lora_A.weight")] for k in a_keys]
    if not _lora_modules(model):
        # files without our metadata (PEFT/diffusers): rank from the shapes, alpha = rank, exact module paths
        rank = int(meta.get("rank", tensors[a_keys[0]].shape[0]))
        alpha = float(meta["alpha"]) if "alpha" in meta else None
        targets = json.loads(meta["targets"]) if "targets" in meta else paths
        add_lora(model, rank, alpha, targets)
    mods = dict(_lora_modules(model))
    missing = sorted(set(mods) - set(paths))
    unexpected = sorted(set(paths) - set(mods))
    if missing or unexpected:
        raise ValueError(f"lora.py: {path} does not match the model's adapters: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    with torch.no_grad():
        for name, m in mods.items():
            for part in ("lora_A", "lora_B"):
                t, p = tensors[f"{prefix}{name}.{part}.weight"], getattr(m, part).weight
                if t.shape != p.shape:
                    raise ValueError(f"lora.py: {prefix}{name}.{part}.weight has shape {list(t.shape)} in {path}, "
                                     f"the model expects {list(p.shape)} (different rank or base model?)")
                p.copy_(t)
    return meta


@contextmanager
def merged(model: nn.Module):
    """Fold scale * B @ A into each adapted weight (plain-Linear speed, e.g. for rollouts); on exit put the
    original weight tensors back, so the base weights are bit-exactly unchanged. Inference only: no gradients
    reach the adapters while merged."""
    mods = [m for _, m in _lora_modules(model) if m.lora_enabled and not m.is_merged]
    try:
        with torch.no_grad():
            for m in mods:
                w = m.weight.data
                m._unmerged_weight = w
                m.weight.data = (w.float() + m.delta_weight()).to(w.dtype)
        yield model
    finally:
        for m in mods:
            if m.is_merged:
                m.weight.data = m._unmerged_weight
                m._unmerged_weight = None


@contextmanager
def disabled(model: nn.Module):
    """Switch all adapters off: the model computes the base (reference) policy."""
    mods = [m for _, m in _lora_modules(model)]
    if any(m.is_merged for m in mods):
        raise RuntimeError("lora.py: disabled() inside merged(): the weights contain the adapters; "
                           "leave merged() first")
    prev = [m.lora_enabled for m in mods]
    try:
        for m in mods:
            m.lora_enabled = False
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.lora_enabled = p


def merge_and_remove(model: nn.Module) -> nn.Module:
    """Permanently fold the adapters into the weights and swap every LoRA layer back to its plain nn.Linear /
    nn.Conv2d (same weight dtype/device), so the state dict is the pure base layout again (for export)."""
    for name, m in _lora_modules(model):
        if m.is_merged:
            raise RuntimeError("lora.py: merge_and_remove() inside merged(); leave merged() first")
        layer = m.plain()
        with torch.no_grad():
            w = m.weight.detach()
            if m.lora_enabled:
                w = (w.float() + m.delta_weight()).to(w.dtype)
            layer.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
        layer.bias = m.bias
        layer.train(m.training)
        _set_submodule(model, name, layer)
    if hasattr(model, "lora_targets"):
        del model.lora_targets
    return model
