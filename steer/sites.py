"""Where in a decoder block an SAE reads and writes: a site is `(layer, kind)`.

| kind | SAELens hook | reads | writes |
|---|---|---|---|
| `resid_post` | `blocks.L.hook_resid_post` | the block's output | the block's output |
| `attn_z` | `blocks.L.attn.hook_z` | the input of `o_proj` (heads concatenated) | the same input |
| `attn_out` | `blocks.L.hook_attn_out` | the attention branch's output | the same output |
| `mlp_out` | `blocks.L.hook_mlp_out` | the MLP branch's output | the same output |
| `transcoder` | `blocks.L.hook_mlp_in` -> `hook_mlp_out` | the MLP's input | the MLP branch's output |

"The MLP branch's output" is what the block adds to the residual: Gemma 2/3's `post_feedforward_layernorm`
output (Gemma Scope's `hf_hook_point_out`), else the `mlp` module's output. The MLP's input is the `mlp` module's
input, i.e. the pre-MLP norm's output (Gemma's `pre_feedforward_layernorm`, Llama/Qwen's
`post_attention_layernorm`, TransformerLens's `ln2.hook_normalized` / `mlp.hook_in`).

"The attention branch's output" is likewise what the block adds to the residual: Gemma 2/3's
`post_attention_layernorm` output (a norm after attention, told apart by the block also having a
`pre_feedforward_layernorm`; Llama/Qwen's `post_attention_layernorm` is the pre-MLP norm), else `o_proj`'s output.

A site needs one or two hook points `(layer, point)`: where the encoder reads and where the edit is written.
The site is derived from an SAE's metadata (its hook), never stored in a spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from steer.errors import ConfigError

SITE_KINDS = ("resid_post", "attn_z", "attn_out", "mlp_out", "transcoder")
# hook point -> (submodules of a decoder block to try, in order; "" = the block itself), and which side of the
# module it is: the module's input (a forward pre-hook) or its output (a forward hook)
POINTS: dict[str, tuple[tuple[str, ...], str]] = {
    "block_out": (("",), "output"),
    "attn_in": (("self_attn.o_proj", "attn.c_proj"), "input"),
    "attn_out": (("post_attention_layernorm", "self_attn.o_proj", "attn.c_proj"), "output"),
    "mlp_in": (("mlp", "feed_forward"), "input"),
    "mlp_out": (("post_feedforward_layernorm", "mlp", "feed_forward"), "output"),
}
# a submodule that counts for a point only in blocks that also have this one: `post_attention_layernorm` follows
# attention only where a `pre_feedforward_layernorm` is the pre-MLP norm (Gemma 2/3); in Llama it is the pre-MLP norm
_ONLY_WITH = {"post_attention_layernorm": "pre_feedforward_layernorm"}
# kind -> (the point its encoder reads, the point its edit writes)
_KIND_POINTS = {
    "resid_post": ("block_out", "block_out"),
    "attn_z": ("attn_in", "attn_in"),
    "attn_out": ("attn_out", "attn_out"),
    "mlp_out": ("mlp_out", "mlp_out"),
    "transcoder": ("mlp_in", "mlp_out"),
}
STEERABLE_HOOKS = (
    "blocks.L.hook_resid_post, blocks.L.attn.hook_z (the o_proj input), blocks.L.hook_attn_out (the attention "
    "output), blocks.L.hook_mlp_out, and transcoders "
    "from blocks.L.hook_mlp_in to blocks.L.hook_mlp_out"
)

HookPoint = tuple[int, str]


@dataclass(frozen=True)
class Site:
    """A place in decoder block `layer` that an SAE of `kind` reads and writes."""

    layer: int
    kind: str = "resid_post"

    @property
    def read_point(self) -> HookPoint:
        """Where the encoder reads its input."""
        return self.layer, _KIND_POINTS[self.kind][0]

    @property
    def write_point(self) -> HookPoint:
        """Where the edit is added."""
        return self.layer, _KIND_POINTS[self.kind][1]

    def describe(self) -> str:
        return f"{self.kind} of layer {self.layer}"


class UnplaceableHook(ConfigError):
    """An SAE reads a hook the steering hooks cannot place (the embeddings, the residual before block 0...)."""


_BLOCK_HOOK = re.compile(
    r"blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|attn\.hook_z|hook_attn_out|hook_mlp_out)"
)
_TRANSCODER_IN = re.compile(r"blocks\.(\d+)\.(?:hook_mlp_in|mlp\.hook_in|ln2\.hook_normalized)")
_HF_HOOK = re.compile(
    r"(?:model\.)?layers[._](\d+)"
    r"(\.self_attn\.o_proj|\.self_attn|\.post_feedforward_layernorm|\.pre_feedforward_layernorm|\.mlp)?"
    r"(?:\.(input|output))?"
)
_HF_KINDS = {
    (None, "output"): "resid_post",
    (".self_attn.o_proj", "input"): "attn_z",
    (".self_attn.o_proj", "output"): "attn_out",
    (".self_attn", "output"): "attn_out",
    (".post_feedforward_layernorm", "output"): "mlp_out",
    (".mlp", "output"): "mlp_out",
}
_HF_TRANSCODER_IN = {(".pre_feedforward_layernorm", "output"), (".mlp", "input")}


def trained_site(metadata: dict[str, Any], transcoder: bool = False) -> tuple[str, int | None]:
    """`(kind, layer)` of the site an SAE (or `transcoder`) was trained on, from its metadata: SAELens's
    `hook_name`, else transformers' `hf_hook_name` (+ `hf_hook_side`), else `hook_layer`; the layer is None
    when nothing names one (the residual stream at the spec's layer is then assumed).

    Raises `UnplaceableHook` for a hook no site covers, with the hook in the message.
    """
    hook = metadata.get("hook_name")
    if hook:
        hook = str(hook)
        if transcoder:
            match = _TRANSCODER_IN.fullmatch(hook)
            if match:
                return "transcoder", int(match.group(1))
        else:
            match = _BLOCK_HOOK.fullmatch(hook)
            if match:
                layer, name = int(match.group(1)), match.group(2)
                if name == "hook_resid_pre":
                    if layer > 0:
                        return "resid_post", layer - 1
                else:
                    kinds = {
                        "hook_resid_post": "resid_post",
                        "attn.hook_z": "attn_z",
                        "hook_attn_out": "attn_out",
                        "hook_mlp_out": "mlp_out",
                    }
                    return kinds[name], layer
        raise _unplaceable(hook, transcoder)
    hf_hook = metadata.get("hf_hook_name")
    if hf_hook:
        match = _HF_HOOK.fullmatch(str(hf_hook))
        if match:
            layer, module = int(match.group(1)), match.group(2)
            side = (
                match.group(3)
                or metadata.get("hf_hook_side")
                or ("input" if module == ".mlp" and transcoder else "output")
            )
            if transcoder and (module, side) in _HF_TRANSCODER_IN:
                return "transcoder", layer
            if not transcoder and (module, side) in _HF_KINDS:
                return _HF_KINDS[module, side], layer
        raise _unplaceable(str(hf_hook), transcoder)
    layer = metadata.get("hook_layer")
    layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    return ("transcoder" if transcoder else "resid_post"), layer


def _unplaceable(hook: str, transcoder: bool) -> UnplaceableHook:
    what = "transcoder" if transcoder else "SAE"
    return UnplaceableHook(
        f"the {what} reads {hook}, which fast-steer cannot place a steering hook on; it steers at "
        f"{STEERABLE_HOOKS}, so this {what} can be loaded and inspected but not steered with"
    )


def point_module(block: nn.Module, point: str) -> tuple[nn.Module, str]:
    """The submodule of decoder `block` that hook point `point` hooks, and its side ("input" / "output")."""
    names, side = POINTS[point]
    for name in names:
        if name in _ONLY_WITH and _submodule(block, _ONLY_WITH[name]) is None:
            continue
        module = _submodule(block, name)
        if module is not None:
            return module, side
    raise UnplaceableHook(
        f"cannot find the {point} hook point in decoder block {type(block).__name__}: none of its submodules "
        f"{', '.join(names)} exists"
    )


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    """`block`'s submodule at dotted `name` ("" = the block itself), or None when it has none."""
    module = block
    for part in filter(None, name.split(".")):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def site_widths(block: nn.Module, site: Site, d_model: int) -> tuple[int, int]:
    """`(d_in, d_out)` an SAE at `site` must have in a model with this decoder `block` and hidden size; raises
    `UnplaceableHook` if the block lacks a module the site hooks."""
    for _, point in (site.read_point, site.write_point):
        point_module(block, point)
    if site.kind == "attn_z":
        module, _ = point_module(block, "attn_in")
        width = int(getattr(module, "in_features", None) or module.nx)  # nn.Linear, or GPT-2's Conv1D
        return width, width
    return d_model, d_model
