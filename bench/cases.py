"""Parameter shape sets of real models, derived from their architectures.

Only shapes are needed: an optimizer step is elementwise, so its cost depends on
how many tensors there are and how large each is, never on what they compute.
Each set is built from the model's configuration, so the counts below are
checked against the published figures rather than copied from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    shapes: tuple[Shape, ...]
    # (tensors, parameters) at scale 1; None when the case was scaled down.
    expected: tuple[int, int] | None

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def check(self) -> None:
        """Raise if a full-size case does not have the published tensor and parameter counts."""
        if self.expected is None:
            return
        got = (self.num_tensors, self.num_params)
        if got != self.expected:
            raise AssertionError(
                f"{self.name}: derived {got[0]} tensors / {got[1]} params, "
                f"expected {self.expected[0]} / {self.expected[1]}"
            )


def _count(n: int, scale: float) -> int:
    """Scale a repeat count (layers, blocks, tensors), keeping at least one."""
    return max(1, round(n * scale))


def gpt2_small(scale: float = 1.0) -> Case:
    """GPT-2 small (HF GPT2LMHeadModel, lm_head tied to wte): 124,439,808 params."""
    vocab, ctx, d, layers = 50257, 1024, 768, _count(12, scale)
    shapes: list[Shape] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn (Conv1D stores (in, out))
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return Case("gpt2", "GPT-2 small", tuple(shapes), (148, 124_439_808) if scale == 1 else None)


def resnet50(scale: float = 1.0) -> Case:
    """ResNet-50 v1.5 (torchvision order): bottleneck blocks [3, 4, 6, 3], 25,557,032 params."""
    shapes: list[Shape] = []

    def conv(cin: int, cout: int, k: int) -> None:
        shapes.append((cout, cin, k, k))  # convs have no bias: a batch norm follows

    def bn(c: int) -> None:
        shapes.extend([(c,), (c,)])  # weight, bias (running stats are buffers)

    conv(3, 64, 7)
    bn(64)
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        cout = 4 * width  # bottleneck expansion
        for b in range(_count(blocks, scale)):
            conv(cin, width, 1)
            bn(width)
            conv(width, width, 3)
            bn(width)
            conv(width, cout, 1)
            bn(cout)
            if b == 0:
                # projection shortcut: the channel count (and from layer2 the stride) changes
                conv(cin, cout, 1)
                bn(cout)
            cin = cout
    shapes += [(1000, 2048), (1000,)]  # fc
    return Case("resnet50", "ResNet-50", tuple(shapes), (161, 25_557_032) if scale == 1 else None)


def llama7b_lora(scale: float = 1.0, rank: int = 16) -> Case:
    """LoRA adapters (PEFT layout) of rank 16 on every linear layer of LLaMA-7B's 32 blocks."""
    d, ffn = 4096, 11008
    linears = [(d, d)] * 4 + [(d, ffn)] * 2 + [(ffn, d)]  # q, k, v, o, gate, up, down: (in, out)
    shapes: list[Shape] = []
    for _ in range(_count(32, scale)):
        for fan_in, fan_out in linears:
            shapes += [(rank, fan_in), (fan_out, rank)]  # lora_A.weight, lora_B.weight
    return Case("lora", "LLaMA-7B LoRA r=16", tuple(shapes), (448, 39_976_960) if scale == 1 else None)


def deep_mlp(scale: float = 1.0, width: int = 256) -> Case:
    """A deep narrow MLP: 200 x (Linear 256x256 with bias, LayerNorm weight and bias)."""
    shapes: list[Shape] = []
    for _ in range(_count(200, scale)):
        shapes += [(width, width), (width,), (width,), (width,)]
    return Case("mlp", "deep MLP 200x256", tuple(shapes), (800, 13_260_800) if scale == 1 else None)


def synthetic(scale: float = 1.0) -> Case:
    """10,000 tensors of 1,000 elements: the per-tensor overhead, isolated."""
    shapes: tuple[Shape, ...] = ((1000,),) * _count(10_000, scale)
    return Case("synthetic", "10,000 x 1,000", shapes, (10_000, 10_000_000) if scale == 1 else None)


BUILDERS = {
    "gpt2": gpt2_small,
    "resnet50": resnet50,
    "lora": llama7b_lora,
    "mlp": deep_mlp,
    "synthetic": synthetic,
}


def build(names: list[str], scale: float = 1.0) -> list[Case]:
    """The named cases at the given scale, each checked against its published counts."""
    cases = [BUILDERS[n](scale) for n in names]
    for c in cases:
        c.check()
    return cases
