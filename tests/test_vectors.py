"""Activations, the harmfulness vector and its artifact (tiny random models: real code paths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import embedded_tiny_or_skip, mixed_records

from davsp_lib.method.vectors import (
    Activations,
    HarmfulnessVector,
    VectorMismatchError,
    concat_activations,
    extract,
    fit_vector,
    parse_layers,
)
from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl
from davsp_lib.models.inputs import iter_batches
from davsp_lib.runtime.errors import DataError

F64 = torch.float64


def toy_activations() -> Activations:
    """Two layers, D = 2: layer 0 identical for all, layer 5 mean difference (3, 4)."""
    states = torch.tensor(
        [
            [[1.0, 1.0], [3.0, 4.0]],  # malicious
            [[1.0, 1.0], [5.0, 8.0]],  # malicious -> mean (4, 6)
            [[1.0, 1.0], [1.0, 2.0]],  # benign
            [[1.0, 1.0], [1.0, 2.0]],  # benign -> mean (1, 2)
            [[1.0, 1.0], [1.0, 2.0]],  # benign
        ],
        dtype=F64,
    )
    return Activations(
        ids=["m1", "m2", "b1", "b2", "b3"],
        labels=np.array([True, True, False, False, False]),
        layers=[0, 5],
        states=states,
        meta={"model": {"model_id": "toy", "num_layers": 6, "hidden_size": 2}},
    )


# ------------------------------------------------------------------------------ pure parts


def test_means_and_directions_are_exact():
    vector = fit_vector(toy_activations(), metadata={"seed": 3})
    assert vector.layers == [0, 5]
    assert torch.equal(vector.mean_malicious, torch.tensor([[1.0, 1.0], [4.0, 6.0]], dtype=F64))
    assert torch.equal(vector.mean_benign, torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=F64))
    # layer 0: the means coincide -> no direction (zero), never NaN
    assert torch.equal(vector.directions, torch.tensor([[0.0, 0.0], [0.6, 0.8]], dtype=F64))
    assert vector.counts == {"malicious": 2, "benign": 3}
    meta = vector.metadata
    assert meta["seed"] == 3 and meta["model"]["model_id"] == "toy"
    assert meta["data_ids"] == {"malicious": ["m1", "m2"], "benign": ["b1", "b2", "b3"]}
    assert meta["mean_difference_norm"] == [0.0, 5.0]


def test_projection():
    acts, vector = toy_activations(), fit_vector(toy_activations())
    states = torch.tensor([[5.0, 0.0], [0.0, 10.0], [-5.0, 5.0]], dtype=F64)
    assert torch.equal(vector.project(states, 5), torch.tensor([3.0, 8.0, 1.0], dtype=F64))
    assert torch.equal(vector.project(acts, 0), torch.zeros(5, dtype=F64))
    assert vector.project(states.float(), 5).dtype == torch.float32
    grad_states = states.clone().requires_grad_(True)
    vector.project(grad_states, 5).sum().backward()
    assert torch.equal(grad_states.grad, torch.tensor([[0.6, 0.8]] * 3, dtype=F64))
    with pytest.raises(KeyError, match="no layer 3"):
        vector.project(states, 3)


def test_fit_needs_both_classes():
    acts = toy_activations().malicious
    with pytest.raises(ValueError, match="malicious and benign"):
        fit_vector(acts)


def test_select_and_concat():
    acts = toy_activations()
    assert acts.malicious.ids == ["m1", "m2"] and acts.benign.ids == ["b1", "b2", "b3"]
    both = concat_activations([acts.benign, acts.malicious])
    assert both.ids == ["b1", "b2", "b3", "m1", "m2"]
    assert torch.equal(both.at(5)[3], torch.tensor([3.0, 4.0], dtype=F64))
    with pytest.raises(ValueError, match="layers"):
        Activations(ids=["a"], labels=[True], layers=[1, 1], states=torch.zeros(1, 2, 2))


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers(" 3, 1,3 ", 4) == [1, 3]
    with pytest.raises(ValueError, match="comma list"):
        parse_layers("1;2", 4)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("5", 4)


# ------------------------------------------------------------------------------ the artifact


def test_save_load_round_trip_is_exact(tmp_path):
    vector = fit_vector(toy_activations(), metadata={"seed": 1, "note": ("a", 2)})
    tensor_path, json_path = vector.save(tmp_path / "vec")
    assert tensor_path.name == "vec.safetensors" and json_path.name == "vec.json"
    loaded = HarmfulnessVector.load(tmp_path / "vec")
    for key in ("directions", "mean_malicious", "mean_benign"):
        assert torch.equal(getattr(loaded, key), getattr(vector, key))
    assert loaded.layers == vector.layers and loaded.counts == vector.counts
    assert loaded.metadata == vector.metadata  # metadata is JSON-normalised at fit time
    # any suffix names the pair
    assert HarmfulnessVector.load(json_path).metadata["note"] == ["a", 2]
    header = json.loads(json_path.read_text())
    assert header["model_id"] == "toy" and header["hidden_size"] == 2


def test_missing_json_names_the_file(tmp_path):
    _, json_path = fit_vector(toy_activations()).save(tmp_path / "vec")
    json_path.unlink()
    with pytest.raises(DataError, match=r"vec\.json.*not found"):
        HarmfulnessVector.load(tmp_path / "vec")


def test_missing_tensors_names_the_file(tmp_path):
    tensor_path, _ = fit_vector(toy_activations()).save(tmp_path / "vec")
    tensor_path.unlink()
    with pytest.raises(DataError, match=r"vec\.safetensors.*not found"):
        HarmfulnessVector.load(tmp_path / "vec")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    tensor_path, _ = fit_vector(toy_activations()).save(tmp_path / "vec")
    data = tensor_path.read_bytes()
    tensor_path.write_bytes(b"\x00not safetensors at all" if damage == "garbage" else data[:-9])
    with pytest.raises(DataError, match=r"vec\.safetensors: not a readable safetensors"):
        HarmfulnessVector.load(tmp_path / "vec")


def test_wrong_shape_and_mismatched_pair(tmp_path):
    _, json_path = fit_vector(toy_activations()).save(tmp_path / "vec")
    header = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**header, "hidden_size": 3}))
    with pytest.raises(DataError, match=r"vec\.safetensors: tensor 'directions' .* \[2, 3\]"):
        HarmfulnessVector.load(tmp_path / "vec")
    other = toy_activations()
    other.states[0, 1, 0] = 7.0
    fit_vector(other).save(tmp_path / "other")
    (tmp_path / "vec.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    json_path.write_text(json.dumps(header))
    with pytest.raises(DataError, match="sha256 differs"):
        HarmfulnessVector.load(tmp_path / "vec")


def test_not_a_vector_json(tmp_path):
    fit_vector(toy_activations()).save(tmp_path / "vec")
    (tmp_path / "vec.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match=r"vec\.json: not a harmfulness vector"):
        HarmfulnessVector.load(tmp_path / "vec")


# ------------------------------------------------------------------------------ extraction


@pytest.fixture(scope="module")
def records():
    """Two text-only and two FigStep records of the built-in set, both labels."""
    malicious, benign, images = mixed_records(2, 2, [("malicious", 1), ("benign", 1)])
    return [malicious[0], benign[0], *images]


@pytest.mark.parametrize("builder", [build_tiny_llava, build_tiny_qwen2_vl])
def test_batched_extraction_equals_per_sample(builder, records):
    adapter = builder(seed=1)
    batched = extract(adapter, records, [1, 3], batch_size=4, progress=False)
    single = extract(adapter, records, [1, 3], batch_size=1, progress=False)
    assert batched.states.dtype == F64 and batched.states.shape == (4, 2, 64)
    assert batched.ids == [r.id for r in records]
    assert batched.labels.tolist() == [r.is_malicious for r in records]
    torch.testing.assert_close(batched.states, single.states, rtol=1e-4, atol=1e-5)


def test_extraction_matches_the_adapter_and_covers_all_layers(llava, records):
    acts = extract(llava, records, batch_size=4, blank_image=True, progress=False)
    assert acts.layers == [0, 1, 2, 3, 4]
    assert acts.meta["token_position"] == "last input token"
    assert acts.meta["model"]["model_id"] == "tiny-random-llava"
    assert acts.meta["template"]["text_only_records"] == "blank white image"
    _, images, conversations = next(iter(iter_batches(llava, records, 4, blank_image=True)))
    with torch.no_grad():
        direct = llava.hidden_states(images, conversations, acts.layers)
    assert torch.equal(acts.states, direct.to(F64))


def test_extraction_stops_after_the_deepest_layer(llava, records):
    calls = []
    handle = llava.language_layers[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        extract(llava, records, [0, 2], batch_size=2, progress=False)
        assert calls == []  # block 2 computes layer 3: never run
        extract(llava, records, [3], batch_size=4, progress=False)
        assert len(calls) == 2  # one text batch and one image batch
    finally:
        handle.remove()


def test_extraction_rejects_bad_requests(llava, records):
    with pytest.raises(ValueError, match="out of range"):
        extract(llava, records, [9], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        extract(llava, records, [1, 1], progress=False)
    with pytest.raises(ValueError, match="no records"):
        extract(llava, [], [1], progress=False)


def test_load_with_adapter_refuses_another_model(tmp_path, llava, records):
    vector = fit_vector(extract(llava, records, [1, 2], batch_size=4, progress=False))
    vector.save(tmp_path / "vec")
    assert HarmfulnessVector.load(tmp_path / "vec", adapter=llava).model_id == "tiny-random-llava"
    qwen = build_tiny_qwen2_vl(seed=0)  # same hidden size (64), another model
    with pytest.raises(VectorMismatchError, match=r"'tiny-random-llava'.*'tiny-random-qwen2-vl'"):
        HarmfulnessVector.load(tmp_path / "vec", adapter=qwen)
    narrow = HarmfulnessVector(
        layers=[1],
        directions=torch.zeros(1, 32, dtype=F64),
        mean_malicious=torch.zeros(1, 32, dtype=F64),
        mean_benign=torch.zeros(1, 32, dtype=F64),
        counts={"malicious": 1, "benign": 1},
        metadata={"model": {"model_id": "tiny-random-llava"}},
    )
    narrow.save(tmp_path / "narrow")
    with pytest.raises(VectorMismatchError, match=r"hidden size 32.*hidden size 64"):
        HarmfulnessVector.load(tmp_path / "narrow", adapter=llava)
    deep = fit_vector(toy_activations())
    deep.metadata["model"]["model_id"] = "tiny-random-llava"
    with pytest.raises(VectorMismatchError, match="hidden size 2"):
        deep.check_compatible(llava)


def test_load_refuses_other_weights_under_the_same_id(tmp_path, records):
    adapter = build_tiny_llava(seed=0)
    adapter.model.config._commit_hash = "aaaa"
    fit_vector(extract(adapter, records, [1], batch_size=4, progress=False)).save(tmp_path / "v")
    adapter.model.config._commit_hash = "bbbb"
    with pytest.raises(VectorMismatchError, match=r"revision 'aaaa'.*'bbbb'"):
        HarmfulnessVector.load(tmp_path / "v", adapter=adapter)


# ------------------------------------------------------------------------------ embedded model


@pytest.fixture(scope="module")
def embedded():
    return embedded_tiny_or_skip()


def test_embedded_batched_equals_per_sample(embedded, records):
    chosen = [records[0], records[1], records[2]]  # text, text, FigStep image
    batched = extract(embedded, chosen, [1, 2], batch_size=3, blank_image=True, progress=False)
    single = extract(embedded, chosen, [1, 2], batch_size=1, blank_image=True, progress=False)
    assert batched.states.shape == (3, 2, 896) and batched.states.dtype == F64
    torch.testing.assert_close(batched.states, single.states, rtol=1e-4, atol=1e-4)
    vector = fit_vector(batched)
    assert vector.metadata["model"]["gguf_sha256"].startswith("1d9614638d18")
    assert vector.metadata["template"]["text_only_records"] == "blank white image"
