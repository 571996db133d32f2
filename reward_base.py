"""
The reward interface every scorer implements, and the small helpers they share.

    reward(images (B,3,H,W) float in [0,1], prompts list of B str) -> (scores (B,) float32, info dict)

Scorers (rewards.py's model and JPEG rewards, rewards_http.py's network rewards) import only this file; the
registry in rewards.py imports the scorers, never the other way round.
"""
import abc
import threading

import numpy as np
import torch


# CLIP's image normalisation (OpenAI), shared by every CLIP- and BLIP-based scorer
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

class RewardWarning(RuntimeWarning):
    """A reward could not score some images (they get a neutral or NaN reward); training goes on."""


# -----------------------------------------------------------------------------
# small shared helpers

def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0,1] images to the 256 levels a saved PNG has (DDPO: (x*255).round().clamp(0,255))."""
    return images.float().mul(255).round_().clamp_(0, 255).div_(255)  # in place on the one new tensor


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) [0,1] -> (B,H,W,3) uint8 numpy on the host (one small transfer)."""
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def prompt_groups(prompts: list[str]) -> dict[str, list[int]]:
    """Indices of the images of each distinct prompt, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return groups


def finite_mask(scores: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where the reward is a usable number."""
    return torch.isfinite(scores)


def drop_nonfinite(scores: torch.Tensor, name: str = "reward") -> tuple[torch.Tensor, str | None]:
    """(mask, message): mask keeps finite rewards; message is a one-line warning when something was dropped."""
    mask = finite_mask(scores)
    bad = (~mask).nonzero().flatten().tolist()
    if not bad:
        return mask, None
    which = f"all {len(mask)} images have" if len(bad) == len(mask) else \
        f"{len(bad)} of {len(mask)} images (indices {bad}) have"
    return mask, f"{name}: {which} a non-finite reward; they are dropped from this update"


# -----------------------------------------------------------------------------
# the interface

class Reward(abc.ABC):
    """reward(images (B,3,H,W) [0,1], prompts list[str]) -> (scores (B,) float32 on images.device, info dict)."""
    name: str = ""
    async_ok: bool = False

    def __init__(self):
        self._lock = threading.Lock()  # one call at a time, so a background thread can never race the caller

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"rewards.py: {self.name} wants images as a float tensor (B,3,H,W) in [0,1], got {got}")
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(images) or len(images) == 0:
            got = f"a {type(prompts).__name__}"
            if isinstance(prompts, (list, tuple)):
                got += f" of length {len(prompts)}"
            raise ValueError(f"rewards.py: {self.name} wants one prompt per image (a non-empty list of "
                             f"{len(images)} strings), got {got}")
        with self._lock, torch.no_grad():
            scores, info = self.score(images, list(prompts))
        return scores.to(device=images.device, dtype=torch.float32), info

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """Subclasses compute the (B,) scores here (already under no_grad and the call lock)."""
