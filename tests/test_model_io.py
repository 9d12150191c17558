import json
import os

import pytest
import torch
from safetensors import safe_open

from shrinkcli.errors import BadInputError
from shrinkcli.models import create_model
from shrinkcli.models.io import (infer_arch, load_model, load_state_dict_file, model_preprocess_default,
                                 save_model_safetensors)

TINY = {"input_size": 32, "width": 0.25, "embedding_size": 32}


def meta_state_dict(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs).state_dict()


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r90", "r100", "r200"])
def test_infer_arch_finds_every_iresnet_depth(name):
    sd = meta_state_dict(name, input_size=64, width=0.5, embedding_size=128)
    assert infer_arch(sd) == (name, {"embedding_size": 128, "input_size": 64, "width": 0.5})
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert infer_arch(prefixed)[0] == name


def test_infer_arch_full_size_insightface_r100():
    assert infer_arch(meta_state_dict("r100")) == ("r100", {"embedding_size": 512, "input_size": 112, "width": 1.0})


@pytest.mark.parametrize("name", ["mobilefacenet", "mfnr", "mobilenetv1", "mobilenetv2"])
@pytest.mark.parametrize("width", [1.0, 0.5, 0.3])
def test_infer_arch_recognises_students(name, width):
    sd = meta_state_dict(name, input_size=64, width=width, embedding_size=128)
    assert infer_arch(sd) == (name, {"embedding_size": 128, "input_size": 64, "width": width})


def test_infer_arch_refuses_unknown_layouts():
    with pytest.raises(BadInputError, match="unknown model layout"):
        infer_arch({"encoder.weight": torch.zeros(3)})
    sd = meta_state_dict("r18")
    odd = {k: v for k, v in sd.items() if not k.startswith("layer3.1.")}  # [2, 2, 1, 2] blocks
    with pytest.raises(BadInputError, match=r"\[2, 2, 1, 2\] blocks"):
        infer_arch(odd)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "backbone"])
def test_insightface_style_pth_loads_with_module_prefix_and_wrappers(tmp_path, wrapper):
    model = create_model("r18", **TINY).eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3}
    path = tmp_path / "backbone.pth"
    torch.save(obj, path)
    assert sorted(load_state_dict_file(path)) == sorted(model.state_dict())
    loaded, meta = load_model(path)
    assert meta["arch"] == "r18" and meta["arch_kwargs"] == {**TINY, "width": 0.25}
    assert meta["preprocess"] == model_preprocess_default("r18", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_our_pt_checkpoint_uses_its_recorded_arch_and_preprocess(tmp_path):
    model = create_model("mobilenetv2", **TINY)
    preprocess = {"mean": 127.5, "std": 128.0, "crop": 100, "input_size": 32, "channel_order": "RGB"}
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "mobilenetv2", "arch_kwargs": TINY,
                "preprocess": preprocess, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    loaded, meta = load_model(path)
    assert (meta["arch"], meta["arch_kwargs"], meta["preprocess"]) == ("mobilenetv2", TINY, preprocess)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_safetensors_round_trip_is_bit_exact_and_carries_metadata(tmp_path):
    model = create_model("mfnr", **TINY).to(memory_format=torch.channels_last)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move BN running stats away from their defaults
    model.eval()
    path = save_model_safetensors(model, tmp_path / "model.safetensors", extra={"teacher": "r50", "seed": 1})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["shrink_arch"] == "mfnr" and json.loads(metadata["shrink_arch_kwargs"]) == TINY
    assert metadata["embedding_size"] == "32" and metadata["input_size"] == "32"
    assert json.loads(metadata["preprocess"])["mean"] == 127.5 and metadata["seed"] == "1"
    assert metadata["teacher"] == "r50" and "shrink_version" in metadata
    loaded, meta = load_model(path)
    original = model.state_dict()
    assert list(loaded.state_dict()) == list(original)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]) and value.dtype == original[key].dtype, key
    x = torch.randn(2, 3, 32, 32)
    loaded = loaded.to(memory_format=torch.channels_last)  # same layout, same kernels: outputs must be identical
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert len(meta["sha256"]) == 64 and meta["arch"] == "mfnr"


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = create_model("mobilefacenet", **TINY)
    save_model_safetensors(model, tmp_path / "m.safetensors")
    save_model_safetensors(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_explicit_arch_that_does_not_fit_is_one_clear_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("mobilefacenet", **TINY).state_dict(), path)
    with pytest.raises(BadInputError, match=r"does not fit r18.*missing keys"):
        load_model(path, arch="r18")
    model, meta = load_model(path, arch="mobilefacenet")  # matching arch: options still inferred
    assert meta["arch_kwargs"]["width"] == 0.25


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(BadInputError, match="evil.pt refused"):
        load_model(path)
    with pytest.raises(BadInputError, match="evil.pt"):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(b"not a zip", "cannot read weights"), (None, "does not exist")])
def test_unreadable_files_are_bad_input(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        load_model(path)


def test_corrupt_safetensors_and_non_state_dicts_are_bad_input(tmp_path):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(BadInputError, match="cannot read"):
        load_model(bad)
    other = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    with pytest.raises(BadInputError, match="holds no model state_dict"):
        load_state_dict_file(other)
