"""
What every script shares at its command line: one argparse style (defaults shown, one-line errors), one name for
each dtype, and one prompt reader, so `--prompts NAME` means the same in train.py, sample.py and the rest.

    --prompts simple_animals      a built-in set (ddpo-pytorch's 45 animals; the shapes world's sets; ImageNet's)
    --prompts my_prompts.txt      a text file: one prompt per line, blank lines and `#` comments skipped
"""
from __future__ import annotations

import argparse
import os
import textwrap

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# the 45 prompts of ddpo-pytorch's simple_animals.txt (its aesthetic-score experiment)
SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]
SHAPES_SETS = ("shapes", "shapes-hard", "shapes-train", "shapes-heldout")   # shapes.prompt_sets()
PROMPT_SETS = ("simple_animals", "imagenet_animals", *SHAPES_SETS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each default as "(default: X)" where there is one (None/False/empty ones are described in the
    text) and keeps the line breaks of descriptions and epilogs (the reward table)."""

    def _split_lines(self, text, width):   # never break inside a hyphenated word (hub ids, flag names)
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default in ([], "")  # 0 is a default
        return action.help if unset or "%(default)" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's help style and a one-line error (argparse prints the whole usage block first)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        if kw.get("description"):   # kept verbatim (the raw formatter), so lines over 100 columns are wrapped here
            kw["description"] = "\n".join(textwrap.fill(line, 100) for line in kw["description"].split("\n"))
        super().__init__(*a, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str):
    """The one-line exit every script uses for bad input found after parsing."""
    raise SystemExit(f"{prog}: error: {message}")


def load_prompts(spec: str) -> list[str]:
    """A built-in prompt set (PROMPT_SETS) or a text file with one prompt per line ('#' lines and blanks skipped)."""
    if spec == "simple_animals":
        return list(SIMPLE_ANIMALS)
    if spec in SHAPES_SETS:
        import shapes
        return shapes.prompt_sets()[spec]
    if spec == "imagenet_animals":
        # ImageNet-1k classes 0..397 are the animals (tench .. puffer), as in ddpo-pytorch. torchvision ships the
        # class names offline; they are its short names ("tench"), not ddpo-pytorch's raw lines ("tench, Tinca tinca").
        from torchvision.models import ResNet50_Weights
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"][:398])
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"prompts: '{spec}' is neither a built-in set ({', '.join(PROMPT_SETS)}) nor a file; "
                                "pass one of those or a text file with one prompt per line")
    with open(spec, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"prompts: file {spec} has no prompts; write one prompt per line ('#' lines are skipped)")
    return lines

